"""Fusion modules: what sits between the vision tower's hidden states and the projector (`config.fusion`).

The model holds the module as `mm_fusion` (so training treats it as the "fusion" part: its own learning rate
`mm_fusion_lr`, trained in both stages); `None` is the plain LLaVA path.
"""

from __future__ import annotations

from torch import nn

from polyfocus.model.fusion.convgate import ConvGate
from polyfocus.model.fusion.deformable_attention import MultiScaleDeformableAttention
from polyfocus.model.fusion.mmfuser import MMFuser
from polyfocus.model.fusion.s2 import S2MultiScale

FUSIONS = ("mmfuser", "s2", "convgate")
# Modules whose initialisation is their own `_reset_parameters` (PolyfocusPreTrainedModel._init_weights calls it,
# also for weights missing from a checkpoint).
FUSION_MODULES = (MMFuser, MultiScaleDeformableAttention, ConvGate)


def build_fusion(config) -> nn.Module | None:
    if config.fusion is None:
        return None
    if config.fusion == "mmfuser":
        return MMFuser.from_config(config)
    if config.fusion == "s2":  # no parameters: it runs the tower itself, on tiles of several scales
        return S2MultiScale.from_config(config)
    if config.fusion == "convgate":  # MG-LLaVA: the high-resolution tower's last stage, gated into the features
        return ConvGate.from_config(config)
    raise ValueError(f"unknown fusion {config.fusion!r}: use one of {FUSIONS} or None")
