"""Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021) in pure PyTorch: no compiled op, runs on CPU.

Each query predicts, per head m, level l and point p, a sampling offset (dx, dy) around its reference point and an
attention weight; the output is the weighted sum of the bilinearly sampled values. Parameterisation and
initialisation are Deformable-DETR's `MSDeformAttn` (spec mmfuser.md §5); the sampling rule is its CUDA kernel's
(§6): locations are (x, y) in [0, 1] with 0 and 1 the outer edges of the map, pixel centres at (i + 0.5) / size,
and corners outside the map read zeros.

The sampling is written as one `F.embedding_bag`: every (query, head) output is a weighted sum of L·P·4 rows of the
value table (4 bilinear corners per sample), which embedding_bag computes without materialising the samples, and
whose backward gives the gradients of the values and of the weights. It is 3x faster (forward+backward) than
Deformable-DETR's grid_sample formulation (`deformable_sample_grid_sample`, kept as the reference the tests and
bench/deformable_attention.py compare against), and needs no permute of the values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

# Offsets of the 4 bilinear corners from (floor(x), floor(y)): (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1).
CORNER_DX = (0, 1, 0, 1)
CORNER_DY = (0, 0, 1, 1)


def centre_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Reference points at the pixel centres of a height x width map: [1, H*W, 1, 2] as (x, y) in (0, 1), row-major
    (x varies fastest), which is the token order of a ViT's patch sequence."""
    y, x = torch.meshgrid(
        (torch.arange(height, device=device, dtype=dtype) + 0.5) / height,
        (torch.arange(width, device=device, dtype=dtype) + 0.5) / width,
        indexing="ij",
    )
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)[None, :, None, :]


