"""Projectors from vision features to the LLM's embedding width (LLaVA's `mm_projector_type`)."""

from __future__ import annotations

import re

import torch
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


class FeatureStandardizer(nn.Module):
    """The projector's input standardised per channel: (x - mean) / std, with statistics measured on training images
    (`polyfocus train` does it before the first step: `calibrate`). Why: the features a tower hands the projector
    can be tiny and offset (DINOv2's intermediate layers: token norm ~2, channel std median 0.05, a few large constant
    channels), and a projector trained from scratch on such inputs learns slowly; standardised, any tower (DINOv2,
    SigLIP, a user's CLIP) arrives well scaled. The statistics are buffers, saved with the model; an HF export folds
    them into the projector's first Linear (exact: W((x - m) / s) + b = (W / s) x + (b - W m / s))."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("images", torch.zeros((), dtype=torch.long))  # how many images the statistics came from

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean.to(features.dtype)) / self.std.to(features.dtype)

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor, n_images: int, eps: float = 1e-6) -> None:
        """features [..., dim]: every token of `n_images` images; statistics in float64."""
        flat = features.reshape(-1, features.shape[-1]).double()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp(min=eps))
        self.images.fill_(n_images)


def fold_standardizer(linear: nn.Linear, standardizer: FeatureStandardizer) -> nn.Linear:
    """A Linear that computes linear(standardizer(x)) in one step."""
    weight = linear.weight.double() / standardizer.std.double()
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                       dtype=linear.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(weight)
        bias = linear.bias.double() if linear.bias is not None else torch.zeros(linear.out_features).double()
        folded.bias.copy_(bias - weight @ standardizer.mean.double())
    return folded
