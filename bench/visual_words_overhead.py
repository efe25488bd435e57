"""Training-step overhead of VW-LMM's visual-word loss: forward+backward of the same model and batch, plain vs with the
visual-word head and KL (and vs pseudo image features), side by side in one process.

Prints one JSON line: median step seconds of each and the ratios (visual words / plain, PIF / plain). The extra work is
the head (Linear d -> V on every visual token), the fp32 softmaxes and the KL over the image positions; PIF adds the
[N, V] x [V, d] expectation over the embeddings.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from common import batch, bench_config, emit

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.model.visual_words import add_visual_word_head


def step(model, ids, mask, pixels, labels):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()


def medians(fns: dict, repeats: int = 11, warmup: int = 2) -> dict:
    """Median seconds of each function, run in turn (as common.interleaved does for two) so that machine noise hits
    all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(bench_config()).to(device).train()
    words = copy.deepcopy(plain)  # the same weights, plus a head (a copy of the LM head)
    add_visual_word_head(words)
    pif = copy.deepcopy(words)
    pif.config.pseudo_image_features = True
    ids, mask, pixels = (t.to(device) for t in batch(plain.config))
    labels = ids.masked_fill((mask == 0) | (ids == plain.config.image_token_id), -100)
    t = medians({name: (lambda m=m: step(m, ids, mask, pixels, labels))
                 for name, m in (("plain", plain), ("visual_words", words), ("pif", pif))})
    emit({"bench": "visual_words_overhead", "device": device.type, "tokens": int(mask.sum()),
          "image_positions": int((ids == plain.config.image_token_id).sum()),
          "vocab": plain.config.text_config.vocab_size, **{f"{k}_s": round(v, 4) for k, v in t.items()},
          "visual_words_ratio": round(t["visual_words"] / t["plain"], 3), "pif_ratio": round(t["pif"] / t["plain"], 3)})


if __name__ == "__main__":
    main()
