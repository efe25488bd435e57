"""DualFocus latency and throughput: plain answers vs DualFocus, and DualFocus's cached+batched path vs the
reference-style one (question by question, one pass per step, as the reference scripts), on the same model and
questions in the same process. One JSON line.

    python bench/dualfocus_latency.py            # CPU: bench_config's small model (256 visual tokens), 1 thread
    python bench/dualfocus_latency.py --size 7b  # GPU: LLaVA-1.5-7B's shapes (CLIP-L/336, Vicuna-7B), bf16

Random weights answer gibberish, so every generation is scripted by `Replies` (a logits processor given to every
`generate` of every run alike): the box turn replies "[0.25, 0.30, 0.60, 0.75]" one character per token (25 tokens,
Llama's digit split), the question turns one letter, the macro and micro answers different, so that every question
takes DualFocus's longest path: macro, box, crop, micro, perplexity scoring of two candidates.

latency: one question alone (batch 1), median over questions; throughput: questions/s at --batch-size, median of
--repeats rounds; the methods alternate.
Targets (issue 7): dualfocus_cached / plain latency <= 1.6; same_choices (cached == reference-style).
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
    """Forces each row's reply, chosen once per generate call from its last user turn."""

    def __init__(self, tokenizer):
        self.tokenizer, self.previous, self.forced = tokenizer, None, []
        char = {c: tokenizer.convert_tokens_to_ids("Ġ" if c == " " else c) for c in set(BOX_REPLY)}
        self.box = [char[c] for c in BOX_REPLY]
        self.letters = {c: tokenizer.convert_tokens_to_ids(c) for c in "AB"}

    def reply(self, row: list[int]) -> list[int]:
        turn = self.tokenizer.decode([t for t in row if t >= 0], skip_special_tokens=True).rpartition("USER:")[2]
        body = self.box if BOX_PROMPT in turn else [self.letters["B" if ZOOM_PROMPT in turn else "A"]]
        return body + [self.tokenizer.eos_token_id]

    def __call__(self, input_ids, scores):
        new_call = self.previous is None or self.previous.shape[0] != input_ids.shape[0] or \
            self.previous.shape[1] + 1 != input_ids.shape[1] or not torch.equal(self.previous, input_ids[:, :-1])
        if new_call:
            self.start, self.forced = input_ids.shape[1], [self.reply(row) for row in input_ids.tolist()]
        self.previous = input_ids
        k = input_ids.shape[1] - self.start
        for r, ids in enumerate(self.forced):
            if k < len(ids):
                scores[r] = -float("inf")
                scores[r, ids[k]] = 0.0
        return scores


def build(size: str, device: str) -> Pipeline:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    if size == "small":
        config, image_size, dtype = bench_config(), 224, torch.float32
    else:  # the default vision config is CLIP-L/336; mlp2x_gelu; select layer -2
        config = PolyfocusConfig(text_config=VICUNA_7B, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
        image_size, dtype = 336, torch.bfloat16
    with torch.device(device):
        model = PolyfocusForConditionalGeneration(config).to(dtype).eval()
    return Pipeline(model, tokenizer, ImageProcessor(image_size=image_size), "vicuna_v1")


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
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    pipe = build(args.size, device)
    requests = questions(args.questions, pipe.image_processor.image_size * 2)
    replies = LogitsProcessorList([Replies(pipe.tokenizer)])
    gen = {"max_new_tokens": MAX_NEW_TOKENS, "logits_processor": replies}
    cached, reference = DualFocus(pipe), DualFocus(pipe, cached=False)

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
          "same_choices": all(same), "target": "latency_ratio_vs_plain <= 1.6"})


if __name__ == "__main__":
    main()
