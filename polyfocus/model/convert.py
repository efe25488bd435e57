"""Load and convert checkpoints: polyfocus, llava-hf (both key layouts), original LLaVA-1.5, and a
stage-1 projector (`mm_projector.bin`) on top of a base LLM.

Every path goes through transformers' `from_pretrained` with a `key_mapping`, so sharding, .bin
(`weights_only=True`) vs safetensors, dtype and device_map behave as users of transformers expect.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, LlavaConfig, LlavaForConditionalGeneration, PreTrainedConfig

from polyfocus.config import LLAVA_IMAGE_TOKEN_INDEX, TOWERS_WITH_CLS, PolyfocusConfig
from polyfocus.data.images import ImageProcessor
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

# llava-hf keys → ours: the in-memory layout of transformers ≥ 4.52 (model.*) and the on-disk one that
# older checkpoints have (and that transformers 5 still writes: language_model.model.*, vision_tower.*).
HF_TO_POLYFOCUS = {
    r"^model\.language_model\.": "language_model.model.",
    r"^(model\.)?vision_tower\.(vision_model\.)?": "vision_tower.",  # transformers 5 dropped "vision_model."
    r"^(model\.)?multi_modal_projector\.linear_1\.": "mm_projector.0.",
    r"^(model\.)?multi_modal_projector\.linear_2\.": "mm_projector.2.",
    r"^lm_head\.": "language_model.lm_head.",
}
POLYFOCUS_TO_HF = {
    "language_model.model.": "model.language_model.",
    "vision_tower.": "model.vision_tower.",
    "mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "mm_projector.2.": "model.multi_modal_projector.linear_2.",
    "language_model.lm_head.": "lm_head.",
}
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


def checkpoint_format(path: str | Path) -> str:
    """'polyfocus' | 'llava-hf' | 'llava' (original LLaVA-1.5) | 'projector' (stage-1 mm_projector.bin only)
    | 'lora' (a peft adapter directory from polyfocus.train.lora) | 'mg-llava' (MG-LLaVA's xtuner state dict, or
    its converted layout: see load_mg_llava)."""
    path = Path(path)
    if (path.suffix in (".pth", ".pt") and (path.is_file() or _is_deepspeed_checkpoint(path))
            or (path / "fuse_module").is_dir()):
        return "mg-llava"
    config_file = path / "config.json"
    adapter = (path / "adapter_config.json").is_file()
    if adapter and not config_file.is_file():
        return "lora"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is this a model directory?")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type == "llava" and "text_config" not in raw and "mm_vision_tower" in raw:
        model_type = "llava_" + _vw_lmm_text_type(raw)  # VW-LMM: LLaVA's flat layout under llava-hf's name
    if model_type == "polyfocus":  # an adapter may be saved with its model's config.json, but no model weights
        has_weights = any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        return "lora" if adapter and not has_weights else "polyfocus"
    if model_type == "llava":
        return "llava-hf"
    if model_type in LLAVA_TEXT_MODEL_TYPES:
        if adapter:  # its adapter keys are in LLaVA's layout, not ours
            raise ValueError(f"{path}: an original LLaVA LoRA checkpoint; merge it with LLaVA's "
                             "scripts/merge_lora_weights.py, then load the merged directory")
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        return "llava" if has_weights else "projector"
    raise ValueError(f"{config_file}: model_type {model_type!r} is not a polyfocus, llava-hf or LLaVA checkpoint")


def load_model(
    path: str | Path,
    model_base: str | Path | None = None,
    vision_tower: str | Path | None = None,
    hires_tower: str | Path | None = None,
    **from_pretrained_kwargs,
) -> PolyfocusForConditionalGeneration:
    """Load any supported checkpoint directory as a polyfocus model.

    model_base: the base LLM directory, for a stage-1 projector-only checkpoint; for a LoRA adapter, overrides
        the base recorded in adapter_config.json (the adapter is merged into it on the fly).
    vision_tower: overrides the vision tower path recorded in an original LLaVA config.
    hires_tower: MG-LLaVA's ConvNeXt (open_clip weights or a transformers directory), for an MG-LLaVA checkpoint.
    """
    fmt = checkpoint_format(path)
    if fmt == "mg-llava":
        return load_mg_llava(path, model_base, vision_tower, hires_tower, **from_pretrained_kwargs)
    if fmt == "lora":
        from polyfocus.train.lora import load_adapter  # lazy: polyfocus.train.lora imports this module

        return load_adapter(path, model_base, vision_tower=vision_tower, **from_pretrained_kwargs).merge_and_unload()
    if fmt == "polyfocus":
        return PolyfocusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    if fmt == "llava-hf":
        config = config_from_llava_hf(LlavaConfig.from_pretrained(path))
        image_fields = _hf_image_processor_fields(path)
        if image_fields:  # pad vs crop lives in the image processor's file, not in the model config
            config.image_aspect_ratio = ImageProcessor.from_hf_dict(image_fields).aspect_ratio
        return _load_renamed(path, config, HF_TO_POLYFOCUS, **from_pretrained_kwargs)
    return load_llava_original(path, model_base, vision_tower, fmt == "projector", **from_pretrained_kwargs)


def _hf_image_processor_fields(path: str | Path) -> dict | None:
    """The image processor's fields: preprocessor_config.json, or (transformers 5) processor_config.json."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = Path(path) / name
        if file.is_file():
            fields = json.loads(file.read_text())
            fields = fields.get(key) if key else fields
            if fields:
                return fields
    return None


