"""MG-LLaVA's box pooling in bf16: our default (box_pool_precision "fp32": upsampling, RoIAlign bins and their mean in
fp32) against the reference's casts ("reference": the upsampled stages rounded to the tower's bf16, the bins rounded to
the LLM's bf16 before the mean), on the same bf16 ConvNeXt stages. One JSON line.

Shapes (spec mg_llava.md §3, §5): one 768 px image; stages 192^2 x 192, 96^2 x 384, 48^2 x 768, 24^2 x 1536 (random
normal values in bf16, standing in for the frozen tower's outputs); 10 boxes of 40..500 px; 56 x 56 bins, spatial scale
192/768, sampling -1, aligned False. Both vectors are compared with each other as the object projector receives them
(bf16: the default's fp32 vector is cast there) and with the exact pooling of the same bf16 stages (fp64 on the built
map): relative L2 error, and the largest element error over the vector's RMS. `python bench/box_pool_precision.py
[threads]`; about 2 minutes on one thread (the exact reference builds the whole map).
"""

from __future__ import annotations

import sys
import time

import torch

from common import emit

from polyfocus.model.objects import box_features, naive_box_features

CHANNELS, SIDE, IMAGE, BOXES = (192, 384, 768, 1536), 192, 768, 10


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.double() - b.double()).norm() / b.double().norm()).item(), 7)


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b|, over the RMS of b: how far the worst element moves, on the vectors' own scale."""
    return round(((a.double() - b.double()).abs().max() / b.double().pow(2).mean().sqrt()).item(), 6)


def main(threads: int = 1):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(1, c, SIDE >> s, SIDE >> s, generator=g).bfloat16() for s, c in enumerate(CHANNELS)]
    size = torch.randint(40, 500, (BOXES, 2), generator=g).float()
    corner = torch.rand(BOXES, 2, generator=g) * (IMAGE - size)
    boxes = torch.cat([torch.zeros(BOXES, 1), corner, corner + size], 1)  # [K, 5]: image 0

    with torch.no_grad():
        t = time.perf_counter()
        ours = box_features(stages, boxes, IMAGE)  # fp32
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        reference = box_features(stages, boxes, IMAGE, precision="reference", bin_dtype=torch.bfloat16)
        t_reference = time.perf_counter() - t
        exact = naive_box_features([s[0].double() for s in stages], boxes[:, 1:].double(), IMAGE)
    fed = ours.bfloat16()  # what the object projector receives from the default path in a bf16 model
    emit({"bench": "box_pool_precision", "device": "cpu", "threads": threads, "dtype": "bfloat16",
          "shapes": {"stages": [f"{c}x{SIDE >> s}x{SIDE >> s}" for s, c in enumerate(CHANNELS)], "boxes": BOXES,
                     "bins": 56, "image": IMAGE},
          "reference_vs_default": {"differ": round((fed != reference).float().mean().item(), 4),
                                   "rel_l2": relative(reference, fed), "max_abs_over_rms": worst(reference, fed)},
          "vs_exact_rel_l2": {"default_fp32": relative(ours, exact), "default_as_fed_bf16": relative(fed, exact),
                              "reference": relative(reference, exact)},
          "vs_exact_max_abs_over_rms": {"default_as_fed_bf16": worst(fed, exact), "reference": worst(reference, exact)},
          "default_s": round(t_ours, 3), "reference_s": round(t_reference, 3)})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
