"""The DenseFusion engine (polyfocus/densefusion/engine.py, ray_engine.py): its output format, failures recorded
per image, exact kill-and-resume (killed at chosen points and at random moments), 2 worker processes and Ray giving
the same output as one process, and the refusal to mix runs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyfocus.densefusion import engine as engine_module
from polyfocus.densefusion.engine import EngineSpec, run_engine
from polyfocus.densefusion.sources import read_items
from polyfocus.experts import Detection

from test_densefusion_helpers import synthworld_data

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 14
SHARD = 3  # 5 shards, the last one short


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthworld images; their true dense captions (pretrain.json) serve as the captioner (`file:`)."""
    return synthworld_data(tmp_path_factory.mktemp("df_data"), N_IMAGES)


def spec(data, **overrides) -> EngineSpec:
    return EngineSpec(**{"experts": ["synthworld", "alt_text"], "captioner": f"file:{data / 'pretrain.json'}",
                         "shard_size": SHARD, **overrides})


def run(data, out, **kwargs):
    return run_engine(read_items(data / "pretrain.json"), str(data), out, kwargs.pop("spec", spec(data)),
                      progress=False, **kwargs)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    summary = run(data, out)
    return out, summary


def test_output_is_densefusion_jsonl_with_hints_and_timings(data, reference):
    out, summary = reference
    records = lines(out / "captions.jsonl")
    truth = {s["image"]: s["conversations"][1]["value"] for s in json.loads((data / "pretrain.json").read_text())}
    assert [r["image_path"] for r in records] == [f"images/pretrain_{i:06d}.png" for i in range(N_IMAGES)]
    for r in records:
        assert list(r) == ["image_id", "caption", "image_path", "hints"]  # DenseFusion's fields (no url here)
        assert r["caption"] == truth[r["image_path"]]
        assert r["hints"]["detections"] and all(d["expert"] == "synthworld" for d in r["hints"]["detections"])
    assert len(list((out / "shards").glob("*.jsonl"))) == 5 and (out / "failed.jsonl").read_text() == ""
    assert summary["captioned"] == N_IMAGES and set(summary["seconds"]) == {"load", "synthworld", "alt_text",
                                                                             "captioner"}
    assert json.loads((out / "timings.json").read_text())["images"] == N_IMAGES
    assert summary["this_run"]["images"] == N_IMAGES


def test_captions_are_training_data_as_they_are(data, reference):
    """`data_path: captions.jsonl` in a recipe: each record one captioning sample of its image."""
    from polyfocus.data.formats import DENSE_CAPTION_PROMPT, load_samples

    samples = load_samples(reference[0] / "captions.jsonl")
    assert len(samples) == N_IMAGES and samples[0].images == ["images/pretrain_000000.png"]
    assert samples[0].messages[0]["content"] == "<image>\n" + DENSE_CAPTION_PROMPT
    assert samples[0].extra["image_id"] == "pretrain_000000_dense_caption"


