"""The vision side before the projector: the tower (any transformers vision model that returns hidden states: CLIP,
SigLIP, ...), LLaVA's feature selection, and `TowerOutputs`, what every fusion module reads."""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from functools import cached_property

import torch
from torch import nn
from transformers import AutoModel

from polyfocus.config import PolyfocusConfig
from polyfocus.model.hires import hires_stages, low_res_pixels


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


class TowerOutputs:
    """A batch of images as the fusion modules see it (`fusion(tower) -> features`). Each part is computed on first
    use, so a module pays only for what it reads:

        pixel_values   [B, 3, S, S]      what the model was given (S = config.image_input_size), in the tower's dtype
        hires_stages   4 x [B, C_s, h_s, w_s]   MG-LLaVA's ConvNeXt on pixel_values; None without that branch
        hidden_states  (B x T x C, ...)  the tower's, on the tower-sized image (with MG-LLaVA's branch: pixel_values
                                         downsampled; MMFuser reads these)
        features       [B, N, C]         LLaVA's selection of them: what the projector reads without fusion
        select(x)      [n, N, C]         the selected features of other tower-sized images (S2 runs the tower on tiles)
    """

    def __init__(self, config: PolyfocusConfig, vision_tower: nn.Module, hires_tower: nn.Module | None,
                 pixel_values: torch.Tensor, cache: FeatureCache | None = None):
        """cache: `features` (and whatever else goes through `per_image`) are read from it, and the images it lacks
        computed and added, while the tower is frozen (its features cannot change)."""
        self.config, self.vision_tower, self.hires_tower, self.cache = config, vision_tower, hires_tower, cache
        self.pixel_values = pixel_values.to(next(vision_tower.parameters()).dtype)

    @cached_property
    def hires_stages(self) -> list[torch.Tensor] | None:
        if self.hires_tower is None:
            return None
        size = self.config.hires_image_size
        if tuple(self.pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"the high-resolution branch takes {size}x{size} images (config.hires_image_size), "
                             f"got {tuple(self.pixel_values.shape[-2:])}: use the model's image processor")
        return hires_stages(self.hires_tower, self.pixel_values)  # stride 4 (stem) x 2^s

    @cached_property
    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        pixels = self.pixel_values
        if self.hires_tower is not None:  # the tower sees the high-resolution image downsampled (MG-LLaVA)
            self.hires_stages  # noqa: B018 - checks the size first, with the message that names it
            pixels = low_res_pixels(pixels, self.config.vision_config.image_size)
        return self.vision_tower(pixels, output_hidden_states=True).hidden_states

    @cached_property
    def cached(self) -> bool:
        """Features come from the cache: there is one, and no gradient can reach the tower (it is frozen, as training
        with the cache requires, or gradients are off, as in a Pipeline); whoever sets the cache keeps the tower's
        weights unchanged while it lives."""
        return self.cache is not None and (not torch.is_grad_enabled()
                                           or not any(p.requires_grad for p in self.vision_tower.parameters()))

    @cached_property
    def features(self) -> torch.Tensor:
        return self.per_image("", lambda part: select_features(self.config, part.hidden_states))

    def with_features(self, features: torch.Tensor) -> TowerOutputs:
        """These outputs with `features` replaced (a fusion chain's next module reads what the one before it made);
        everything computed so far is shared, not recomputed."""
        other = copy.copy(self)
        other.__dict__["features"] = features  # the cached_property's slot
        return other

    def states(self, layers: list[int]) -> torch.Tensor:
        """The tower's hidden states `layers`, stacked [B, len(layers), T, C]: through the cache as `features` when the
        tower is frozen (MMFuser reads these: without the cache a frozen tower would run in full at every step)."""
        return self.per_image(f"hidden states {layers}", lambda part: torch.stack(
            [part.hidden_states[layer] for layer in layers], dim=1))

    def per_image(self, tag: str, compute: Callable[[TowerOutputs], torch.Tensor]) -> torch.Tensor:
        """compute(outputs) -> [B, ...], through the cache when there is one (tag: what it is, part of the key). compute
        must give each image a row that its pixels alone decide through the frozen tower, with nothing trainable
        (hidden states, a parameter-free fusion's output): a cached row is computed once, without gradients."""
        if not self.cached:
            return compute(self)

        def missing(index):
            return compute(TowerOutputs(self.config, self.vision_tower, self.hires_tower, self.pixel_values[index]))

        with torch.no_grad():
            return self.cache.features(self.pixel_values, missing, tag=tag)

    def select(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, s, s] tower-sized images → their selected features [n, N, C] (S2 runs the tower on tiles: it caches
        its fused output per image instead, `per_image`)."""
        return select_features(self.config, self.vision_tower(pixel_values, output_hidden_states=True).hidden_states)


class TensorLRU:
    """Key -> tensor, at most `capacity_bytes` of them, the least recently used dropped first. The server keeps recent
    images' visual tokens in one (infer/continuous.py); `FeatureCache` below is one for a tower's features."""

    def __init__(self, capacity_bytes: int):
        self.capacity, self.size, self.hits, self.misses = capacity_bytes, 0, 0, 0
        self.entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.capacity:
            return
        self.entries[key] = value
        self.size += size
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= old.numel() * old.element_size()


class FeatureCache(TensorLRU):
    """What a frozen tower gives recently seen images (TowerOutputs.per_image: the selected features, S2's fused map,
    the hidden states MMFuser reads), keyed by the processed pixels (a hash of the tensor's bytes, its shape and dtype)
    and a tag. Exact: the same pixels through a frozen tower give the same features (up to the float noise of another
    batch shape).

    Training with a frozen tower (`polyfocus train --cache_vision_features true`) computes each image's features
    once instead of once per epoch and step."""

    def __init__(self, capacity_bytes: int = 2 * 2**30):
        super().__init__(capacity_bytes)
        self.settings: str | None = None  # what decides a row besides the pixels (`bind`)

    def bind(self, config: PolyfocusConfig) -> None:
        """Tie the cache to the model's feature settings (the tower's config, the selected layers, the input and S2's
        sizes): a cache handed on to another run (the demo's stage 2, on stage 1's images) is refused there when they
        differ. The tower's weights are the caller's to keep the same: a stage-2 run from the stage-1 checkpoint."""
        fields = ("mm_vision_select_layer", "mm_vision_select_feature", "image_input_size", "s2_scales",
                  "hires_image_size")
        tower = {k: v for k, v in config.vision_config.to_dict().items()  # not where it was read from, nor its dtype
                 if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}  # (the keys hold it)
        settings = repr([tower, *(getattr(config, f, None) for f in fields)])
        if self.settings is not None and settings != self.settings:
            raise ValueError("this feature cache holds another model's features (the tower, the selected layers or "
                             "the image sizes differ): use a new one")
        self.settings = settings

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(f"{tuple(data.shape)}{data.dtype}".encode(), digest_size=20)
        digest.update(memoryview(data.view(torch.uint8).numpy()))  # the bytes in place: no copy
        return digest.digest()

    def features(self, pixel_values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                 tag: str = "") -> torch.Tensor:
        """[n, 3, S, S] → [n, ...]: cached rows, and `compute(index of the missing images)` for the rest. tag: which
        per-image output it is ("" the selected features; S2's fused map, MMFuser's hidden states), part of the key."""
        keys = [self.key(image) + tag.encode() for image in pixel_values]
        found = [self.get(k) for k in keys]
        missing = {}  # key -> the first index with it: an image twice in the batch is computed once
        for i, value in enumerate(found):
            if value is None:
                missing.setdefault(keys[i], i)
        if missing:
            computed = compute(torch.tensor(list(missing.values()), device=pixel_values.device))
            rows = {key: row.detach().clone() for key, row in zip(missing, computed)}
            for key, row in rows.items():
                self.put(key, row)
            found = [rows[k] if value is None else value for k, value in zip(keys, found)]
        # Rows stay where they were computed: a training run's calibration fills the cache before the Trainer moves
        # the model to the GPU, a Pipeline's model may be moved after.
        return torch.stack([row.to(pixel_values.device) for row in found])