def _load_renamed(path, config: PolyfocusConfig, key_mapping: dict[str, str], may_miss: tuple[str, ...] = (),
                  **from_pretrained_kwargs) -> PolyfocusForConditionalGeneration:
    """from_pretrained with renamed keys. Missing weights are an error (transformers would initialise them
    randomly), except under the prefixes in `may_miss`, which the caller fills. The model forgets the renaming
    so that `save_pretrained` writes polyfocus keys rather than reverting to the source layout."""
    model, info = PolyfocusForConditionalGeneration.from_pretrained(
        path, config=config, key_mapping=key_mapping, output_loading_info=True, **from_pretrained_kwargs
    )
    missing = [k for k in info["missing_keys"] if not k.startswith(may_miss)]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model._weight_conversions = None
    model.missing_keys = set(info["missing_keys"])
    return model


# ---- llava-hf ---------------------------------------------------------------------------------


def config_from_llava_hf(config: LlavaConfig) -> PolyfocusConfig:
    has_cls = config.vision_config.model_type in TOWERS_WITH_CLS
    full = config.vision_feature_select_strategy == "full"
    if not config.multimodal_projector_bias or config.projector_hidden_act != "gelu":
        raise ValueError("only LLaVA's projector (bias, exact GELU) converts; got "
                         f"bias={config.multimodal_projector_bias}, act={config.projector_hidden_act}")
    if not has_cls and not full:
        raise ValueError(f"{config.vision_config.model_type} has no CLS token, yet the strategy 'default' drops one")
    return PolyfocusConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        mm_vision_select_layer=config.vision_feature_layer,
        mm_vision_select_feature="cls_patch" if full and has_cls else "patch",
        mm_projector_type="mlp2x_gelu",
    )


def llava_hf_config(config: PolyfocusConfig) -> LlavaConfig:
    if config.fusion is not None:  # never silently drop weights
        raise ValueError(f"transformers' Llava has no fusion module; a model with fusion={config.fusion!r} stays in "
                         "the polyfocus format")
    if config.object_tokens:
        raise ValueError("transformers' Llava has no object tokens (MG-LLaVA); the model stays in the polyfocus format")
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(f"transformers' Llava has an mlp2x_gelu projector only; this model has {config.mm_projector_type}")
    drops_cls = config.vision_has_cls and config.mm_vision_select_feature == "patch"
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy="default" if drops_cls else "full",
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def to_llava_hf(model: PolyfocusForConditionalGeneration) -> LlavaForConditionalGeneration:
    """The same weights in transformers' `LlavaForConditionalGeneration` (current key layout)."""
    _refuse_visual_words(model)
    if not 0 <= model.config.image_token_id < model.config.text_config.vocab_size:
        raise ValueError(f"image_token_id {model.config.image_token_id} is not in the vocabulary; transformers' "
                         "Llava looks it up: add an <image> token first (add_image_token)")
    with torch.device("meta"):  # no random init, no second copy: the weights are assigned below
        hf = LlavaForConditionalGeneration(llava_hf_config(model.config))
    hf.load_state_dict({_hf_key(k): v for k, v in model.state_dict().items()}, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary inv_freq, ...) are not in the state dict
        module_name, _, attr = _hf_key(name).rpartition(".")
        setattr(hf.get_submodule(module_name), attr, buffer)
    hf.tie_weights()
    return hf.train(model.training)


