"""Serving throughput: `polyfocus serve` with dynamic batching vs one request at a time (max batch 1).

16 clients on loopback each send 8 chat completions in a row (an image + a question, greedy, max_tokens 32 with
ignore_eos, so every answer is 32 tokens long) to a server in this process. The same model answers both ways, one
server after the other, alternating; every request must succeed, and the batched answers must equal the
one-at-a-time ones. Target: requests/s batched ÷ one at a time ≥ 2.

Usage: python bench/serve_throughput.py [repeats=1] [torch_threads=1]. Prints one JSON line:
{"bench": "serve_throughput", "ratio": ..., "batched": {...}, "one_at_a_time": {...}, ...}.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import emit  # noqa: E402
from polyfocus import PolyfocusForConditionalGeneration  # noqa: E402
from polyfocus.data.images import ImageProcessor  # noqa: E402
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer  # noqa: E402
from polyfocus.infer.pipeline import Pipeline  # noqa: E402
from polyfocus.infer.server import ServeSettings, create_app  # noqa: E402
from polyfocus.model.presets import tiny_config  # noqa: E402
from serve_helpers import data_url, png_bytes, running_server  # noqa: E402

CLIENTS, REQUESTS_PER_CLIENT, MAX_TOKENS, MAX_BATCH = 16, 8, 32, 16
QUESTIONS = ["What colour is the star?", "How many objects are there?", "Describe the image.", "Where is the circle?"]


def save_model(path: Path) -> Path:
    # A small LLM (4 layers x 256) over a 112 px CLIP tower: 64 image tokens per request.
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    config = tiny_config(image_token_id=image_id, hidden_size=256, text_layers=4, image_size=112, patch_size=14)
    PolyfocusForConditionalGeneration(config).eval().save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=112).save_pretrained(path)
    return path


def request(client_id: int, i: int) -> dict:
    colour = ((37 * client_id) % 256, (91 * i) % 256, 128)
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes((96, 80), colour))}},
               {"type": "text", "text": QUESTIONS[(client_id + i) % len(QUESTIONS)]}]
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}


def run_clients(base: str) -> dict:
    """All clients at once; each sends its requests one after another. Answers keyed by (client, i)."""
    bodies = {(c, i): request(c, i) for c in range(CLIENTS) for i in range(REQUESTS_PER_CLIENT)}  # off the clock

    def client(client_id: int) -> list[tuple]:
        results = []
        with httpx.Client(base_url=base, timeout=600) as http:
            for i in range(REQUESTS_PER_CLIENT):
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=bodies[client_id, i])
                body = response.json()
                ok = (response.status_code == 200 and body["usage"]["completion_tokens"] == MAX_TOKENS
                      and body["choices"][0]["finish_reason"] == "length")
                results.append(((client_id, i), ok, time.perf_counter() - start,
                                body["choices"][0]["message"]["content"] if ok else body))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(r[2] for r in results)
    n = len(results)
    return {"wall_s": round(wall, 2), "req_s": round(n / wall, 2), "tok_s": round(n * MAX_TOKENS / wall, 1),
            "p50_latency_s": round(latencies[n // 2], 3), "p95_latency_s": round(latencies[int(n * 0.95)], 3),
            "ok": sum(r[1] for r in results), "answers": {r[0]: r[3] for r in results}}


def main(repeats: int = 1, threads: int = 1) -> None:
    # One intra-op thread by default: on a small shared CPU, two threads competing with other processes made
    # every forward many times slower, in both modes alike.
    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline.from_pretrained(save_model(Path(tmp)), device="cpu")
    runs = {"batched": [], "one_at_a_time": []}
    batch_sizes = []
    for _ in range(int(repeats)):
        for mode, max_batch in (("batched", MAX_BATCH), ("one_at_a_time", 1)):
            app = create_app(pipe, ServeSettings(model_name="bench", max_batch_size=max_batch, batch_window_ms=10))
            with running_server(app) as base:
                httpx.post(base + "/v1/chat/completions", json=request(0, 0), timeout=600)  # warm-up
                runs[mode].append(run_clients(base))
                if mode == "batched":
                    batch_sizes += list(app.state.batcher.batch_sizes)[1:]
    summary = {mode: min(rs, key=lambda r: r["wall_s"]) for mode, rs in runs.items()}  # best of the repeats
    total = CLIENTS * REQUESTS_PER_CLIENT
    all_ok = all(r["ok"] == total for rs in runs.values() for r in rs)
    same = all(r["answers"] == runs["one_at_a_time"][0]["answers"] for rs in runs.values() for r in rs)
    ratio = summary["batched"]["req_s"] / summary["one_at_a_time"]["req_s"]
    emit({"bench": "serve_throughput", "clients": CLIENTS, "requests_per_client": REQUESTS_PER_CLIENT,
          "max_tokens": MAX_TOKENS, "threads": torch.get_num_threads(), "repeats": int(repeats),
          "batched": {k: v for k, v in summary["batched"].items() if k != "answers"} | {
              "max_batch_size": MAX_BATCH, "mean_batch": round(statistics.mean(batch_sizes), 2)},
          "one_at_a_time": {k: v for k, v in summary["one_at_a_time"].items() if k != "answers"},
          "ratio": round(ratio, 2), "all_ok": all_ok, "same_answers": same, "target_met": all_ok and ratio >= 2})


if __name__ == "__main__":
    main(*sys.argv[1:])
