"""Original LLaVA-1.5 checkpoints (`LlavaLlamaForCausalLM` and kin: a full model, or a stage-1 `mm_projector.bin` on top
of a base LLM), and the methods released in that layout: MMFuser (its fuser inside the projector), VW-LMM (a
`vm_head`), LLaVA-S2 (`s2` fields).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from polyfocus.checkpoints.common import checkpoint_keys, load_renamed, renamed, vision_config_of, vision_state
from polyfocus.checkpoints.mg_llava import MG_LLAVA_TO_POLYFOCUS
from polyfocus.config import LLAVA_IMAGE_TOKEN_INDEX, PolyfocusConfig
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

# Original LLaVA (LlavaLlamaForCausalLM) keys → ours.
LLAVA_TO_POLYFOCUS = {
    r"^model\.mm_projector\.": "mm_projector.",
    r"^model\.vision_tower\.vision_tower\.(vision_model\.)?": "vision_tower.",
    r"^model\.": "language_model.model.",
    r"^lm_head\.": "language_model.lm_head.",
}


# MMFuser's reference code (yuecao0119/MMFuser) keeps its fuser inside the projector, as entry 0 of
# Sequential[MSCrossAttnBlock, Linear, GELU, Linear, ...]: model.mm_projector.0.* is the fuser (inner names as ours)
# and the MLP's Linears sit one index later than LLaVA's (mlp2x_gelu: .1 and .3; linear: .1). Its config names the
# layers as a list, mm_vision_select_layer [-22, -17, -12, -7, -2] ("list-22/-17/-12/-7/-2" on its command line).
MMFUSER_LEVELS = 4  # the reference's n_levels: the first 4 listed layers are the key/values, the last the query


def mmfuser_reference_key_mapping(projector_type: str) -> dict[str, str]:
    """Key renaming for MMFuser's reference layout (applied before LLAVA_TO_POLYFOCUS)."""
    mapping = {r"^model\.mm_projector\.0\.": "mm_fusion."}
    if projector_type == "linear":
        mapping[r"^model\.mm_projector\.1\."] = "mm_projector."
    elif projector_type != "identity":  # mlpNx_gelu: reference Linears at 1, 3, 5, ... → ours at 0, 2, 4, ...
        depth = int(re.fullmatch(r"mlp(\d+)x_gelu", projector_type).group(1))
        mapping.update({rf"^model\.mm_projector\.{2 * i + 1}\.": f"mm_projector.{2 * i}." for i in range(depth)})
    return mapping


# Original LLaVA config model_type → the text model it wraps.
LLAVA_TEXT_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}


# VW-LMM (pengts/VW-LMM) keeps LLaVA's layout plus a top-level `vm_head.weight`, but its config classes are named
# model_type "llava" (llava-hf's name) over a flat LLM config; the architecture tells Llama from Mistral.
VW_LMM_ARCHITECTURES = {"vwLlamaForCausalLM": "llama", "vwPifLlamaForCausalLM": "llama",
                        "vwMistralForCausalLM": "mistral"}


LLAVA_ONLY_FIELDS = (
    "mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_type",
    "mm_patch_merge_type", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr", "use_mm_proj",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio", "image_grid_pinpoints",
    "tokenizer_padding_side", "tokenizer_model_max_length", "mm_vision_tower_lr", "unfreeze_mm_vision_tower",
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
)


