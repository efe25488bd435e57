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

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from polyfocus.config import CLIP_CONVNEXT_L

OPEN_CLIP_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
# timm ConvNeXt (open_clip's `visual.trunk`) → transformers' ConvNextModel; the head is not used (MG-LLaVA drops it).
OPEN_CLIP_TO_CONVNEXT = (
    (r"^visual\.trunk\.stem\.0\.", "embeddings.patch_embeddings."),
    (r"^visual\.trunk\.stem\.1\.", "embeddings.layernorm."),
    (r"^visual\.trunk\.stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
    (r"^visual\.trunk\.stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
)


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

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
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


# ---- the high-resolution tower ---------------------------------------------------------------------------------


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


def open_clip_to_convnext(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP-ConvNeXt state dict → transformers ConvNextModel keys (the trunk only; the head, the text
    tower and the projection are dropped, as MG-LLaVA drops them)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in OPEN_CLIP_TO_CONVNEXT:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new] = value
                break
    return out


def convnext_config_of(state: dict[str, torch.Tensor]):
    """The ConvNextConfig that a ConvNeXt state dict (transformers names) was made with: depths, widths, patch."""
    from transformers import ConvNextConfig

    blocks: dict[int, set[int]] = {}
    for key in state:
        match = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    stages = sorted(blocks)
    widths = [state[f"encoder.stages.{i}.layers.0.dwconv.weight"].shape[0] for i in stages]
    patch = state["embeddings.patch_embeddings.weight"].shape[-1]
    return ConvNextConfig(**{**CLIP_CONVNEXT_L, "num_stages": len(stages), "depths": [len(blocks[i]) for i in stages],
                             "hidden_sizes": widths, "patch_size": patch})


def load_hires_tower(path: str | os.PathLike, config=None) -> nn.Module:
    """A local high-resolution tower: a transformers ConvNeXt directory (config.json + weights), or open_clip's
    CLIP-ConvNeXt weights (a directory holding open_clip_pytorch_model.bin / open_clip_model.safetensors, as on the
    hub, or that file). `config`: the ConvNextConfig the open_clip weights must fit (None: read off the weights,
    e.g. depths 3/3/27/3 and widths 192...1536 for CLIP-ConvNeXt-L)."""
    from transformers import AutoModel, ConvNextModel

    path = Path(path)
    if (path / "config.json").is_file():
        return AutoModel.from_pretrained(path)
    file = path if path.is_file() else next((path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{path}: no high-resolution tower here: expected a transformers ConvNeXt directory "
                                f"(config.json) or open_clip weights ({' / '.join(OPEN_CLIP_WEIGHTS)})")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    state = open_clip_to_convnext(state.get("state_dict", state))
    if not state:
        raise ValueError(f"{file}: no open_clip ConvNeXt trunk weights (visual.trunk.stem.* / visual.trunk.stages.*)")
    tower = ConvNextModel(config if config is not None else convnext_config_of(state))
    result = tower.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("layernorm.")]  # the pooled head norm: unused
    if missing or result.unexpected_keys:
        raise ValueError(f"{file}: the weights do not match the ConvNeXt config: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    return tower
