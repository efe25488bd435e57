"""DualFocus latency and throughput: plain answers vs DualFocus, and DualFocus's cached+batched path vs the
reference-style one (question by question, one pass per step, as the reference scripts), on the same model and
questions in the same process. One JSON line.

    python bench/dualfocus_latency.py            # CPU: bench_config's small model (256 visual tokens), 1 thread
    python bench/dualfocus_latency.py --size 7b  # GPU: LLaVA-1.5-7B's shapes (CLIP-L/336, Vicuna-7B), bf16

Random weights answer gibberish, so every generation is scripted by `Replies` (a logits processor given to every
generation of every run alike): the box turn replies "[0.25, 0.30, 0.60, 0.75]" as a tokenizer with Llama's digit
split writes it (25 tokens), the question turns one letter, the macro and micro answers different, so that every
question takes DualFocus's longest path: macro, box, crop, micro, perplexity scoring of two candidates.

latency: one question alone (batch 1), median over questions; throughput: questions/s at --batch-size, median of
--repeats rounds; the methods alternate. --no-jump-forward: the cached path decodes the box one token at a time.
Targets (issue 23): dualfocus_cached / plain latency <= 3.5 (issue 7's 1.6 was below this procedure's floor);
same_choices (cached == reference-style).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import bench_config, emit
from transformers import LogitsProcessor, LogitsProcessorList

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.config import PolyfocusConfig
from polyfocus.data.dualfocus import BOX_PROMPT, ZOOM_PROMPT
from polyfocus.data.formats import load_samples
from polyfocus.data.images import ImageProcessor, load_image
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.infer.dualfocus import DualFocus
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scenes import export
from polyfocus.synthworld.scorer import question_of

BOX_REPLY = "[0.25, 0.30, 0.60, 0.75]"
MAX_NEW_TOKENS = 16
VICUNA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


class Replies(LogitsProcessor):
    """Forces each row's reply, chosen from its last user turn: the box turn's is BOX_REPLY as the tokenizer writes it
    (25 tokens with split digits, as Llama's), the others one letter; then the end token. Row by row from the row's
    own tokens (the turn before its last " ASSISTANT:", and how many tokens follow it), so that it gives the same
    reply however a path batches, drafts or verifies its tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.marker = tokenizer.encode(" ASSISTANT:", add_special_tokens=False)
        self.box = tokenizer.encode(" " + BOX_REPLY, add_special_tokens=False)
        self.letters = {c: tokenizer.encode(" " + c, add_special_tokens=False) for c in "AB"}
        self.replies = {}  # the prompt's tokens -> its reply: each prompt decoded once

    def reply(self, prompt: tuple) -> list[int]:
        if prompt not in self.replies:
            turn = self.tokenizer.decode([t for t in prompt if t >= 0], skip_special_tokens=True).rpartition("USER:")[2]
            body = self.box if BOX_PROMPT in turn else self.letters["B" if ZOOM_PROMPT in turn else "A"]
            self.replies[prompt] = body + [self.tokenizer.eos_token_id]
        return self.replies[prompt]

    def __call__(self, input_ids, scores):
        m = len(self.marker)
        for r, row in enumerate(input_ids.tolist()):
            at = next(j for j in range(len(row) - m, -1, -1) if row[j:j + m] == self.marker)
            ids, k = self.reply(tuple(row[:at])), len(row) - at - m  # k: tokens generated so far
            if k < len(ids):
                scores[r] = -float("inf")
                scores[r, ids[k]] = 0.0
        return scores


def build(size: str, device: str) -> Pipeline:
    tokenizer = build_tokenizer(split_digits=True)  # Llama's split: the box reply is 25 tokens
    torch.manual_seed(0)
    if size == "small":
        config, image_size, dtype = bench_config(), 224, torch.float32
    else:  # the default vision config is CLIP-L/336; mlp2x_gelu; select layer -2
        config = PolyfocusConfig(text_config=VICUNA_7B, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
        image_size, dtype = 336, torch.bfloat16
    with torch.device(device):
        model = PolyfocusForConditionalGeneration(config).to(dtype).eval()
    # No tower cache: each timed repeat computes its images (the figures in docs/dualfocus.md were taken so).
    return Pipeline(model, tokenizer, ImageProcessor(image_size=image_size), "vicuna_v1", feature_cache_bytes=0)


def questions(n: int, image_size: int) -> list:
    """n open synthworld questions (colour, count, text), images loaded once."""
    root = tempfile.mkdtemp()
    export(root, n, seed=0, image_size=image_size, split="test", families=["colour", "count", "text"])
    samples = load_samples(f"{root}/test.json")[:n]
    return [([load_image(f"{root}/{s.images[0]}")], question_of(s)) for s in samples]


def timed(fn, *args) -> tuple[float, object]:
    """(seconds, result) of fn(*args), the GPU's queue drained on both sides."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["small", "7b"], default="small")
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--latency-questions", type=int, default=8, help="questions timed alone")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the batched runs")
    p.add_argument("--no-jump-forward", action="store_true", help="decode the box one token at a time")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    pipe = build(args.size, device)
    requests = questions(args.questions, pipe.image_processor.image_size * 2)
    replies = LogitsProcessorList([Replies(pipe.tokenizer)])
    gen = {"max_new_tokens": MAX_NEW_TOKENS, "logits_processor": replies}
    cached, reference = DualFocus(pipe, jump_forward=not args.no_jump_forward), DualFocus(pipe, cached=False)

    runs = {
        "plain": lambda reqs, b: pipe.generate(reqs, batch_size=b, **gen),
        "dualfocus_cached": lambda reqs, b: cached.answer(reqs, batch_size=b, **gen),
        "dualfocus_reference": lambda reqs, b: reference.answer(reqs, **gen),
    }
    for run in runs.values():  # warm-up (kernels, allocator)
        run(requests[:2], 2)
    # Runs alternate (question by question for latency, round by round for throughput) so that the machine's noise
    # hits every method alike; medians.
    alone, batched, results = ({name: [] for name in runs} for _ in range(3))
    for request in requests[:args.latency_questions]:
        for name, run in runs.items():
            alone[name].append(timed(run, [request], 1)[0])
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, results[name] = timed(run, requests, args.batch_size)
            batched[name].append(seconds)
    latency = {name: statistics.median(times) for name, times in alone.items()}
    throughput = {name: len(requests) / statistics.median(times) for name, times in batched.items()}
    same = [(a.answer, a.choice) == (b.answer, b.choice)
            for a, b in zip(results["dualfocus_cached"], results["dualfocus_reference"])]
    longest = sum(r.reason == "perplexity" for r in results["dualfocus_cached"])
    emit({"bench": "dualfocus_latency", "device": device, "size": args.size,
          "dtype": str(next(pipe.model.parameters()).dtype).removeprefix("torch."),
          "visual_tokens": pipe.model.config.num_image_tokens, "questions": len(requests),
          "batch_size": args.batch_size, "perplexity_path": longest,
          "latency_s": {k: round(v, 4) for k, v in latency.items()},
          "throughput_q_s": {k: round(v, 2) for k, v in throughput.items()},
          "latency_ratio_vs_plain": round(latency["dualfocus_cached"] / latency["plain"], 3),
          "reference_latency_ratio_vs_plain": round(latency["dualfocus_reference"] / latency["plain"], 3),
          "throughput_ratio_vs_plain": round(throughput["plain"] / throughput["dualfocus_cached"], 3),
          "speedup_vs_reference": {"latency": round(latency["dualfocus_reference"] / latency["dualfocus_cached"], 3),
                                   "throughput": round(throughput["dualfocus_cached"]
                                                       / throughput["dualfocus_reference"], 3)},
          "jump_forward": not args.no_jump_forward, "same_choices": all(same),
          "target": "latency_ratio_vs_plain <= 3.5"})


if __name__ == "__main__":
    main()
