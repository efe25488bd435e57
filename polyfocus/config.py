"""The model config: a vision config, a text config, and the switches that compose the model.

Field names follow LLaVA's flags (`mm_vision_select_layer`, `mm_projector_type`, ...) so that a user
of LLaVA reads them without a glossary; `convert.py` maps them to transformers' `LlavaConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# open_clip's CLIP-ConvNeXt-L-d-320 trunk (timm convnext_large): MG-LLaVA's high-resolution tower, as a ConvNextConfig.
CLIP_CONVNEXT_L = {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536], "patch_size": 4,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-6, "drop_path_rate": 0.0}
BOX_LIMIT_MODES = ("per_category", "per_image")
BOX_POOL_PRECISIONS = ("fp32", "reference")  # box pooling: all in fp32, or MG-LLaVA's own casts
FUSION_NAMES = ("mmfuser", "s2", "convgate")  # config.fusion's values (polyfocus/model/fusion: one module each)

# Vision towers whose sequence starts with a CLS token (SigLIP's has none; DINOv2 without registers has one).
TOWERS_WITH_CLS = {"clip_vision_model", "dinov2"}

IGNORE_INDEX = -100
# LLaVA's sentinel id for <image> (`IMAGE_TOKEN_INDEX`); used when a tokenizer has no <image> token.
LLAVA_IMAGE_TOKEN_INDEX = -200


# ---- the methods, in two tables -------------------------------------------------------------------------------------
# What a method adds to the model is read from these two tables by everything that must know it: the training
# arguments (train/args.py), the run (train/run.py: which fields shape a new model and which any model takes),
# freezing, learning rates and the parameter summary (train/freeze.py, train/trainer.py), QLoRA (checkpoints) and the
# demo. A new method adds its fields to PolyfocusConfig and to METHOD_FIELDS, and its modules to MODEL_PARTS.

BUILD, SETTING = "build", "setting"


@dataclass(frozen=True)
class MethodField:
    """A PolyfocusConfig field as a method's switch.

    method: whose field it is; when: BUILD (it shapes the weights: set when a new model is built, from backbones or a
    model_config, and fixed after) or SETTING (a config value any model takes, a checkpoint included); type: the
    training argument's type (its default None keeps the model's value); needs: the config switch without which
    the setting would change nothing (refused, never ignored), and what that switch gives the model."""

    method: str
    when: str
    type: object
    help: str
    needs: tuple[str, str] | None = None


_VW = ("visual_words", "visual-word head")
_BOXES = ("object_tokens", "object tokens")
METHOD_FIELDS = {
    "mm_vision_select_layer": MethodField("llava", BUILD, int, "tower hidden state the projector reads (-2: LLaVA-1.5)"),
    "mm_vision_select_feature": MethodField("llava", BUILD, str, "patch (drop CLS) | cls_patch"),
    "mm_projector_type": MethodField("llava", BUILD, str, "linear | mlp2x_gelu (LLaVA-1.5) | identity"),
    "mm_standardize_features": MethodField("llava", BUILD, bool, "standardise the projector's input per channel"),
    "fusion": MethodField("fusion", BUILD, str, "between the tower and the projector: mmfuser | s2 | convgate, or "
                          "several in order (mmfuser,convgate)"),
    "mmfuser_kv_layers": MethodField("mmfuser", BUILD, list[int], "MMFuser's key/value layers (default: 4 below)"),
    "mmfuser_num_heads": MethodField("mmfuser", BUILD, int, "MMFuser's deformable attention heads (16)"),
    "mmfuser_num_points": MethodField("mmfuser", BUILD, int, "MMFuser's sampling points per head and level (4)"),
    "s2_scales": MethodField("s2", BUILD, list[int], "S2's image sides, e.g. [336, 672, 1008]"),
    "hires_config": MethodField("mg_llava", BUILD, dict | str, "ConvNextConfig keywords (YAML or JSON)"),
    "object_tokens": MethodField("mg_llava", BUILD, bool, "MG-LLaVA's one token per object box"),
    "box_feat_size": MethodField("mg_llava", BUILD, int, "RoIAlign bins per side of a box (56)"),
    "box_iou_threshold": MethodField("mg_llava", SETTING, float, "class-wise NMS IoU (0.2)", _BOXES),
    "box_limit_mode": MethodField("mg_llava", SETTING, str, "per_category | per_image", _BOXES),
    "box_limit_num": MethodField("mg_llava", SETTING, int, "cap on an image's boxes (100)", _BOXES),
    "box_detector": MethodField("mg_llava", SETTING, str, "synthworld, or a local OWLv2 / Grounding DINO directory",
                                _BOXES),
    "box_queries": MethodField("mg_llava", SETTING, list[str], "the detector's text queries (tags)", _BOXES),
    "box_pool_precision": MethodField("mg_llava", SETTING, str, "fp32 | reference: MG-LLaVA's casts in box pooling",
                                      _BOXES),
    "visual_words": MethodField("vw_lmm", SETTING, bool, "give the model a visual-word head (from its LM head)"),
    "vw_loss_weight": MethodField("vw_lmm", SETTING, float, "weight of the visual-word KL (1)", _VW),
    "vw_kl_direction": MethodField("vw_lmm", SETTING, str, "forward: KL(visual word || LM) | reverse", _VW),
    "vw_detach_target": MethodField("vw_lmm", SETTING, bool, "stop the KL's gradient through its reference", _VW),
    "pseudo_image_features": MethodField("vw_lmm", SETTING, bool, "VW-LMM's PIF: splice token-embedding mixtures",
                                         _VW),
}

# The model's parts: PolyfocusForConditionalGeneration's module -> (part, the training argument of its learning
# rate). Every parameter belongs to the part of the module it sits in; everything but the language model trains in
# full under LoRA and stays unquantized under QLoRA.
MODEL_PARTS = {
    "vision_tower": ("vision_tower", "mm_vision_tower_lr"),
    "mm_projector": ("projector", "mm_projector_lr"),
    "mm_feature_norm": ("projector", "mm_projector_lr"),  # buffers only (the statistics): nothing of it trains
    "mm_object_projector": ("projector", "mm_projector_lr"),  # MG-LLaVA's object tokens have their own projector
    "mm_fusion": ("fusion", "mm_fusion_lr"),
    "hires_tower": ("hires_tower", "mm_hires_tower_lr"),  # MG-LLaVA's ConvNeXt: frozen unless tune_hires_tower
    "vm_head": ("visual_words", "mm_visual_words_lr"),  # VW-LMM's head: trains in every stage, as the projector
    "language_model": ("language_model", None),
}


def fusion_names(fusion: str | list[str] | None) -> list[str]:
    """config.fusion as the fusion modules applied in order: [] (plain LLaVA), one name, or several
    ("mmfuser,convgate" or a list: each reads the features the one before it made)."""
    if fusion is None:
        return []
    return fusion.split(",") if isinstance(fusion, str) else list(fusion)


class PolyfocusConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: config of any transformers vision tower that returns hidden states (CLIP, SigLIP, DINOv2).
        text_config: config of any transformers causal LM (Llama, Mistral, Qwen2, ...).
        image_token_id: id placed in `input_ids` at every visual-token position. It may lie outside the
            vocabulary (e.g. LLaVA's -200): those positions are never looked up in the embedding table.
        mm_vision_select_layer: index into the tower's hidden states (-2 = LLaVA-1.5), or a list of
            indices whose features are concatenated on the channel axis.
        mm_vision_select_feature: "patch" drops the CLS token, "cls_patch" keeps it.
        mm_projector_type: "linear", "mlp{N}x_gelu" (LLaVA-1.5: mlp2x_gelu) or "identity".
        mm_standardize_features: standardise the projector's input per channel with statistics measured on training
            images (model/projector.py's FeatureStandardizer: buffers saved with the model, folded into the
            projector on an HF export). For towers whose features are tiny and offset (DINOv2's middle layers).
        fusion: None (plain LLaVA), "s2" (see s2_scales), "convgate" (see hires_config) or "mmfuser"
            (polyfocus/model/fusion, docs/mmfuser.md): the selected layer (`mm_vision_select_layer`, a single index:
            the query) is refined by deformable attention over shallower layers of the tower before the projector;
            an identity at initialisation. Several compose, applied in the order given ("mmfuser,convgate" or a
            list): each reads the features the one before it made (MMFuser first; S2 alone).
        mmfuser_kv_layers: the hidden-state indices MMFuser's query attends to (its key/value levels), all below the
            query; None: up to 4 at an even stride below it (CLIP-L/336 with -2: 3, 8, 13, 18, the reference's).
        mmfuser_num_heads / mmfuser_num_points: deformable attention heads (must divide the tower's width) and
            sampling points per head and level (the reference: 16 and 4).
        s2_scales: fusion="s2" (polyfocus/model/fusion/s2.py, docs/densefusion.md), LLaVA-S2: the image sides the tower
            looks at, in tower-sized tiles, concatenated on channels; the smallest is the tower's image_size. None: 1x,
            2x and 3x the tower's size (CLIP-L/336: 336, 672, 1008, the reference's). The model then takes images of
            the largest side (`image_input_size`) and still gives one token per patch of one tile.
        hires_config: MG-LLaVA (docs/mg_llava.md): the high-resolution tower's config (a transformers ConvNeXt; None
            with the branch on: CLIP-ConvNeXt-L). It sees the image at `hires_image_size` (its last stage on the low
            tower's patch grid: 768 px for CLIP-L/336); the low tower sees that image downsampled. Present when
            fusion="convgate" (its last stage fused into the low tower's features by a zero-initialised Conv-Gate)
            or object_tokens.
        object_tokens: MG-LLaVA's object-level tokens: one token per object box after each image's tokens, from
            the high-resolution tower's multi-stage map (RoIAlign, mean over `box_feat_size`^2 bins, an MLP).
        box_iou_threshold / box_limit_mode / box_limit_num: how an image's boxes are filtered before they become
            tokens (class-wise NMS, then a per-category or per-image cap; MG-LLaVA: 0.2, per_category, 100).
        box_detector: where boxes come from when a request or a sample brings none: "synthworld" (its pixel
            detector) or a local OWLv2 / Grounding DINO directory; box_queries: that detector's text queries.
        box_pool_precision: "fp32" (default: a box's vector is upsampled, RoIAligned and averaged in fp32, whatever
            the model's dtype) or "reference" (MG-LLaVA's own casts: the upsampled stages rounded to the tower's dtype,
            the RoIAlign bins rounded to the LLM's before their mean; slower). The same in an fp32 model; in bf16
            they differ by bench/box_pool_precision.py's figure (docs/mg_llava.md).
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
        "hires_config": SubConfigSpec(AutoConfig, model_type="convnext", init_kwargs=CLIP_CONVNEXT_L, optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    mm_vision_select_layer: int | list[int] = -2
    mm_vision_select_feature: Literal["patch", "cls_patch"] = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    mm_standardize_features: bool = False
    fusion: str | None = None
    mmfuser_kv_layers: list[int] | None = None
    mmfuser_num_heads: int = 16
    mmfuser_num_points: int = 4
    s2_scales: list[int] | None = None
    hires_config: dict | PreTrainedConfig | None = None
    object_tokens: bool = False
    box_feat_size: int = 56
    box_iou_threshold: float = 0.2
    box_limit_mode: Literal["per_category", "per_image"] = "per_category"
    box_limit_num: int | None = 100
    box_detector: str | None = None
    box_queries: list[str] | None = None
    box_pool_precision: Literal["fp32", "reference"] = "fp32"
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
        self.check()
        # A composite config stores tying at the top level; follow the LM's own choice.
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)

    def check(self) -> None:
        """Every field's value, and their combinations (ValueError naming the field). Run on creation, and again by
        whoever changes settings afterwards (train/run.py)."""
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
        self.check_mg_llava()
        vw_set = [field for field, default in (("vw_loss_weight", 1.0), ("vw_kl_direction", "forward"),
                                               ("vw_detach_target", False), ("pseudo_image_features", False))
                  if getattr(self, field) != default]
        if vw_set and not self.visual_words:  # they would change nothing: never silently ignored
            raise ValueError(f"{', '.join(vw_set)} need{'s' if len(vw_set) == 1 else ''} visual_words "
                             "(PIF and the KL are built from the visual-word head)")

    @property
    def vision_has_cls(self) -> bool:
        return self.vision_config.model_type in TOWERS_WITH_CLS

    @property
    def select_layers(self) -> list[int]:
        layer = self.mm_vision_select_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def fusions(self) -> list[str]:
        return fusion_names(self.fusion)

    def _check_fusion(self) -> None:
        fusions = self.fusions
        unknown = any(f not in FUSION_NAMES for f in fusions)
        if (self.fusion is not None and not fusions) or unknown or len(set(fusions)) != len(fusions):
            raise ValueError(f"fusion must be None, one of {' / '.join(map(repr, FUSION_NAMES))} or several of them in "
                             f"the order they apply (e.g. 'mmfuser,convgate'), got {self.fusion!r}")
        if "s2" in fusions and len(fusions) > 1:
            raise ValueError(f"fusion {self.fusion!r}: S2 runs the tower on its own image sizes and concatenates the "
                             "scales on channels; it combines with no other fusion")
        if "mmfuser" in fusions[1:]:
            raise ValueError(f"fusion {self.fusion!r}: MMFuser reads the tower's hidden states, not the features of "
                             "the fusion before it: put it first")
        if "s2" not in fusions and self.s2_scales is not None:
            raise ValueError(f"s2_scales is set but fusion is {self.fusion!r}: add fusion='s2'")
        if "s2" in fusions:
            self.s2_scale_list()
        if "mmfuser" not in fusions:
            if (self.mmfuser_kv_layers, self.mmfuser_num_heads, self.mmfuser_num_points) != (None, 16, 4):
                raise ValueError("mmfuser_kv_layers / mmfuser_num_heads / mmfuser_num_points are set but fusion is "
                                 f"{self.fusion!r}: add fusion='mmfuser'")
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

    def s2_scale_list(self) -> list[int]:
        """S2's scales, ascending (default 1x, 2x, 3x the tower's image_size); checked."""
        size = self.vision_config.image_size
        scales = [size, 2 * size, 3 * size] if self.s2_scales is None else list(self.s2_scales)
        if not scales or not all(isinstance(s, int) and s > 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"s2_scales {self.s2_scales!r}: distinct positive image sides, e.g. [336, 672, 1008]")
        if min(scales) != size:
            raise ValueError(f"s2_scales {self.s2_scales!r}: the smallest scale is the tile the tower sees and must be "
                             f"its image_size {size}")
        if self.vision_has_cls and self.mm_vision_select_feature != "patch":
            raise ValueError("fusion='s2' merges patch maps: mm_vision_select_feature must be 'patch' (as LLaVA-S2)")
        return sorted(scales)

    @property
    def uses_hires(self) -> bool:
        """MG-LLaVA's high-resolution tower is part of the model (Conv-Gate fusion or object tokens)."""
        return "convgate" in self.fusions or self.object_tokens

    @property
    def hires_image_size(self) -> int:
        """The high-resolution side: the low tower's patch grid times the ConvNeXt's total stride (24 x 32 = 768)."""
        stride = self.hires_config.patch_size * 2 ** (len(self.hires_config.hidden_sizes) - 1)
        return self.vision_config.image_size // self.vision_config.patch_size * stride

    def check_mg_llava(self) -> None:
        """MG-LLaVA's fields, checked (ValueError naming the field); the default ConvNeXt filled in when one is needed."""
        if not self.uses_hires:
            if self.hires_config is not None:
                raise ValueError("hires_config is set but nothing uses the high-resolution tower: add "
                                 "fusion='convgate' or object_tokens=True")
            defaults = (("box_feat_size", 56), ("box_iou_threshold", 0.2), ("box_limit_mode", "per_category"),
                        ("box_limit_num", 100), ("box_detector", None), ("box_queries", None),
                        ("box_pool_precision", "fp32"))
            changed = [f for f, default in defaults if getattr(self, f) != default]
            if changed:
                raise ValueError(f"{', '.join(changed)} set but object_tokens is off: add object_tokens=True")
            return
        if self.hires_config is None:
            self.hires_config = AutoConfig.for_model("convnext", **CLIP_CONVNEXT_L)
        if self.hires_config.model_type not in ("convnext", "convnextv2"):
            raise ValueError(f"hires_config must be a ConvNeXt config (MG-LLaVA's tower), got "
                             f"{self.hires_config.model_type!r}")
        hires = self.hires_config  # ConvNextModel builds num_stages stages; the sizes here follow hidden_sizes
        if not len(hires.depths) == len(hires.hidden_sizes) == hires.num_stages:
            raise ValueError(f"hires_config: depths {hires.depths} and hidden_sizes {hires.hidden_sizes} must both "
                             f"have num_stages ({hires.num_stages}) entries")
        if "s2" in self.fusions:
            raise ValueError("object_tokens with fusion='s2': S2 takes its own image sizes; use fusion None, "
                             "'convgate' or 'mmfuser' with object tokens")
        if "convgate" in self.fusions and self.vision_has_cls and self.mm_vision_select_feature != "patch":
            raise ValueError("fusion='convgate' fuses the patch grid: mm_vision_select_feature must be 'patch'")
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError(f"the high-resolution grid follows the tower's patch grid: image_size "
                             f"{self.vision_config.image_size} is not a multiple of patch_size "
                             f"{self.vision_config.patch_size}")
        if self.box_limit_mode not in BOX_LIMIT_MODES:
            raise ValueError(f"box_limit_mode must be one of {BOX_LIMIT_MODES}, got {self.box_limit_mode!r}")
        if self.box_pool_precision not in BOX_POOL_PRECISIONS:
            raise ValueError(f"box_pool_precision must be one of {BOX_POOL_PRECISIONS}, "
                             f"got {self.box_pool_precision!r}")
        if self.box_feat_size < 1 or not 0 <= self.box_iou_threshold <= 1 or (
                self.box_limit_num is not None and self.box_limit_num < 1):
            raise ValueError(f"box_feat_size {self.box_feat_size} (>= 1), box_iou_threshold "
                             f"{self.box_iou_threshold} (0..1), box_limit_num {self.box_limit_num} (>= 1 or None)")

    @property
    def object_feature_size(self) -> int:
        """Width of a pooled box vector: the ConvNeXt's stage widths summed (2880 for ConvNeXt-L)."""
        return sum(self.hires_config.hidden_sizes)

    @property
    def image_input_size(self) -> int:
        """Side of the images the model takes: the tower's image_size, with S2 its largest scale, with MG-LLaVA's
        high-resolution branch its `hires_image_size` (the tower sees them downsampled)."""
        if self.uses_hires:
            return self.hires_image_size
        return self.s2_scale_list()[-1] if "s2" in self.fusions else self.vision_config.image_size

    @property
    def mm_hidden_size(self) -> int:
        """Width of the selected vision features (channels concatenated over selected layers, and S2's scales)."""
        scales = len(self.s2_scale_list()) if "s2" in self.fusions else 1
        return self.vision_config.hidden_size * len(self.select_layers) * scales

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens one image contributes to the LLM sequence (576 for CLIP-L/336 patches)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        keep_cls = self.vision_has_cls and self.mm_vision_select_feature == "cls_patch"
        return side * side + int(keep_cls)


AutoConfig.register("polyfocus", PolyfocusConfig)