def test_failures_are_recorded_per_image_never_lost(data, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    (broken / "images" / "pretrain_000004.png").write_bytes(b"\x89PNG not really")
    captions = json.loads((broken / "pretrain.json").read_text())
    kept = [c for c in captions if c["image"] != "images/pretrain_000007.png"]
    (broken / "partial.json").write_text(json.dumps(kept))
    summary = run_engine(read_items(broken / "pretrain.json"), str(broken), tmp_path / "out",
                         spec(broken, captioner=f"file:{broken / 'partial.json'}"), progress=False)
    failed = {r["image_path"]: r["error"] for r in lines(tmp_path / "out" / "failed.jsonl")}
    assert failed["images/pretrain_000004.png"].startswith("load: ImageLoadError: cannot read image")
    assert failed["images/pretrain_000007.png"].startswith("captioner: no caption for this image")
    assert summary["captioned"] == N_IMAGES - 2 and summary["failed"] == 2
    ids = [r["image_id"] for r in lines(tmp_path / "out" / "captions.jsonl")] + \
        [r["image_id"] for r in lines(tmp_path / "out" / "failed.jsonl")]
    assert sorted(ids) == sorted(i.image_id for i in read_items(broken / "pretrain.json"))


def test_captions_with_unicode_line_separators_merge_whole(data, tmp_path):
    """U+2028 / U+0085 stay raw in the shards' JSON (ensure_ascii=False): the merge must split on "\\n" only."""
    odd = "A sign reads\u2028OPEN\x85today."
    captions = [{"image": f"images/pretrain_{i:06d}.png", "caption": odd if i == 4 else f"caption {i}"}
                for i in range(N_IMAGES)]
    (tmp_path / "odd.json").write_text(json.dumps(captions))
    summary = run(data, tmp_path / "out", spec=spec(data, captioner=f"file:{tmp_path / 'odd.json'}"))
    merged = (tmp_path / "out" / "captions.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert summary["captioned"] == len(merged) == N_IMAGES and json.loads(merged[4])["caption"] == odd


class HalfDoneExpert:
    """Adds a detection to each image in turn and raises at image 5, leaving its batch half done."""

    name = "half_done"

    def __call__(self, items):
        for item in items:
            item.hints.detections.append(Detection("thing", (0.0, 0.0, 1.0, 1.0), 1.0, self.name))
            if item.image_path.endswith("pretrain_000005.png"):
                raise ValueError("cannot look at this one")


def test_an_expert_failing_mid_batch_fails_its_image_only(data, tmp_path, monkeypatch):
    from polyfocus import experts

    monkeypatch.setitem(experts.EXPERTS, "half_done", "test_densefusion_engine:HalfDoneExpert")
    run(data, tmp_path, spec=spec(data, experts=["half_done", "alt_text"]), batch_size=4)
    (failed,) = lines(tmp_path / "failed.jsonl")
    assert failed["image_path"] == "images/pretrain_000005.png"
    assert failed["error"] == "half_done: ValueError: cannot look at this one"
    captioned = lines(tmp_path / "captions.jsonl")
    assert len(captioned) == N_IMAGES - 1
    assert all(len(r["hints"]["detections"]) == 1 for r in captioned)  # the batch was redone from clean hints


# ---- kill and resume --------------------------------------------------------------------------------------------


def killed_run(data, out, patch):
    """Run the engine in a forked child that `patch` makes SIGKILL itself at some point; the child's status."""
    pid = os.fork()
    if pid == 0:  # the child: no torch work happens here, so forking is safe
        try:
            patch()
            run(data, out)
        finally:
            os._exit(3)  # reaching this means the kill never came
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def die_on_call(owner, name, n, when=lambda *a: True):
    """Patch owner.name so that its n-th matching call SIGKILLs the process (before doing anything)."""
    original, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        if when(*args):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return lambda: setattr(owner, name, patched)


KILL_POINTS = {
    # inside the third shard, while its captions are being made
    "mid_shard": die_on_call(engine_module.ShardWorker, "process", 3),
    # the shard's records written to their temporary file, not yet renamed
    "before_rename": die_on_call(engine_module.os, "replace", 2, when=lambda src, dst: str(dst).endswith(".jsonl")),
    # the timings of shard 2 on disk, its records not
    "between_files": die_on_call(engine_module.os, "replace", 5, when=lambda src, dst: "shards" in str(dst)),
    # every shard done, the merged files not written
    "before_merge": die_on_call(engine_module, "merge", 1),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_then_rerun_captions_every_image_exactly_once(data, reference, tmp_path, point):
    out = tmp_path / "out"
    assert killed_run(data, out, KILL_POINTS[point]) == -signal.SIGKILL
    assert not (out / "captions.jsonl").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.jsonl")}
    summary = run(data, out)
    assert (out / "captions.jsonl").read_text() == (reference[0] / "captions.jsonl").read_text()
    ids = [r["image_id"] for r in lines(out / "captions.jsonl")]
    assert len(ids) == len(set(ids)) == N_IMAGES
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert summary["this_run"]["images"] == N_IMAGES - sum(len(lines(out / "shards" / n)) for n in done_before)
    assert not list((out / "shards").glob("*.tmp*"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tesseract") is None, reason="the slow expert of this test is tesseract")
def test_killed_at_random_moments_then_finished(tmp_path):
    """The real CLI in a subprocess, SIGKILLed twice at random times (OCR makes each image take ~0.1 s), then run
    to the end: every image exactly once, the same bytes as one uninterrupted run."""
    data = synthworld_data(tmp_path / "data", 32)
    experts, captioner = "synthworld,ocr,alt_text", f"file:{data / 'pretrain.json'}"
    command = [sys.executable, "-m", "polyfocus.cli", "densefusion", "run", "--images", str(data / "pretrain.json"),
               "--experts", experts, "--captioner", captioner, "--shard-size", "4", "--batch-size", "2",
               "--no-progress", "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for _ in range(2):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 5.0))
        process.kill()
        process.wait()
    subprocess.run(command, env=env, check=True, capture_output=True)
    run_engine(read_items(data / "pretrain.json"), str(data), tmp_path / "reference",
               EngineSpec(experts.split(","), captioner, shard_size=4), batch_size=2, progress=False)
    assert (tmp_path / "out" / "captions.jsonl").read_text() == \
        (tmp_path / "reference" / "captions.jsonl").read_text()
    assert len(lines(tmp_path / "out" / "captions.jsonl")) == 32


def test_rerun_with_other_settings_or_images_is_refused(data, reference):
    out = reference[0]
    with pytest.raises(ValueError, match=r"holds a run with other \['spec'\]"):
        run(data, out, spec=spec(data, experts=["synthworld"]))
    items = read_items(data / "pretrain.json")[:-1]
    with pytest.raises(ValueError, match="n_images"):
        run_engine(items, str(data), out, spec(data), progress=False)
    assert run(data, out)["this_run"]["images"] == 0  # the same command again: nothing to do


def test_url_only_images_must_be_downloaded_first(tmp_path):
    from polyfocus.experts import Item

    with pytest.raises(ValueError, match="download them first"):
        run_engine([Item("a", url="http://x/a.jpg")], str(tmp_path), tmp_path / "out",
                   EngineSpec(["alt_text"], "file:none"), progress=False)


# ---- parallel: worker processes and Ray ---------------------------------------------------------------------------


def test_two_worker_processes_give_the_same_output(data, reference, tmp_path):
    summary = run(data, tmp_path / "out", workers=2)
    assert (tmp_path / "out" / "captions.jsonl").read_text() == (reference[0] / "captions.jsonl").read_text()
    assert summary["captioned"] == N_IMAGES


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_engine_on_a_local_ray(data, reference, tmp_path, local_ray):
    """--engine ray finishes a run that a killed local engine left half done: the same shards and records as one
    uninterrupted local run, the finished shards untouched."""
    out = tmp_path / "out"
    assert killed_run(data, out, KILL_POINTS["mid_shard"]) == -signal.SIGKILL
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.jsonl")}
    summary = run(data, out, engine="ray", workers=2)
    assert summary["this_run"]["images"] == N_IMAGES - len(done) * SHARD
    assert (out / "captions.jsonl").read_text() == (reference[0] / "captions.jsonl").read_text()
    assert all((out / "shards" / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
