"""MG-LLaVA's box pooling at its real shapes: our separable path (`box_features`: RoIAlign's bin mean pulled back
through the upsampling, per stage) vs the reference's way (upsample the four ConvNeXt stages to 192 x 192, concatenate
the 2880-channel map, torchvision-semantics RoIAlign at 56 x 56, mean), same process, alternating runs, median of 5.
The pooled vectors must agree (asserted). One JSON line; target: >= 5x less peak memory.

Shapes (spec mg_llava.md §3, §5): one 768 px image; stages 192^2 x 192, 96^2 x 384, 48^2 x 768, 24^2 x 1536; 20 boxes
of 40..500 px; spatial scale 192/768, sampling -1, aligned False. Peak memory: the growth of the resident set of a
forked process that runs one path once (the stages are allocated before the fork). One CPU thread
(`python bench/roi_align.py 2` for two).
"""

from __future__ import annotations

import os
import resource
import sys

import torch

from common import emit, interleaved

from polyfocus.model.objects import box_features, naive_box_features

CHANNELS, SIDE, IMAGE, BOXES = (192, 384, 768, 1536), 192, 768, 20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_growth_mb(fn) -> float:
    """Peak resident-set growth (MB) of one call of fn, in a forked child (its high-water mark starts at the fork)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        before = rss_mb()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        os.write(write, f"{peak - before}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        value = float(f.read())
    os.waitpid(pid, 0)
    return value


def main(threads: int = 1):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(1, c, SIDE >> s, SIDE >> s, generator=g) for s, c in enumerate(CHANNELS)]
    size = torch.randint(40, 500, (BOXES, 2), generator=g).float()
    corner = torch.rand(BOXES, 2, generator=g) * (IMAGE - size)
    boxes = torch.cat([torch.zeros(BOXES, 1), corner, corner + size], 1)  # [K, 5]: image 0

    with torch.no_grad():
        ours = box_features(stages, boxes, IMAGE)
        reference = naive_box_features([s[0] for s in stages], boxes[:, 1:], IMAGE)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
        max_diff = (ours - reference).abs().max().item()
        t_ours, t_ref = interleaved(lambda: box_features(stages, boxes, IMAGE),
                                    lambda: naive_box_features([s[0] for s in stages], boxes[:, 1:], IMAGE),
                                    repeats=5, warmup=1)
        m_ours = peak_growth_mb(lambda: box_features(stages, boxes, IMAGE))
        m_ref = peak_growth_mb(lambda: naive_box_features([s[0] for s in stages], boxes[:, 1:], IMAGE))

    emit({"bench": "roi_align", "device": "cpu", "threads": threads,
          "shapes": {"stages": [f"{c}x{SIDE >> s}x{SIDE >> s}" for s, c in enumerate(CHANNELS)], "boxes": BOXES,
                     "bins": 56, "image": IMAGE},
          "ours_s": round(t_ours, 4), "naive_s": round(t_ref, 4), "speedup": round(t_ref / t_ours, 2),
          "ours_peak_mb": round(m_ours, 1), "naive_peak_mb": round(m_ref, 1),
          "memory_ratio": round(m_ref / max(m_ours, 0.1), 1), "max_abs_diff": max_diff, "same_values": True,
          "target": "memory_ratio >= 5"})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
