"""Vision tower wrapper: any transformers vision model that returns hidden states (CLIP, SigLIP)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from polyfocus.config import PolyfocusConfig


def build_vision_tower(config: PolyfocusConfig) -> nn.Module:
    return AutoModel.from_config(config.vision_config)


def select_features(config: PolyfocusConfig, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """LLaVA's feature selection: hidden_states[layer] (-2 = before the last layer, no post-LN), CLS
    dropped for "patch"; a list of layers is concatenated on channels (transformers' convention).

    hidden_states: (embeddings, layer 1, ..., layer L), each [B, T, C] → [B, N, C * n_layers]
    """
    drop_cls = config.vision_has_cls and config.mm_vision_select_feature == "patch"
    picked = [hidden_states[layer][:, 1:] if drop_cls else hidden_states[layer] for layer in config.select_layers]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
