"""Eval throughput: samples/s of `polyfocus eval` on the synthworld benchmark with batching (8) vs LLaVA's batch size
1, side by side in the same process (alternating runs, median), through the whole runner (image loading, prompts,
generation, answers file, scoring). The answers must be identical. One JSON line; target speed-up >= 2.

Model: the demo's size (LM 2 x 128, CLIP 3 x 32 at 112 px = 64 visual tokens), random weights, greedy, 8 new tokens.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import torch
from common import emit, interleaved

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer
from polyfocus.eval.runner import evaluate
from polyfocus.infer.pipeline import Pipeline
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import export

SCENES, FAMILIES, NEW_TOKENS, BATCH = 16, ["colour", "shape", "existence", "mc"], 8, 8


def save_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    config = tiny_config(image_token_id=image_id, hidden_size=128, image_size=112, patch_size=14)
    PolyfocusForConditionalGeneration(config).eval().save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=112).save_pretrained(path)
    return path


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # one thread: on a shared 2-core machine, two OpenMP threads fighting cost up to 50x
        torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    ckpt = save_checkpoint(work / "ckpt")
    export(str(work / "data"), SCENES, seed=0, image_size=112, split="test", families=FAMILIES)
    pipe = Pipeline.from_pretrained(ckpt, device=device, feature_cache_bytes=0)  # each run computes its features
    runs = itertools.count()

    def run(batch_size):
        out = work / f"run{next(runs)}"
        evaluate(pipe, "synthworld", work / "data", out=out, batch_size=batch_size, max_new_tokens=NEW_TOKENS,
                 quiet=True)
        return [json.loads(line)["text"] for line in (out / "synthworld" / "answers.jsonl").read_text().splitlines()]

    same = run(1) == run(BATCH)
    t_one, t_batched = interleaved(lambda: run(1), lambda: run(BATCH), repeats=3, warmup=1)
    n = len(run(1))
    emit({"bench": "eval_throughput", "device": device, "threads": torch.get_num_threads(), "benchmark": "synthworld",
          "questions": n, "new_tokens": NEW_TOKENS, "batch": BATCH, "batch1_samples_s": round(n / t_one, 1),
          "batched_samples_s": round(n / t_batched, 1), "speedup": round(t_one / t_batched, 2), "same_answers": same})


if __name__ == "__main__":
    main()
