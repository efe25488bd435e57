"""Shared bench helpers: a small-but-not-trivial config, interleaved timing, one JSON line out."""

from __future__ import annotations

import json
import statistics
import time

import torch

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import to_llava_hf
from polyfocus.model.presets import tiny_config


def bench_config():
    # 256 visual tokens (224 px / 14), a 4-layer 256-wide LLM: big enough that kernels, not Python, dominate.
    config = tiny_config(hidden_size=256, image_size=224, patch_size=14, vocab_size=4096)
    config.vision_config.hidden_size = 128
    config.vision_config.intermediate_size = 512
    config.vision_config.num_hidden_layers = 4
    config.text_config.num_hidden_layers = 4
    return config


def model_pair():
    """Ours and transformers' LlavaForConditionalGeneration with identical weights."""
    torch.manual_seed(0)
    ours = PolyfocusForConditionalGeneration(bench_config()).eval()
    return ours, to_llava_hf(ours).eval()


def batch(config, batch_size=4, text_len=64, seed=0):
    """Left-padded batch: each sample an image and text of a different length."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    rows, masks = [], []
    for i in range(batch_size):
        text = torch.randint(10, config.text_config.vocab_size, (text_len - 4 * i,), generator=g).tolist()
        seq = [1, *[config.image_token_id] * n, *text]
        rows.append(seq)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    size = config.vision_config.image_size
    return ids, mask, torch.randn(batch_size, 3, size, size, generator=g)


def interleaved(fn_a, fn_b, repeats=11, warmup=2):
    """Median seconds of a and b, run alternately so machine noise hits both alike."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        t = time.perf_counter(); fn_a(); times_a.append(time.perf_counter() - t)
        t = time.perf_counter(); fn_b(); times_b.append(time.perf_counter() - t)
    return statistics.median(times_a), statistics.median(times_b)


def emit(record: dict) -> None:
    print(json.dumps(record))
