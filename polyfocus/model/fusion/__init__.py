"""Fusion modules: what sits between the vision tower and the projector (`config.fusion`).

One interface: `fusion(tower) -> features [B, N, C]`, where `tower` is model/vision.py's `TowerOutputs` (the images,
the tower's hidden states, LLaVA's selected features, MG-LLaVA's high-resolution stages, each computed on first use)
and the features are what the projector reads in place of the plain selection. A new fusion is a module here with
`from_config(config)` and that forward, one line in FUSIONS, and its config fields (polyfocus/config.py).

The model holds the module as `mm_fusion` (so training treats it as the "fusion" part: its own learning rate
`mm_fusion_lr`, trained in both stages); `None` is the plain LLaVA path. Several fusions ("mmfuser,convgate") are a
`FusionChain`: each module reads the features the one before it made, under its name (`mm_fusion.convgate.*`).
"""

from __future__ import annotations

import torch
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
    """None (plain LLaVA), the one fusion module (its weights named as the reference's), or the chain of several."""
    modules = {name: FUSIONS[name].from_config(config) for name in config.fusions}
    if len(modules) <= 1:
        return next(iter(modules.values()), None)
    return FusionChain(modules)


class FusionChain(nn.ModuleDict):
    """Fusions applied in order (config.fusion "mmfuser,convgate"): each reads the tower's outputs with `features`
    replaced by what the module before it made, so MMFuser's refined features are what the Conv-Gate fuses the
    high-resolution stage into. Every module is an identity at initialisation, and so is the chain."""

    def forward(self, tower) -> torch.Tensor:
        for module in self.values():
            features = module(tower)  # [B, N, C]
            tower = tower.with_features(features)
        return features