def _refuse_visual_words(model) -> None:
    if model.vm_head is not None:  # never silently drop weights
        raise ValueError("a visual-word (VW-LMM) model has no transformers Llava equivalent: its vm_head has no place "
                         "there; keep it in the polyfocus format")


def _hf_key(key: str) -> str:
    prefix = next(p for p in POLYFOCUS_TO_HF if key.startswith(p))
    return POLYFOCUS_TO_HF[prefix] + key[len(prefix):]


def add_image_token(model: PolyfocusForConditionalGeneration, tokenizer) -> None:
    """Give a model whose image token is a sentinel (LLaVA's -200) a real `<image>` (and `<pad>`) token, as
    transformers' LLaVA conversion does: new rows drawn around the mean embedding, vocab padded to ×64."""
    if "<image>" not in tokenizer.get_vocab():  # <image> first, then <pad>: transformers' ids 32000, 32001
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # grow only: ids past len(tokenizer) may be in use
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")


def save_llava_hf(model: PolyfocusForConditionalGeneration, out_dir: str | Path, src_dir: str | Path | None = None):
    """Write `out_dir` loadable by plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`).

    A model whose image id is outside the vocabulary (an original LLaVA checkpoint's -200) is given an
    `<image>` token first: this resizes `model`'s embeddings and changes its `config.image_token_id` in place.
    """
    from transformers import AutoTokenizer

    _refuse_visual_words(model)  # before add_image_token changes the model
    tokenizer = AutoTokenizer.from_pretrained(src_dir) if src_dir and has_tokenizer(src_dir) else None
    if not 0 <= model.config.image_token_id < model.config.text_config.vocab_size:
        if tokenizer is None:
            raise ValueError(f"{src_dir}: a tokenizer is needed to add the <image> token for transformers")
        add_image_token(model, tokenizer)
    to_llava_hf(model).save_pretrained(out_dir)
    if tokenizer is not None:
        _save_llava_processor(model.config, tokenizer, out_dir, src_dir)


def _save_llava_processor(config: PolyfocusConfig, tokenizer, out_dir: str | Path, src_dir: str | Path) -> None:
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    # The source's own image settings (mean/std of its tower, e.g. SigLIP's 0.5), with the model's aspect ratio.
    if (Path(src_dir) / "preprocessor_config.json").is_file():
        images = ImageProcessor.from_pretrained(src_dir, aspect_ratio=config.image_aspect_ratio)
    else:
        images = ImageProcessor(image_size=config.vision_config.image_size, aspect_ratio=config.image_aspect_ratio)
    hf_fields = {k: v for k, v in images.to_hf_dict().items() if k != "image_processor_type"}
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**hf_fields),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=llava_hf_config(config).vision_feature_select_strategy,
        num_additional_image_tokens=1 if config.vision_has_cls else 0,
        chat_template=tokenizer.chat_template,
        image_token=tokenizer.convert_ids_to_tokens(config.image_token_id),
    )
    processor.save_pretrained(out_dir)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def copy_processor_files(src: str | Path, dst: str | Path) -> None:
    """Tokenizer, chat template and image-processor files: what a model directory needs besides weights."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "added_tokens.json", "preprocessor_config.json"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


# ---- original LLaVA-1.5 -----------------------------------------------------------------------


def config_from_llava_original(path: str | Path, vision_tower: str | Path | None = None) -> PolyfocusConfig:
    """LLaVA's config.json is the LLM's config plus mm_* fields; the tower comes from `mm_vision_tower`."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text())
    text_type = _vw_lmm_text_type(raw) if raw["model_type"] == "llava" else LLAVA_TEXT_MODEL_TYPES[raw["model_type"]]
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
        vision_config=_vision_config(tower_path).to_dict(),
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


