"""Projectors from vision features to the LLM's embedding width (LLaVA's `mm_projector_type`)."""

from __future__ import annotations

import re

from torch import nn


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """linear | mlp{N}x_gelu | identity, with LLaVA's module indices (mlp2x_gelu: 0=Linear, 1=GELU, 2=Linear)
    so that original checkpoints' `model.mm_projector.{0,2}.*` keys load unchanged."""
    if projector_type == "linear":
        return nn.Linear(in_features, out_features)
    if projector_type == "identity":
        if in_features != out_features:
            raise ValueError(f"identity projector needs equal widths, got vision {in_features} vs text {out_features}")
        return nn.Identity()
    match = re.fullmatch(r"mlp([1-9]\d*)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}: use linear, mlpNx_gelu or identity")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]  # exact (erf) GELU, as LLaVA
    return nn.Sequential(*layers)
