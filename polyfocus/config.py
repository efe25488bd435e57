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
        fusion: None (plain LLaVA) or "mmfuser" (polyfocus/model/fusion, docs/mmfuser.md): the selected layer
            (`mm_vision_select_layer`, a single index: the query) is refined by deformable attention over shallower
            layers of the tower before the projector; an identity at initialisation.
        mmfuser_kv_layers: the hidden-state indices MMFuser's query attends to (its key/value levels), all below the
            query; None: up to 4 at an even stride below it (CLIP-L/336 with -2: 3, 8, 13, 18, the reference's).
        mmfuser_num_heads / mmfuser_num_points: deformable attention heads (must divide the tower's width) and
            sampling points per head and level (the reference: 16 and 4).
        image_aspect_ratio: "pad" (LLaVA-1.5 finetune/eval), "square" (resize + centre crop), "resize".
        tokenizer_padding_side / tokenizer_model_max_length: as LLaVA writes them at train time.
        mm_vision_tower: where the tower's weights came from (a local path); informative only.
        visual_words: VW-LMM (polyfocus/model/visual_words.py): a head `vm_head` maps each projected visual token to a
            distribution over the vocabulary, and training adds a KL term at image positions to the text loss.
        vw_loss_weight: weight of that KL term (the reference: 1).
        vw_kl_direction: "forward" KL(visual word || LM), the reference's active code; "reverse" KL(LM || visual word).
        vw_detach_target: stop the gradient through the KL's reference distribution (the reference detaches nothing).
        pseudo_image_features: VW-LMM's PIF: splice softmax(vm_head(features)) @ embed_tokens instead of the features.
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
    fusion: str | None = None
    mmfuser_kv_layers: list[int] | None = None
    mmfuser_num_heads: int = 16
    mmfuser_num_points: int = 4
    image_aspect_ratio: Literal["pad", "square", "resize"] = "pad"
    tokenizer_padding_side: Literal["right", "left"] = "right"
    tokenizer_model_max_length: int | None = 2048
    mm_vision_tower: str | None = None
    tie_word_embeddings: bool = False
    visual_words: bool = False
    vw_loss_weight: float = 1.0
    vw_kl_direction: Literal["forward", "reverse"] = "forward"
    vw_detach_target: bool = False
    pseudo_image_features: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for field, allowed in (("mm_vision_select_feature", ("patch", "cls_patch")),
                               ("image_aspect_ratio", ("pad", "square", "resize")),
                               ("tokenizer_padding_side", ("right", "left")),
                               ("vw_kl_direction", ("forward", "reverse"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        n_states = self.vision_config.num_hidden_layers + 1  # embeddings + every layer
        if not self.select_layers or not all(-n_states <= i < n_states for i in self.select_layers):
            raise ValueError(f"mm_vision_select_layer {self.mm_vision_select_layer!r}: the tower has {n_states} "
                             f"hidden states (indices {-n_states}..{n_states - 1})")
        if self.mm_vision_select_feature == "cls_patch" and not self.vision_has_cls:
            raise ValueError(f"mm_vision_select_feature='cls_patch' needs a tower with a CLS token; "
                             f"{self.vision_config.model_type} has none")
        self._check_fusion()
        if self.pseudo_image_features and not self.visual_words:
            raise ValueError("pseudo_image_features needs visual_words (PIF is built from the visual-word head)")
        # A composite config stores tying at the top level; follow the LM's own choice.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)

    @property
    def vision_has_cls(self) -> bool:
        return self.vision_config.model_type in TOWERS_WITH_CLS

    @property
    def select_layers(self) -> list[int]:
        layer = self.mm_vision_select_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def _check_fusion(self) -> None:
        if self.fusion not in (None, "mmfuser"):
            raise ValueError(f"fusion must be None or 'mmfuser', got {self.fusion!r}")
        if self.fusion is None:
            if (self.mmfuser_kv_layers, self.mmfuser_num_heads, self.mmfuser_num_points) != (None, 16, 4):
                raise ValueError("mmfuser_kv_layers / mmfuser_num_heads / mmfuser_num_points are set but fusion is "
                                 "None: add fusion='mmfuser'")
            return
        self.mmfuser_layers()
        width = self.vision_config.hidden_size
        if self.mmfuser_num_heads < 1 or width % self.mmfuser_num_heads:
            raise ValueError(f"mmfuser_num_heads={self.mmfuser_num_heads} must divide the vision tower's width {width}")
        if self.mmfuser_num_points < 1:
            raise ValueError(f"mmfuser_num_points must be at least 1, got {self.mmfuser_num_points}")

    def mmfuser_layers(self) -> tuple[int, list[int]]:
        """MMFuser's (query layer, key/value layers) as absolute hidden-state indices (0: the embeddings, k: block k).

        The query is `mm_vision_select_layer`, the layer the plain model reads, so that the fuser (an identity at
        init) starts as the plain model. Default key/values: up to 4 layers below the query at an even stride,
        the deepest one stride below it; CLIP-L/336 with -2 (query 23) gives 3, 8, 13, 18, the reference's
        `list-22/-17/-12/-7/-2`, and a 3-layer tower (query 2) gives 0, 1.
        """
        n_states = self.vision_config.num_hidden_layers + 1
        if not isinstance(self.mm_vision_select_layer, int):
            raise ValueError(f"fusion='mmfuser' refines one layer, the query: mm_vision_select_layer must be a single "
                             f"index (LLaVA-1.5: -2), got {self.mm_vision_select_layer!r}; the shallower layers it "
                             "attends to go in mmfuser_kv_layers")
        query = self.mm_vision_select_layer % n_states
        if self.mmfuser_kv_layers is None:
            n_levels = min(4, query)
            if n_levels == 0:
                raise ValueError("fusion='mmfuser': the query layer (mm_vision_select_layer) is the embeddings; "
                                 "there is no shallower layer to attend to")
            stride = query // n_levels
            return query, [query - stride * (n_levels - i) for i in range(n_levels)]
        kv = self.mmfuser_kv_layers
        if not isinstance(kv, (list, tuple)) or not kv or not all(
                isinstance(i, int) and -n_states <= i < n_states for i in kv):
            raise ValueError(f"mmfuser_kv_layers {kv!r}: a non-empty list of hidden-state indices; the tower has "
                             f"{n_states} (indices {-n_states}..{n_states - 1})")
        kv = [i % n_states for i in kv]
        if len(set(kv)) != len(kv) or max(kv) >= query:
            raise ValueError(f"mmfuser_kv_layers {self.mmfuser_kv_layers!r} (absolute {kv}) must be distinct layers "
                             f"below the query layer {query} (mm_vision_select_layer {self.mm_vision_select_layer})")
        return query, kv

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
