"""The eval runner on the tiny model and synthworld: resume after an interruption, shards merged, batching, the
settings guard, the output files, the summary table and `polyfocus eval`."""

import json
import shutil
import threading

import pytest

from polyfocus.cli import main
from polyfocus.data.files import sha256_file
from polyfocus.eval.benchmarks import EvalDataError, Row
from polyfocus.eval.runner import EvalRunError, evaluate, get_chunk, read_answers, summary_table
from polyfocus.synthworld.scenes import export

from eval_helpers import read_jsonl

GEN = {"max_new_tokens": 4, "quiet": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    export(str(d), 4, seed=2, image_size=56, split="test", families=["colour", "existence", "mc"])
    return d  # 12 questions


@pytest.fixture(scope="module")
def reference(pipe, data, tmp_path_factory):
    """One uninterrupted single-process run, batch 4."""
    out = tmp_path_factory.mktemp("reference")
    return evaluate(pipe, "synthworld", data, out=out, batch_size=4, **GEN), out / "synthworld"


class Counting:
    """Wraps a pipeline: counts the requests it answers, and can fail on its n-th generate call."""

    def __init__(self, pipe, fail_on_call=None):
        self.pipe, self.fail_on_call, self.calls, self.answered = pipe, fail_on_call, 0, 0
        self.model = pipe.model

    def generate(self, requests, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as if the job were killed mid-run
        self.answered += len(requests)
        return self.pipe.generate(requests, **kwargs)


def test_resume_after_an_interruption_gives_the_uninterrupted_answers(pipe, data, reference, tmp_path):
    _, ref_dir = reference
    with pytest.raises(KeyboardInterrupt):
        evaluate(Counting(pipe, fail_on_call=2), "synthworld", data, out=tmp_path, batch_size=4, **GEN)
    answers = tmp_path / "synthworld" / "answers.jsonl"
    assert len(answers.read_text().splitlines()) == 4  # the first batch was flushed
    with open(answers, "a") as f:
        f.write('{"question_id": "test_000001_col')  # and a line torn by the kill
    resumed = Counting(pipe)
    results = evaluate(resumed, "synthworld", data, out=tmp_path, batch_size=3, **GEN)
    assert resumed.answered == 8  # only the unanswered questions were asked
    assert answers.read_bytes() == (ref_dir / "answers.jsonl").read_bytes()
    assert (tmp_path / "synthworld" / "samples.jsonl").read_bytes() == (ref_dir / "samples.jsonl").read_bytes()
    assert results["scores"] == reference[0]["scores"]
    # nothing left: a rerun rescores without loading or calling a model
    idle = Counting(pipe)
    assert evaluate(idle, "synthworld", data, out=tmp_path, **GEN)["scores"] == results["scores"] and idle.calls == 0


def test_two_chunks_merged_equal_one_process(pipe, data, reference, tmp_path):
    _, ref_dir = reference
    assert evaluate(pipe, "synthworld", data, out=tmp_path, num_chunks=2, chunk_idx=0, **GEN) is None
    shard0 = read_jsonl(tmp_path / "synthworld" / "answers.chunk0of2.jsonl")
    assert [a["question_id"] for a in shard0] == [a["question_id"] for a in read_jsonl(ref_dir / "answers.jsonl")][:6]
    results = evaluate(pipe, "synthworld", data, out=tmp_path, num_chunks=2, chunk_idx=1, **GEN)
    assert (tmp_path / "synthworld" / "answers.jsonl").read_bytes() == (ref_dir / "answers.jsonl").read_bytes()
    assert results["scores"] == reference[0]["scores"]


def test_torchrun_ranks_shard_and_rank_zero_merges(pipe, data, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert evaluate(pipe, "synthworld", data, out=tmp_path, **GEN) is None  # rank 1 never merges
    monkeypatch.setenv("RANK", "0")
    results = evaluate(pipe, "synthworld", data, out=tmp_path, **GEN)
    assert (tmp_path / "synthworld" / "answers.jsonl").read_bytes() == (reference[1] / "answers.jsonl").read_bytes()
    assert results["scores"] == reference[0]["scores"]


def test_get_chunk_is_llavas():
    assert [get_chunk(list(range(7)), 3, k) for k in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert get_chunk(list(range(2)), 3, 2) == []


def test_batch_8_answers_equal_batch_1(pipe, data, tmp_path):
    one = evaluate(pipe, "synthworld", data, out=tmp_path / "b1", batch_size=1, **GEN)
    eight = evaluate(pipe, "synthworld", data, out=tmp_path / "b8", batch_size=8, **GEN)
    texts = [[a["text"] for a in read_jsonl(tmp_path / b / "synthworld" / "answers.jsonl")] for b in ("b1", "b8")]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # different answers, identical across batch sizes
    assert one["scores"] == eight["scores"]


def test_results_json_records_what_reproduces_the_run(reference, data, ckpt):
    results, out = reference
    assert results["benchmark"] == "synthworld" and results["n"] == 12
    assert results["decoding"] == {"do_sample": False, "temperature": 0.0, "num_beams": 1, "max_new_tokens": 4,
                                   "batch_size": 4}
    assert results["files_sha256"] == {str(data / "test.json"): sha256_file(data / "test.json")}
    assert results["environment"]["packages"]["torch"] and results["environment"]["packages"]["transformers"]
    generation = results["settings"]["generation"]
    assert generation["template"] == "tokenizer" and generation["stop"] == "</s>"
    assert len(generation["chat_template_sha256"]) == 64
    assert generation["image_processor"]["crop_size"]["height"] == 56
    assert results["timing"]["answered"] == 12 and results["timing"]["samples_per_s"] > 0
    sample = read_jsonl(out / "samples.jsonl")[0]
    assert set(sample) >= {"question_id", "question", "prompt", "answer", "reference", "score"}
    answer = read_jsonl(out / "answers.jsonl")[0]
    assert set(answer) == {"question_id", "prompt", "text", "model_id", "metadata"}


def test_other_settings_in_the_same_directory_are_refused(pipe, data, reference):
    _, out = reference
    with pytest.raises(EvalRunError, match="max_new_tokens"):
        evaluate(pipe, "synthworld", data, out=out.parent, batch_size=4, max_new_tokens=9, quiet=True)


def test_a_corrupt_line_before_the_end_is_an_error_naming_it(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\nnot json\n{"question_id": 2, "text": "b"}\n')
    with pytest.raises(EvalDataError, match=r"answers\.jsonl:2"):
        read_answers(path)
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    assert list(read_answers(path)) == [1] and path.read_text() == '{"question_id": 1, "text": "a"}\n'


def test_missing_image_is_reported_before_any_model_is_loaded(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = sorted((copy / "images").iterdir())[1]
    victim.unlink()
    with pytest.raises(EvalDataError, match=rf"image not found: .*{victim.name} \(question 'test_000001_colour'"):
        evaluate(tmp_path / "no-such-model", "synthworld", copy, out=tmp_path / "out", quiet=True)


def test_summary_table_across_benchmarks(reference, tmp_path):
    _, out = reference
    results = json.loads((out / "results.json").read_text())
    for model, bench, value in (("m1", "pope", 85.94), ("m2", "synthworld", 12.5)):
        (tmp_path / model / bench).mkdir(parents=True)
        (tmp_path / model / bench / "results.json").write_text(json.dumps(
            {**results, "model": f"/ckpts/{model}", "benchmark": bench, "main": value,
             "main_metric": "f1" if bench == "pope" else "accuracy"}))
    lines = summary_table(tmp_path).splitlines()
    assert lines[0] == "| model | pope (f1) | synthworld (accuracy) |"  # the benchmarks in the suite's order
    assert lines[2:] == ["| m1 | 85.9 |  |", "| m2 |  | 12.5 |"]


def test_cli_eval_and_summary(ckpt, data, tmp_path, capsys):
    main(["eval", "--model", str(ckpt), "--benchmark", "synthworld", "--data", str(data), "--out", str(tmp_path),
          "--limit", "3", "--max-new-tokens", "2", "--batch-size", "2", "--option", "split=test"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["benchmark"] == "synthworld" and printed["scores"]["n"] == 3
    assert len(read_jsonl(tmp_path / "synthworld" / "answers.jsonl")) == 3
    main(["eval", "--summary", str(tmp_path)])
    assert f"| {ckpt.name} |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown option"):
        main(["eval", "--model", str(ckpt), "--benchmark", "pope", "--data", str(data), "--option", "splitt=x"])
    with pytest.raises(SystemExit, match="question file not found"):
        main(["eval", "--model", str(ckpt), "--benchmark", "gqa", "--data", str(tmp_path / "nowhere")])


def test_rank_zero_waits_for_the_other_shards(tmp_path, monkeypatch):
    from polyfocus.eval import runner

    monkeypatch.setattr(runner, "POLL_SECONDS", 0.05)
    rows = [Row(question_id=i, prompt="") for i in range(4)]
    (tmp_path / "answers.chunk0of2.jsonl").write_text("".join(json.dumps({"question_id": i}) + "\n" for i in (0, 1)))
    late = tmp_path / "answers.chunk1of2.jsonl"
    late.write_text('{"question_id": 2}\n{"question_id": 3')  # rank 1 is still writing
    assert not runner.ready_to_merge(rows, tmp_path, 2, rank=0, launched=False, timeout=1.0)  # chunks: no waiting
    assert not runner.ready_to_merge(rows, tmp_path, 2, rank=1, launched=True, timeout=1.0)   # rank 1 never merges
    with pytest.raises(EvalRunError, match="gave up waiting"):
        runner.ready_to_merge(rows, tmp_path, 2, rank=0, launched=True, timeout=0.2)
    threading.Timer(0.2, lambda: late.write_text('{"question_id": 2}\n{"question_id": 3}\n')).start()
    assert runner.ready_to_merge(rows, tmp_path, 2, rank=0, launched=True, timeout=30.0)


def test_a_tokenizer_without_chat_template_gets_llavas_eval_template(ckpt, data, tmp_path):
    plain = tmp_path / "ckpt"
    shutil.copytree(ckpt, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for path in plain.glob("chat_template*"):
        path.unlink()
    results = evaluate(plain, "synthworld", data, out=tmp_path / "out", limit=2, device="cpu", **GEN)
    assert results["settings"]["generation"]["template"] == "vicuna_v1"
