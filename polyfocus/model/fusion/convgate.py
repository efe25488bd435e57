"""MG-LLaVA's high-resolution branch and its Conv-Gate fusion (Zhao et al. 2024, arXiv 2406.17770; spec mg_llava.md
§1-§4). The image is processed once at the high resolution; the low-resolution tower sees a bilinear downsample of it.

    pixel_values                         [B, 3, 768, 768]   (pad to square, bicubic 768, CLIP-normalised)
    low  = interpolate(pixel_values, 336)                   [B, 3, 336, 336]   bilinear, align_corners=False
    E_L  = CLIP(low).hidden_states[-2][:, 1:]               [B, 576, 1024]     the plain model's feature
    s_0..s_3 = ConvNeXt(pixel_values)                       [B, 192, 192, 192] ... [B, 1536, 24, 24]   (frozen)
    E_F  = ConvGate(E_L, s_3)                               [B, 576, 1024]     768 / 32 = 24 = 336 / 14: same grid

The ConvNeXt is transformers' `ConvNextModel` (open_clip's CLIP-ConvNeXt-L-d-320 trunk is timm's ConvNeXt, whose
weights map onto it by name: `open_clip_to_convnext`). ConvGate, one scalar gate per image:

    h   = slow_proj(gelu(slow_conv(s_3)))                   1x1 convs 1536 → 1536 → 1024   [B, 576, 1024]
    l   = E_L + fast_proj(gelu(fast_conv(E_L as a grid)))    depthwise 7x7, then 1x1        [B, 576, 1024]
    g   = gate(cat(l, h).mean over tokens)                  Linear(2048, 512) GELU Linear(512, 1)   [B, 1]
    E_F = l + tanh(g) * h

slow_proj and fast_proj start at zero, so E_F == E_L exactly: at initialisation the model is the plain model.
Attribute names are the reference's (`DualPathFuseModule`), so its weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


class ConvGate(nn.Module):
    def __init__(self, low_dim: int, high_dim: int, grid: tuple[int, int]):
        """low_dim: the low-resolution features' width (CLIP-L: 1024); high_dim: the ConvNeXt's last stage (1536);
        grid: (H, W) of the shared token grid (24 x 24)."""
        super().__init__()
        self.grid = tuple(grid)
        self.slow_conv = nn.Conv2d(high_dim, high_dim, 1)
        self.slow_proj = nn.Conv2d(high_dim, low_dim, 1)
        self.fast_conv = nn.Conv2d(low_dim, low_dim, 7, padding=3, groups=low_dim)
        self.fast_proj = nn.Conv2d(low_dim, low_dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * low_dim, low_dim // 2), nn.GELU(), nn.Linear(low_dim // 2, 1))
        self._reset_parameters()

    @classmethod
    def from_config(cls, config) -> ConvGate:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return cls(config.mm_hidden_size, config.hires_config.hidden_sizes[-1], (side, side))

    def _reset_parameters(self):
        """The reference's init: Xavier convs with zero bias, zero projections (the identity), PyTorch's default for
        the gate's Linears. transformers' `init` functions leave tensors loaded from a checkpoint alone."""
        for conv in (self.slow_conv, self.fast_conv):
            init.xavier_uniform_(conv.weight)
            init.zeros_(conv.bias)
        for conv in (self.slow_proj, self.fast_proj):
            init.zeros_(conv.weight)
            init.zeros_(conv.bias)
        for linear in (self.gate[0], self.gate[2]):  # nn.Linear.reset_parameters, through `init`
            init.kaiming_uniform_(linear.weight, a=5 ** 0.5)
            bound = 1 / linear.in_features ** 0.5
            init.uniform_(linear.bias, -bound, bound)

    def forward(self, tower) -> torch.Tensor:
        """The tower's selected features, fused with the high-resolution tower's last stage (model/vision.py's
        TowerOutputs) → [B, H*W, C_L]."""
        return self.fuse(tower.features, tower.hires_stages[-1])

    def fuse(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """low [B, H*W, C_L] (tokens, row-major), high [B, C_H, H, W] → fused tokens [B, H*W, C_L]."""
        height, width = self.grid
        if low.shape[1] != height * width or tuple(high.shape[-2:]) != (height, width):
            raise ValueError(f"ConvGate fuses a {height}x{width} grid: got {low.shape[1]} low-resolution tokens and a "
                             f"{tuple(high.shape[-2:])} high-resolution map; the high-resolution image must be "
                             "config.hires_image_size")
        batch, _, channels = low.shape
        dtype = self.slow_conv.weight.dtype
        h = self.slow_proj(F.gelu(self.slow_conv(high.to(dtype)))).flatten(2).transpose(1, 2)  # [B, H*W, C_L]
        grid = low.to(dtype).transpose(1, 2).reshape(batch, channels, height, width)
        grid = grid + self.fast_proj(F.gelu(self.fast_conv(grid)))
        l = grid.flatten(2).transpose(1, 2)  # [B, H*W, C_L]
        gate = self.gate(torch.cat([l, h], dim=-1).mean(dim=1))[:, None, :]  # [B, 1, 1]: one scalar per image
        return l + gate.tanh() * h