def config_from_llava_original(path: str | Path, vision_tower: str | Path | None = None) -> PolyfocusConfig:
    """LLaVA's config.json is the LLM's config plus mm_* fields; the tower comes from `mm_vision_tower`."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text())
    text_type = vw_lmm_text_type(raw) if raw["model_type"] == "llava" else LLAVA_TEXT_MODEL_TYPES[raw["model_type"]]
    text_config = AutoConfig.for_model(text_type, **{k: v for k, v in raw.items() if k not in LLAVA_ONLY_FIELDS})
    tower = vision_tower or raw.get("mm_vision_tower")
    tower_path = Path(tower) if tower else None
    if tower_path is None or not (tower_path / "config.json").is_file():
        raise FileNotFoundError(
            f"{config_file}: mm_vision_tower {raw.get('mm_vision_tower')!r} is not a local directory with a "
            "config.json; pass the CLIP tower's local path (vision_tower=... / --vision-tower)"
        )
    aspect = raw.get("image_aspect_ratio") or "square"
    if aspect not in ("pad", "square", "resize"):
        raise ValueError(f"{config_file}: image_aspect_ratio {aspect!r} (LLaVA-1.6 anyres) is not supported")
    return PolyfocusConfig(
        vision_config=vision_config_of(tower_path).to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=LLAVA_IMAGE_TOKEN_INDEX,
        **_select_layer_fields(raw, config_file),
        mm_vision_select_feature=raw.get("mm_vision_select_feature", "patch"),
        mm_projector_type=raw.get("mm_projector_type", "linear"),
        image_aspect_ratio=aspect,
        tokenizer_padding_side=raw.get("tokenizer_padding_side", "right"),
        tokenizer_model_max_length=raw.get("tokenizer_model_max_length"),
        mm_vision_tower=str(tower_path),
        **_visual_word_fields(Path(path), raw),
        **_s2_fields(raw),
    )


def _s2_fields(raw: dict) -> dict:
    """LLaVA-S2 (LLaVA's and DenseFusion's `--s2 True --s2_scales "336,672,1008"`): the S2 fusion option."""
    if not raw.get("s2"):
        return {}
    scales = raw.get("s2_scales", "336,672,1008")
    return {"fusion": "s2", "s2_scales": [int(s) for s in scales.split(",")] if isinstance(scales, str) else scales}


def _select_layer_fields(raw: dict, config_file: Path) -> dict:
    """LLaVA's one index; or MMFuser's list (only its code takes one here): the first 4 are the fuser's key/value
    layers and the last its query, as its MSCrossAttnBlock reads them (layers between are unused there too)."""
    layers = raw.get("mm_vision_select_layer", -2)
    if isinstance(layers, str):  # the reference's command-line form, in case a config kept it unparsed
        layers = [int(i) for i in layers.removeprefix("list").split("/")] if layers.startswith("list") else int(layers)
    if isinstance(layers, int):
        return {"mm_vision_select_layer": layers}
    if len(layers) < MMFUSER_LEVELS + 1:
        raise ValueError(f"{config_file}: mm_vision_select_layer {layers} is MMFuser's list, which needs "
                         f"{MMFUSER_LEVELS} key/value layers and the query layer")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"{config_file}: MMFuser's reference code runs only with mm_vision_select_feature 'patch'")
    return {"mm_vision_select_layer": layers[-1], "fusion": "mmfuser", "mmfuser_kv_layers": layers[:MMFUSER_LEVELS]}


def vw_lmm_text_type(raw: dict) -> str:
    architecture = (raw.get("architectures") or [""])[0]
    return VW_LMM_ARCHITECTURES.get(architecture, "mistral" if "Mistral" in architecture else "llama")


def _visual_word_fields(path: Path, raw: dict) -> dict:
    """A VW-LMM checkpoint (a `vm_head.weight`) gets the visual-word head; its PIF variant is recognised as VW-LMM's
    loader does, by "pif" in the model's name (the directory, or parent_checkpoint-N), or by its architecture."""
    if "vm_head.weight" not in checkpoint_keys(path):
        return {}
    name = path.resolve().name
    if name.startswith("checkpoint-"):
        name = f"{path.resolve().parent.name}_{name}"
    pif = "pif" in name.lower() or "Pif" in (raw.get("architectures") or [""])[0]
    return {"visual_words": True, "pseudo_image_features": pif}