def _vw_lmm_text_type(raw: dict) -> str:
    architecture = (raw.get("architectures") or [""])[0]
    return VW_LMM_ARCHITECTURES.get(architecture, "mistral" if "Mistral" in architecture else "llama")


def _visual_word_fields(path: Path, raw: dict) -> dict:
    """A VW-LMM checkpoint (a `vm_head.weight`) gets the visual-word head; its PIF variant is recognised as VW-LMM's
    loader does, by "pif" in the model's name (the directory, or parent_checkpoint-N), or by its architecture."""
    if "vm_head.weight" not in _checkpoint_keys(path):
        return {}
    name = path.resolve().name
    if name.startswith("checkpoint-"):
        name = f"{path.resolve().parent.name}_{name}"
    pif = "pif" in name.lower() or "Pif" in (raw.get("architectures") or [""])[0]
    return {"visual_words": True, "pseudo_image_features": pif}


def _checkpoint_keys(path: Path) -> set[str]:
    """The weight names of a checkpoint directory (sharded or not, safetensors or .bin), without loading tensors."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return set(json.loads((path / index).read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            return set(f.keys())
    if (path / "pytorch_model.bin").is_file():
        return set(torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True))
    return set()


def _vision_config(tower_path: Path) -> PreTrainedConfig:
    """A tower directory holds either a vision config or a full CLIP/SigLIP one (take its vision part)."""
    config = AutoConfig.from_pretrained(tower_path)
    return getattr(config, "vision_config", config)


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
    model = _load_renamed(model_base if projector_only else path, config, key_mapping, may_miss,
                          **from_pretrained_kwargs)
    if projector_only:
        _load_projector(model, path / "mm_projector.bin")
    tower_keys = {"vision_tower." + k for k in model.vision_tower.state_dict()}
    missing_tower = tower_keys & model.missing_keys
    if missing_tower == tower_keys:
        # LLaVA delay-loads the tower from mm_vision_tower rather than from its own checkpoint.
        tower = AutoModel.from_pretrained(config.mm_vision_tower, dtype=model.dtype)
        model.vision_tower.load_state_dict(_vision_state(tower), strict=True)
    elif missing_tower:  # a partial tower: neither source is right
        raise ValueError(f"{path}: the checkpoint holds part of the vision tower; missing {sorted(missing_tower)[:5]}")
    return model


def _vision_state(tower) -> dict[str, torch.Tensor]:
    """State dict of a loaded tower in our tower's layout: a whole CLIP/SigLIP model gives its vision part."""
    return (tower.vision_model if hasattr(tower, "text_model") else tower).state_dict()


def _load_projector(model: PolyfocusForConditionalGeneration, file: Path) -> None:
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
    state = {_renamed(key, mapping): value for key, value in state.items()}
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


def _renamed(key: str, mapping: dict[str, str]) -> str:
    """A key renamed as transformers' key_mapping does: every matching pattern, in order."""
    for pattern, replacement in mapping.items():
        key = re.sub(pattern, replacement, key)
    return key


# ---- MG-LLaVA -------------------------------------------------------------------------------------------------------

# MG-LLaVA (PhoenixZ810/MG-LLaVA, built on xtuner) keeps the LLM as `llm`, the MLP as xtuner's ProjectorModel
# (`projector.model.{0,2}`), the object tokens' MLP as `bbox_projector.model.*` and the Conv-Gate as `fuse_module.*`
# (names as ours); CLIP and the ConvNeXt are frozen and not saved (they load from their own files).
MG_LLAVA_TO_POLYFOCUS = {
    r"^llm\.": "language_model.",
    r"^projector\.model\.": "mm_projector.",
    r"^bbox_projector\.model\.": "mm_object_projector.",
    r"^fuse_module\.": "mm_fusion.",
    r"^visual_encoder\.(vision_model\.)?": "vision_tower.",
}
MG_LLAVA_PARTS = ("projector", "bbox_projector", "fuse_module")


