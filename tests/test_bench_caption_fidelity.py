"""bench/caption_fidelity.py: the fidelity figures of hand-made captions, worked out by hand."""

import json

import pytest

from bench_helpers import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("caption_fidelity")


def caption_file(path, captions):
    path.write_text(json.dumps([{"id": f"c{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": text}]}
        for i, (image, text) in enumerate(captions.items())]))
    return str(path)


def test_fidelity_by_hand(bench, tmp_path, capsys):
    truth = caption_file(tmp_path / "truth.json", {
        "a.png": "There is a red star. It is large.",
        "b.png": "There is a blue circle."})
    made = caption_file(tmp_path / "made.json", {
        "a.png": "There is a red star. It is small.",  # 1 of 2 sentences; words: 7 of 8 shared
        "b.png": "There is a blue circle.",            # identical
        "c.png": "Not in the truth."})                 # not matched: left out
    bench.main(["--truth", truth, "--captions", made])
    line = json.loads(capsys.readouterr().out)
    assert line["images"] == 2 and line["identical"] == 0.5
    assert line["word_f1"] == pytest.approx((7 / 8 + 1) / 2, abs=1e-4)
    assert line["sentences_recalled"] == pytest.approx(0.75)
    assert line["object_f1"] == 1.0 and line["kind_f1"] == 1.0  # the same objects (red star; blue circle)
    assert line["words"] == 6.5
    bench.main(["--truth", truth, "--captions", made, "--exclude", caption_file(tmp_path / "x.json", {"a.png": ""})])
    assert json.loads(capsys.readouterr().out)["identical"] == 1.0


def test_kind_f1_leaves_label_codes_out(bench):
    truth = 'A red star reading "K7Q" and a blue circle.'
    assert bench.kind_f1(truth, "A red star and a green circle.") == pytest.approx(2 * 1 / (2 + 2))
    assert bench.kind_f1(truth, 'A red star reading "ZZZ" and a blue circle.') == 1.0  # a wrong code: not counted