def load_llava_original(
    path: str | Path,
    model_base: str | Path | None = None,
    vision_tower: str | Path | None = None,
    projector_only: bool = False,
    **from_pretrained_kwargs,
) -> PolyfocusForConditionalGeneration:
    """An original LLaVA-1.5 checkpoint (full, or projector-only on top of `model_base`).

    The image token stays LLaVA's sentinel -200 (never embedded), so the vocabulary is untouched.
    """
    path = Path(path)
    config = config_from_llava_original(path, vision_tower)
    if projector_only and model_base is None:
        raise ValueError(f"{path} holds only a projector (mm_projector.bin): pass the base LLM (model_base=...)")
    may_miss = ("vision_tower.", "mm_projector.", "mm_fusion.") if projector_only else ("vision_tower.",)
    key_mapping = LLAVA_TO_POLYFOCUS
    if config.fusion == "mmfuser":
        key_mapping = {**mmfuser_reference_key_mapping(config.mm_projector_type), **LLAVA_TO_POLYFOCUS}
    model = load_renamed(model_base if projector_only else path, config, key_mapping, may_miss,
                          **from_pretrained_kwargs)
    if projector_only:
        load_projector_bin(model, path / "mm_projector.bin")
    tower_keys = {"vision_tower." + k for k in model.vision_tower.state_dict()}
    missing_tower = tower_keys & model.missing_keys
    if missing_tower == tower_keys:
        # LLaVA delay-loads the tower from mm_vision_tower rather than from its own checkpoint.
        tower = AutoModel.from_pretrained(config.mm_vision_tower, dtype=model.dtype)
        model.vision_tower.load_state_dict(vision_state(tower), strict=True)
    elif missing_tower:  # a partial tower: neither source is right
        raise ValueError(f"{path}: the checkpoint holds part of the vision tower; missing {sorted(missing_tower)[:5]}")
    return model


def load_projector_bin(model: PolyfocusForConditionalGeneration, file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no projector weights")
    load_projector_weights(model, torch.load(file, map_location="cpu", weights_only=True), file)


def load_projector_weights(model: PolyfocusForConditionalGeneration, state: dict[str, torch.Tensor], source) -> None:
    """Stage-1 weights into the projector (and the fuser): LLaVA's mm_projector.bin (keys model.mm_projector.*),
    or ours (mm_projector.*, mm_fusion.*). For a model with fusion='mmfuser', LLaVA-layout keys are MMFuser's
    reference layout (its fuser is projector entry 0)."""
    mapping = {r"^model\.mm_projector\.": "mm_projector."}
    if model.config.uses_hires:  # MG-LLaVA's stage-1 state dict (xtuner names)
        mapping.update(MG_LLAVA_TO_POLYFOCUS)
    if model.config.fusion == "mmfuser":
        mapping = {**mmfuser_reference_key_mapping(model.config.mm_projector_type), **mapping}
    state = {renamed(key, mapping): value for key, value in state.items()}
    projector = {k.removeprefix("mm_projector."): v for k, v in state.items() if k.startswith("mm_projector.")}
    if not projector:
        raise ValueError(f"{source}: no mm_projector weights (keys: {list(state)[:3]})")
    model.mm_projector.load_state_dict(projector, strict=True)
    if model.mm_fusion is not None and model.mm_fusion.state_dict():  # S2 has no weights
        fusion = {k.removeprefix("mm_fusion."): v for k, v in state.items() if k.startswith("mm_fusion.")}
        if not fusion:
            raise ValueError(f"{source}: no weights for the model's fusion module ({model.config.fusion}): expected "
                             "MMFuser's reference layout (model.mm_projector.0.*) or mm_fusion.* keys")
        model.mm_fusion.load_state_dict(fusion, strict=True)
    if model.mm_object_projector is not None:  # MG-LLaVA's object tokens' projector trains in stage 1 too
        objects = {k.removeprefix("mm_object_projector."): v for k, v in state.items()
                   if k.startswith("mm_object_projector.")}
        if not objects:
            raise ValueError(f"{source}: no weights for the object tokens' projector (mm_object_projector.* or "
                             "MG-LLaVA's bbox_projector.model.*)")
        model.mm_object_projector.load_state_dict(objects, strict=True)