def mg_llava_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Path | None]:
    """(MG-LLaVA's state dict under its own names, the LLM directory or None).

    path: the state dict it trains and releases (`iter_*.pth`: xtuner's mmengine checkpoint, its `state_dict`; with
    DeepSpeed, a directory of that name holding DeepSpeed's checkpoint), or its converted layout: xtuner's
    `pth_to_hf` output (the finetuned LLM + tokenizer at the top, the MLP in `projector/`) plus `bbox_projector/` and
    `fuse_module/` saved the same way, each holding one weight file."""
    path = Path(path)
    if _is_deepspeed_checkpoint(path):
        return _deepspeed_fp32_state(path), None
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the message says what to do
            raise ValueError(f"{path}: not loadable with weights_only=True ({type(e).__name__}); save its state dict "
                             "alone first: torch.save(torch.load(f, weights_only=False)['state_dict'], out)") from e
        return state.get("state_dict", state.get("module", state)), None
    state = {}
    for part in MG_LLAVA_PARTS:
        folder = path / part
        if folder.is_dir():
            state.update({f"{part}.{key}": value for key, value in _weight_file(folder).items()})
    return state, path


def _is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_model_states.pt"))


def _deepspeed_fp32_state(path: Path) -> dict[str, torch.Tensor]:
    """xtuner under DeepSpeed saves `iter_N.pth/` as a DeepSpeed checkpoint whose tag is the directory's name; like
    xtuner's own loader, DeepSpeed's zero_to_fp32 rebuilds the fp32 weights (its pickles need deepspeed anyway)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ValueError(f"{path}: a DeepSpeed checkpoint; reading it needs deepspeed (pip install deepspeed), or "
                         f"run the zero_to_fp32.py DeepSpeed saved in {path.parent} and pass the file it writes") from None
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), path.name)


def _weight_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            file = folder / name
            return load_file(file) if name.endswith(".safetensors") else torch.load(file, weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_mg_llava(path: str | Path, model_base: str | Path | None = None, vision_tower: str | Path | None = None,
                  hires_tower: str | Path | None = None, **from_pretrained_kwargs) -> PolyfocusForConditionalGeneration:
    """An MG-LLaVA checkpoint (`mg_llava_state`) with its three backbones: the LLM (the converted layout's top
    directory, else `model_base`: the state dict's `llm.*` weights, if any, go over it), CLIP (`vision_tower`) and
    the ConvNeXt (`hires_tower`: open_clip's CLIP-ConvNeXt-L-d-320 weights or a transformers ConvNeXt). Its settings
    are MG-LLaVA's: CLIP layer -2 without CLS, padded images, Conv-Gate, object tokens; LLaVA's image id -200."""
    from polyfocus.model.backbones import from_backbones  # lazy: backbones imports this module

    state, llm_dir = mg_llava_state(path)
    llm_dir = llm_dir or model_base
    missing = [name for name, value in (("model_base (the LLM)", llm_dir), ("vision_tower (CLIP)", vision_tower),
                                        ("hires_tower (the ConvNeXt)", hires_tower)) if value is None]
    if missing:
        raise ValueError(f"{path}: an MG-LLaVA checkpoint needs its backbones: give {', '.join(missing)}")
    state = {_renamed(key, MG_LLAVA_TO_POLYFOCUS): value for key, value in state.items()}
    depth = sum(1 for key in state if re.fullmatch(r"mm_projector\.\d+\.weight", key))
    if depth == 0:
        raise ValueError(f"{path}: no projector weights (projector.model.*): is this an MG-LLaVA checkpoint?")
    fields = {"mm_vision_select_layer": -2, "mm_projector_type": f"mlp{depth}x_gelu" if depth > 1 else "linear",
              "image_aspect_ratio": "pad", "fusion": "convgate" if any(k.startswith("mm_fusion.") for k in state)
              else None, "object_tokens": any(k.startswith("mm_object_projector.") for k in state)}
    model = from_backbones(llm_dir, vision_tower, LLAVA_IMAGE_TOKEN_INDEX, hires_tower=hires_tower,
                           dtype=from_pretrained_kwargs.get("dtype"),
                           attn_implementation=from_pretrained_kwargs.get("attn_implementation"), **fields)
    result = model.load_state_dict(state, strict=False)
    ours = ("mm_projector.", "mm_fusion.", "mm_object_projector.")
    not_loaded = [k for k in result.missing_keys if k.startswith(ours)]
    if result.unexpected_keys or not_loaded:
        raise ValueError(f"{path}: does not match MG-LLaVA's layout: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {not_loaded[:5]}")
    model.name_or_path = str(path)
    return model
