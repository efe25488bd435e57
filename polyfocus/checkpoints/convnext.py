"""MG-LLaVA's ConvNeXt weights: a transformers ConvNeXt directory, or open_clip's CLIP-ConvNeXt (the
CLIP-ConvNeXt-L-d-320 MG-LLaVA freezes), whose timm trunk maps onto transformers' `ConvNextModel` by name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from polyfocus.config import CLIP_CONVNEXT_L
from polyfocus.data.files import require_local

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

    path = Path(require_local(path, "hires_tower", directory=False))
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
