"""Fusion modules: what sits between the vision tower and the projector (`config.fusion`).

One interface: `fusion(tower) -> features [B, N, C]`, where `tower` is model/vision.py's `TowerOutputs` (the images,
the tower's hidden states, LLaVA's selected features, MG-LLaVA's high-resolution stages, each computed on first use)
and the features are what the projector reads in place of the plain selection. A new fusion is a module here with
`from_config(config)` and that forward, one line in FUSIONS, and its config fields (polyfocus/config.py).

The model holds the module as `mm_fusion` (so training treats it as the "fusion" part: its own learning rate
`mm_fusion_lr`, trained in both stages); `None` is the plain LLaVA path.
"""

from __future__ import annotations

from torch import nn

from polyfocus.config import FUSION_NAMES
from polyfocus.model.fusion.convgate import ConvGate
from polyfocus.model.fusion.deformable_attention import MultiScaleDeformableAttention
from polyfocus.model.fusion.mmfuser import MMFuser
from polyfocus.model.fusion.s2 import S2MultiScale

FUSIONS = {
    "mmfuser": MMFuser,  # MMFuser: the selected layer refined with shallower ones (deformable attention)
    "s2": S2MultiScale,  # LLaVA-S2: the tower on tiles of several scales; no parameters
    "convgate": ConvGate,  # MG-LLaVA: the high-resolution tower's last stage, gated into the features
}
assert tuple(FUSIONS) == FUSION_NAMES, "config.FUSION_NAMES lists the fusions the config accepts"
# Modules whose initialisation is their own `_reset_parameters` (PolyfocusPreTrainedModel._init_weights calls it,
# also for weights missing from a checkpoint).
FUSION_MODULES = (MMFuser, MultiScaleDeformableAttention, ConvGate)


def build_fusion(config) -> nn.Module | None:
    return None if config.fusion is None else FUSIONS[config.fusion].from_config(config)