def deformable_sample(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """The sampling core: for every query and head, Σ over levels l and points p of weights · bilinear(value_l, loc).

    value: [N, S, M, D], the levels' tokens concatenated row-major (S = Σ H_l·W_l); shapes: [(H_l, W_l)];
    locations: [N, Lq, M, L, P, 2] as (x, y) in [0, 1]; weights: [N, Lq, M, L, P]. Returns [N, Lq, M·D], channel
    m·D + d (head-major, as value_proj's output is split into heads).
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"value holds {S} tokens but the level shapes {shapes} give {sum(h * w for h, w in shapes)}")
    device, dtype = locations.device, locations.dtype
    height = torch.tensor([h for h, _ in shapes], device=device, dtype=dtype)[:, None]  # [L, 1]: broadcasts over P
    width = torch.tensor([w for _, w in shapes], device=device, dtype=dtype)[:, None]
    starts = torch.tensor([0] + [h * w for h, w in shapes], device=device).cumsum(0)[:-1]  # [L]

    # Pixel coordinates (align_corners=False): centre of pixel i at i + 0.5 in [0, size).
    x = locations[..., 0] * width - 0.5  # [N, Lq, M, L, P]
    y = locations[..., 1] * height - 0.5
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)  # fractional parts; they carry the location gradient
    dx = torch.tensor(CORNER_DX, device=device)
    dy = torch.tensor(CORNER_DY, device=device)
    cx, cy = x0.unsqueeze(-1) + dx, y0.unsqueeze(-1) + dy  # [N, Lq, M, L, P, 4] corner pixel columns / rows
    wx = torch.where(dx.bool(), fx, 1 - fx)
    wy = torch.where(dy.bool(), fy, 1 - fy)
    h_l, w_l = height[..., None], width[..., None]  # [L, 1, 1]
    inside = (cx >= 0) & (cx < w_l) & (cy >= 0) & (cy < h_l)  # zero padding: outside corners contribute nothing
    # (a product, not a masked fill: a NaN location stays NaN downstream, as in grid_sample, so AMP can skip the step)
    corner_weights = weights.unsqueeze(-1) * wx * wy * inside

    with torch.no_grad():  # row of value.view(N*S*M, D) that each corner reads (clamped: outside ones weigh 0)
        col = torch.minimum(cx.clamp(min=0), w_l - 1).nan_to_num()
        row = torch.minimum(cy.clamp(min=0), h_l - 1).nan_to_num()
        token = starts[:, None, None] + (row * w_l + col).long()  # index into S
        n = torch.arange(N, device=device).view(N, 1, 1, 1, 1, 1)
        m = torch.arange(M, device=device).view(1, 1, M, 1, 1, 1)
        rows = (n * S + token) * M + m  # [N, Lq, M, L, P, 4]

    # One bag per (n, query, head): the L·P·4 weighted corner rows, summed.
    out = F.embedding_bag(rows.reshape(-1, L * P * 4), value.reshape(N * S * M, D),
                          per_sample_weights=corner_weights.reshape(-1, L * P * 4).to(value.dtype), mode="sum")
    return out.view(N, Lq, M * D)


def deformable_sample_grid_sample(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                                  weights: torch.Tensor) -> torch.Tensor:
    """Deformable-DETR's pure-PyTorch core (`ms_deform_attn_core_pytorch`): one grid_sample per level. Same inputs
    and output as `deformable_sample`; the reference that tests and bench/deformable_attention.py check against."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grid = 2 * locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        image = per_level[level].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        level_grid = grid[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(image, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).reshape(N * M, D, Lq, L * P)  # [N*M, D, Lq, L*P]
    w = weights.permute(0, 2, 1, 3, 4).reshape(N * M, 1, Lq, L * P)
    return (stacked * w).sum(-1).reshape(N, M * D, Lq).transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Deformable-DETR's `MSDeformAttn` (same parameter names, so reference checkpoints load by name)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"deformable attention: {num_heads} heads do not divide the width {dim}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)  # (dx, dy) in pixels of level l
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self):
        """Deformable-DETR's init. transformers' `init` functions skip tensors already loaded from a checkpoint,
        so from_pretrained initialises only what is missing."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        init.zeros_(self.sampling_offsets.weight)
        # The "star": head m samples 1..P cells away along its own direction θ_m = 2πm/M (on the L∞ unit square),
        # the same at every level.
        theta = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
        direction = torch.stack([theta.cos(), theta.sin()], -1)  # [M, 2] as (dx, dy)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        distance = torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        star = direction.view(M, 1, 1, 2).expand(M, L, P, 2) * distance  # [M, L, P, 2]
        init.copy_(self.sampling_offsets.bias, star.reshape(-1).to(self.sampling_offsets.bias))
        init.zeros_(self.attention_weights.weight)  # uniform attention over the L·P samples at init
        init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            init.xavier_uniform_(linear.weight)
            init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [N, Lq, C]; reference_points [N or 1, Lq, L or 1, 2] as (x, y) in [0, 1]; memory [N, S, C], the
        levels' tokens concatenated (S = Σ H_l·W_l); shapes [(H_l, W_l)] → [N, Lq, C]."""
        N, Lq, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != L:
            raise ValueError(f"deformable attention built for {L} levels, given {len(shapes)}")
        # The sampling runs in fp32 (fp64 for a float64 module), as the reference casts before its kernel; the
        # linears follow the module's dtype.
        compute = torch.promote_types(query.dtype, torch.float32)
        value = self.value_proj(memory).view(N, memory.shape[1], M, self.dim // M).to(compute)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2).to(compute)
        # One softmax over all L·P samples of a head, across levels and points together.
        weights = self.attention_weights(query).view(N, Lq, M, L * P).to(compute).softmax(-1).view(N, Lq, M, L, P)
        # Offsets are in pixels of their level: divide by (W, H), which matches (x, y).
        size = torch.tensor([(w, h) for h, w in shapes], device=query.device, dtype=compute)  # [L, 2]
        locations = reference_points.to(compute)[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        out = deformable_sample(value, shapes, locations, weights)
        return self.output_proj(out.to(self.output_proj.weight.dtype))
