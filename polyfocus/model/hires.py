"""MG-LLaVA's high-resolution tower: a transformers ConvNeXt that sees the image at `config.hires_image_size`, whose
four stage outputs feed the Conv-Gate (the last stage, fusion/convgate.py) and the object tokens (all four,
objects.py); and the low-resolution tower's input, made from the same high-resolution tensor.

Its weights load from a transformers ConvNeXt directory or open_clip's CLIP-ConvNeXt
(polyfocus/checkpoints/convnext.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_hires_tower(config) -> nn.Module:
    from transformers import AutoModel

    # A ConvNeXt has no attention: the sdpa / flash setting a checkpoint is loaded with does not apply to it.
    return AutoModel.from_config(config.hires_config, attn_implementation="eager")


def hires_stages(tower: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The ConvNeXt's four stage outputs [B, C_s, H/4/2^s, W/4/2^s] (its hidden states after the stem). Run without
    autograd when the tower is frozen (MG-LLaVA's `optimize_vision_tower_aux=False`)."""
    dtype = next(tower.parameters()).dtype
    trains = any(p.requires_grad for p in tower.parameters()) and torch.is_grad_enabled()
    with torch.set_grad_enabled(trains):
        return list(tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states[1:])


def low_res_pixels(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """The low-resolution tower's input: the normalised high-resolution tensor, downsampled bilinearly (no
    antialias), as MG-LLaVA makes it; not a second bicubic resize of the image."""
    if pixel_values.shape[-1] == size and pixel_values.shape[-2] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
