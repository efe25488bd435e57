"""The model config: a vision config, a text config, and the switches that compose the model.

Field names follow LLaVA's flags (`mm_vision_select_layer`, `mm_projector_type`, ...) so that a user
of LLaVA reads them without a glossary; `convert.py` maps them to transformers' `LlavaConfig`.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# CLIP-L/336 (LLaVA-1.5's tower): the default when no vision config is given.
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}

# Vision towers whose sequence starts with a CLS token (SigLIP's has none).
TOWERS_WITH_CLS = {"clip_vision_model"}

IGNORE_INDEX = -100
# LLaVA's sentinel id for <image> (`IMAGE_TOKEN_INDEX`); used when a tokenizer has no <image> token.
LLAVA_IMAGE_TOKEN_INDEX = -200


class PolyfocusConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: config of any transformers vision tower that returns hidden states (CLIP, SigLIP).
        text_config: config of any transformers causal LM (Llama, Mistral, Qwen2, ...).
        image_token_id: id placed in `input_ids` at every visual-token position. It may lie outside the
            vocabulary (e.g. LLaVA's -200): those positions are never looked up in the embedding table.
        mm_vision_select_layer: index into the tower's hidden states (-2 = LLaVA-1.5), or a list of
            indices whose features are concatenated on the channel axis.
        mm_vision_select_feature: "patch" drops the CLS token, "cls_patch" keeps it.
        mm_projector_type: "linear", "mlp{N}x_gelu" (LLaVA-1.5: mlp2x_gelu) or "identity".
        image_aspect_ratio: "pad" (LLaVA-1.5 finetune/eval), "square" (resize + centre crop), "resize".
        tokenizer_padding_side / tokenizer_model_max_length: as LLaVA writes them at train time.
        mm_vision_tower: where the tower's weights came from (a local path); informative only.
    """

    model_type = "polyfocus"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L_336),
        "text_config": SubConfigSpec(AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    mm_vision_select_layer: int | list[int] = -2
    mm_vision_select_feature: Literal["patch", "cls_patch"] = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: Literal["pad", "square", "resize"] = "pad"
    tokenizer_padding_side: Literal["right", "left"] = "right"
    tokenizer_model_max_length: int | None = 2048
    mm_vision_tower: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for field, allowed in (("mm_vision_select_feature", ("patch", "cls_patch")),
                               ("image_aspect_ratio", ("pad", "square", "resize")),
                               ("tokenizer_padding_side", ("right", "left"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        n_states = self.vision_config.num_hidden_layers + 1  # embeddings + every layer
        if not self.select_layers or not all(-n_states <= i < n_states for i in self.select_layers):
            raise ValueError(f"mm_vision_select_layer {self.mm_vision_select_layer!r}: the tower has {n_states} "
                             f"hidden states (indices {-n_states}..{n_states - 1})")
        if self.mm_vision_select_feature == "cls_patch" and not self.vision_has_cls:
            raise ValueError(f"mm_vision_select_feature='cls_patch' needs a tower with a CLS token; "
                             f"{self.vision_config.model_type} has none")
        # A composite config stores tying at the top level; follow the LM's own choice.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)

    @property
    def vision_has_cls(self) -> bool:
        return self.vision_config.model_type in TOWERS_WITH_CLS

    @property
    def select_layers(self) -> list[int]:
        layer = self.mm_vision_select_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def mm_hidden_size(self) -> int:
        """Width of the selected vision features (channels concatenated over selected layers)."""
        return self.vision_config.hidden_size * len(self.select_layers)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens one image contributes to the LLM sequence (576 for CLIP-L/336 patches)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        keep_cls = self.vision_has_cls and self.mm_vision_select_feature == "cls_patch"
        return side * side + int(keep_cls)


AutoConfig.register("polyfocus", PolyfocusConfig)
