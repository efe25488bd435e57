"""S2, "scaling on scales" (Shi et al. 2024, github.com/bfshi/scaling_on_scales `s2wrapper`), as LLaVA-S2 and
DenseFusion's high-res models use it (spec densefusion.md §8): the same vision tower looks at the image at several
scales; each scale is cut into tower-sized tiles, the tiles' patch maps are put back together and pooled to the
smallest scale's grid, and the scales are concatenated on channels.

    x: [B, 3, S, S]                                        S = the largest scale (LLaVA-S2: 1008)
    for s in scales (336, 672, 1008):                      split = the smallest scale = the tower's image_size
        n = ceil(s / split)                                1, 2, 3
        tiles = split_chessboard(bicubic(x, s), n)         [n*n*B, 3, split, split], tile-major
        f = features(tiles)                                [n*n*B, h*w, C]  (layer -2, CLS dropped: LLaVA's select)
        f = merge_chessboard(f as [n*n*B, C, h, w], n)     [B, C, n*h, n*w]
        f_s = area(f, (h, w))                              [B, C, h, w]
    out = concat(f_s over scales, channels)                [B, h*w, C * len(scales)]

So the LLM still sees h*w tokens (576 for CLIP-L/336), the tower runs 1 + 4 + 9 = 14 times per image, and the
projector reads C * len(scales) channels (`config.mm_hidden_size`). No parameters: the tower's own weights serve
every scale. The steps are the reference's `forward(..., split_mode="resize", num_prefix_token=0)`; its extra resizes
for a scale that is not a multiple of the split are kept (they are identities for 336/672/1008).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def split_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C, n*h, n*w] -> [n*n*B, C, h, w]: the n x n tiles stacked on the batch axis, tile-major (row by row)."""
    _, _, height, width = x.shape
    h, w = height // n, width // n
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)], dim=0)


def merge_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of split_chessboard: [n*n*B, C, h, w] -> [B, C, n*h, n*w]."""
    b = x.shape[0] // (n * n)
    tile = [x[k * b:(k + 1) * b] for k in range(n * n)]
    return torch.cat([torch.cat(tile[i * n:(i + 1) * n], dim=-1) for i in range(n)], dim=-2)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Interpolation in fp32 (as the reference), back to x's dtype; the same size is returned unchanged."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode=mode).to(x.dtype)


class S2MultiScale(nn.Module):
    def __init__(self, scales: list[int]):
        """scales: image sides, ascending; the smallest is the tower's own input size (the tile size)."""
        super().__init__()
        self.scales = sorted(scales)
        self.split = self.scales[0]

    @classmethod
    def from_config(cls, config) -> S2MultiScale:
        return cls(config.s2_scale_list())

    def forward(self, tower) -> torch.Tensor:
        """The model's images, the tower run on each scale's tiles (model/vision.py's TowerOutputs) → [B, h*w, C * n]
        (see `fuse`)."""
        # No parameters: with a frozen tower each image's fused map is cached whole (one entry instead of one per tile,
        # 1 + 4 + 9 of them for LLaVA-S2's scales, and no resizing or tiling at every step).
        return tower.per_image(f"s2 {self.scales}", lambda part: self.fuse(part.pixel_values, part.select))

    def fuse(self, pixel_values: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (S: the largest scale); features: tower tiles [N, 3, split, split] -> their
        selected patch features [N, h*w, C]. Returns [B, h*w, C * len(scales)]."""
        maps = []
        for scale in self.scales:
            n = math.ceil(scale / self.split)
            x = _resize(_resize(pixel_values, scale, "bicubic"), n * self.split, "bicubic")  # [B, 3, n*split, ..]
            f = features(split_chessboard(x, n))  # [n*n*B, h*w, C]
            side = math.isqrt(f.shape[1])
            if side * side != f.shape[1]:
                raise ValueError(f"S2 needs a square patch map per tile; the tower gave {f.shape[1]} tokens")
            f = merge_chessboard(f.transpose(1, 2).unflatten(2, (side, side)), n)  # [B, C, n*side, n*side]
            kept = math.ceil(scale / (n * self.split) * n * side)  # the part of the grid the scale itself covers
            maps.append(_resize(_resize(f, kept, "area"), side, "area"))  # [B, C, side, side]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)  # [B, side*side, C * len(scales)]
