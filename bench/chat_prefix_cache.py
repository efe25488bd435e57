"""Prefix reuse: time to first token of a conversation's second turn on the same image, with the server's prefix cache
and without, side by side in one process.

The bench model (bench/common.py's, its tower at 336 px: 576 image tokens; LLM 4 layers x 256), `polyfocus serve` on
loopback with continuous batching, twice: --prefix-cache-mb 1024 and 0 (no KV nor image-feature cache). Per
conversation (a new random image each): turn 1 ("Describe the image.", 32 tokens, greedy) on both servers, untimed;
then, timed and alternating which server goes first:
- second_turn: the image, turn 1, its answer and a new question;
- new_question: the same image and system prompt, another question (the image's prefix is shared, not turn 1);
each with max_tokens 1, so that a request's latency is its time to first token (HTTP and image decoding included,
alike both ways). Medians over the conversations.

    python bench/chat_prefix_cache.py [--conversations 8]

Prints one JSON line. Target (issue 23): second_turn cached / uncached <= 0.3, the same answers both ways.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import bench_config, emit
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from polyfocus import PolyfocusForConditionalGeneration  # noqa: E402
from polyfocus.data.images import ImageProcessor  # noqa: E402
from polyfocus.data.tokenizer import build_tokenizer  # noqa: E402
from polyfocus.infer.pipeline import Pipeline  # noqa: E402
from polyfocus.infer.server import ServeSettings, create_app  # noqa: E402
from serve_helpers import data_url, running_server  # noqa: E402

SYSTEM = "You are a helpful assistant that looks carefully at images."


def build() -> Pipeline:
    torch.manual_seed(0)
    config = bench_config()
    config.vision_config.image_size = 336  # 24 x 24 patches of 14: LLaVA-1.5's 576 image tokens
    model = PolyfocusForConditionalGeneration(config).eval()
    # No tower cache in the pipeline: the uncached server must compute every image (its baseline).
    return Pipeline(model, build_tokenizer(), ImageProcessor(image_size=336), "vicuna_v1", feature_cache_bytes=0)


def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return data_url(buffer.getvalue())


def user(text: str, image: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def ask(http: httpx.Client, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(seconds, answer, prompt tokens). One client per server, kept open: a new httpx client costs ~20 ms (its SSL
    context), which would hide what the server does."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    response = http.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - start
    reply = response.json()
    assert response.status_code == 200, reply
    return seconds, reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build()
    servers = {name: create_app(pipe, ServeSettings(model_name="bench", batch_window_ms=0, prefix_cache_mb=mb))
               for name, mb in (("cached", 1024.0), ("uncached", 0.0))}
    times = {(turn, name): [] for turn in ("second_turn", "new_question") for name in servers}
    answers, prompt_tokens = {name: [] for name in servers}, {}
    with running_server(servers["cached"]) as cached, running_server(servers["uncached"]) as uncached, \
            httpx.Client(base_url=cached, timeout=600) as to_cached, \
            httpx.Client(base_url=uncached, timeout=600) as to_uncached:
        bases = {"cached": to_cached, "uncached": to_uncached}
        for base in bases.values():  # warm-up
            ask(base, [user("Hi", image_url(10_000))], 2)
        for c in range(args.conversations):
            image = image_url(c)
            first = [{"role": "system", "content": SYSTEM}, user("Describe the image.", image)]
            replies = {name: ask(base, first, 32)[1] for name, base in bases.items()}
            assert replies["cached"] == replies["uncached"]
            turns = {
                "second_turn": [*first, {"role": "assistant", "content": replies["cached"]},
                                user("What is in the top left corner?")],
                "new_question": [first[0], user("How many objects are there?", image)],
            }
            order = list(bases) if c % 2 == 0 else list(reversed(bases))
            for turn, messages in turns.items():
                for name in order:
                    seconds, answer, prompt_tokens[turn] = ask(bases[name], messages, 1)
                    times[turn, name].append(seconds)
                    answers[name].append(answer)
        scheduler = servers["cached"].state.batcher
        hits = {"prefix_hits": scheduler.prefixes.hits, "prefix_hit_tokens": scheduler.prefixes.hit_tokens,
                "prefix_entries": len(scheduler.prefixes), "prefix_cache_mb": round(scheduler.prefixes.size / 2**20, 1)}
    ttft = {key: statistics.median(values) for key, values in times.items()}
    ratio = {turn: round(ttft[turn, "cached"] / ttft[turn, "uncached"], 3) for turn in ("second_turn", "new_question")}
    same = answers["cached"] == answers["uncached"]
    emit({"bench": "chat_prefix_cache", "image_tokens": pipe.model.config.num_image_tokens,
          "conversations": args.conversations, "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
          "ttft_s": {f"{turn}_{name}": round(v, 4) for (turn, name), v in ttft.items()}, "ratio": ratio, **hits,
          "same_answers": same, "target": "second_turn ratio <= 0.3",
          "target_met": same and ratio["second_turn"] <= 0.3})


if __name__ == "__main__":
    main()
