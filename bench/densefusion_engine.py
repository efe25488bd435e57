"""DenseFusion engine throughput on synthworld images: images/s of `polyfocus densefusion run` with 1 and 2 local
worker processes and with 2 Ray actors (a local Ray), the same images, experts and captioner, one after another in
this process. One JSON line; ratios against the 1-worker local run.

Experts: synthworld's pixel detector, tesseract OCR and the alt-text; captioner: a polyfocus model of the demo's size
(LM 2 x 128, CLIP 3 x 64 at 112 px; random weights, so every caption runs to max_new_tokens), batched greedy
generation. "wall" counts everything from the command's start (model loading, process / Ray start-up); "steady"
counts from the first finished shard to the last (shard files' times), the rate once every worker is up.

    OMP_NUM_THREADS=1 python bench/densefusion_engine.py [N_IMAGES]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit

from polyfocus.densefusion.engine import EngineSpec, run_engine
from polyfocus.densefusion.sources import read_items

SHARD, BATCH, NEW_TOKENS = 16, 8, 32


def make_inputs(root: Path, n: int) -> tuple[Path, Path]:
    from polyfocus import PolyfocusForConditionalGeneration
    from polyfocus.data.images import ImageProcessor
    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.demo import demo_model_config
    from polyfocus.model.presets import tiny_config
    from polyfocus.synthworld.densefusion import synthworld_inputs
    from polyfocus.synthworld.scenes import export

    export(str(root / "data"), n, image_size=112, families=["dense_caption"], split="pretrain", max_objects=3)
    synthworld_inputs(root / "data", root / "inputs")
    tok = build_tokenizer(save_dir=root / "captioner")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tok), **demo_model_config(overrides={"text": "llama"}))  # as when measured
    PolyfocusForConditionalGeneration(config).save_pretrained(
        root / "captioner")
    ImageProcessor(image_size=112).save_pretrained(root / "captioner")
    return root / "inputs" / "images.jsonl", root / "data"


def timed_run(images: Path, data: Path, out: Path, spec: EngineSpec, **kwargs) -> dict:
    t = time.perf_counter()
    summary = run_engine(read_items(images), str(data), out, spec, batch_size=BATCH, progress=False, **kwargs)
    wall = time.perf_counter() - t
    shards = sorted((out / "shards").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    first, last = shards[0].stat().st_mtime, shards[-1].stat().st_mtime
    after_first = summary["images"] - len(shards[0].read_text().splitlines())
    return {"wall_images_per_s": round(summary["images"] / wall, 2),
            "steady_images_per_s": round(after_first / (last - first), 2) if last > first else None,
            "seconds_per_image": summary["seconds_per_image"]}


def main(n: int = 192) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, data = make_inputs(root, n)
        spec = EngineSpec(experts=["synthworld", "ocr", "alt_text"], captioner=f"local:{root / 'captioner'}",
                          captioner_options={"max_new_tokens": NEW_TOKENS, "batch_size": BATCH, "device": "cpu"},
                          shard_size=SHARD)
        runs = {"local_1": timed_run(images, data, root / "local_1", spec, workers=1),
                "local_2": timed_run(images, data, root / "local_2", spec, workers=2)}
        try:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            runs["ray_2"] = timed_run(images, data, root / "ray_2", spec, workers=2, engine="ray")
            ray.shutdown()
        except ImportError:
            runs["ray_2"] = None
        same = all((root / name / "captions.jsonl").read_text() == (root / "local_1" / "captions.jsonl").read_text()
                   for name, run in runs.items() if run is not None)
    base = runs["local_1"]
    ratio = {f"{name}_vs_local_1": {k: round(run[k] / base[k], 3) for k in ("wall_images_per_s", "steady_images_per_s")
                                    if run[k] and base[k]}
             for name, run in runs.items() if run is not None and name != "local_1"}
    emit({"bench": "densefusion_engine", "device": "cpu", "images": n, "shard_size": SHARD, "batch_size": BATCH,
          "max_new_tokens": NEW_TOKENS, "experts": spec.experts, "same_captions": same, **ratio,
          "runs": runs})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
