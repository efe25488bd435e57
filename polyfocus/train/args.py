"""Training arguments: LLaVA's three dataclasses (flag names kept), read from a YAML recipe plus `--key value`
overrides, on top of a stage preset.

Precedence, lowest first: the dataclass defaults < the stage preset (`stage: pretrain|finetune`) < the YAML
file < the command line. Values are typed by transformers' HfArgumentParser, so every `TrainingArguments`
flag (deepspeed, fsdp, report_to, save_steps, ...) works as it does in any transformers script.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields, make_dataclass

import torch
import transformers
import yaml
from transformers import HfArgumentParser

from polyfocus.config import METHOD_FIELDS, MODEL_PARTS

# Stage presets: LLaVA-1.5's scripts/v1_5/pretrain.sh and finetune.sh (spec llava_base.md §3.2).
STAGE_PRESETS = {
    "pretrain": {
        "tune_mm_mlp_adapter": True,  # projector (and any fusion module) only
        "version": "plain",
        "image_aspect_ratio": "square",
        "learning_rate": 1e-3,
        "group_by_modality_length": False,
    },
    "finetune": {
        "tune_mm_mlp_adapter": False,  # projector + LLM
        "version": "v1",
        "image_aspect_ratio": "pad",
        "learning_rate": 2e-5,
        "group_by_modality_length": True,
    },
}
# Flags of LLaVA's scripts that transformers 5 renamed.
RENAMED = {"warmup_ratio": "warmup_steps",  # warmup_steps < 1 is a ratio of the total steps
           "gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
           "ms_cross_attn_lr": "mm_fusion_lr"}  # MMFuser's scripts' name for the fuser's learning rate
COMMON_DEFAULTS = {"lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0, "save_strategy": "steps",
                   "logging_steps": 1, "include_num_input_tokens_seen": "non_padding", "remove_unused_columns": False}


# Every method's config fields (polyfocus/config.py's METHOD_FIELDS) as training arguments; None keeps the model's.
# Fields that shape the weights apply to a new model only (from backbones or model_config); settings to any model.
MethodArguments = make_dataclass("MethodArguments", [(name, f.type | None, field(default=None, metadata={"help": f.help}))
                                                     for name, f in METHOD_FIELDS.items()])
# Each model part's own learning rate (polyfocus/config.py's MODEL_PARTS); None: the run's learning_rate.
PartLearningRates = make_dataclass("PartLearningRates", [(lr, float | None, field(default=None))
                                                         for lr in dict.fromkeys(lr for _, lr in MODEL_PARTS.values()
                                                                                 if lr)])


@dataclass
class ModelArguments(MethodArguments):
    # What to start from: a polyfocus / llava-hf / original LLaVA checkpoint (e.g. a stage-1 output), or a plain
    # causal-LM directory combined with `vision_tower`, or nothing and `model_config` (a fresh tiny model).
    model_name_or_path: str | None = None
    model_base: str | None = None  # base LLM of a projector-only (mm_projector.bin) checkpoint
    vision_tower: str | None = None  # local CLIP/SigLIP directory
    tokenizer_name_or_path: str | None = None  # default: model_name_or_path
    model_config: dict | str | None = field(default=None, metadata={"help": "tiny_config(...) keywords: YAML mapping or JSON"})
    pretrain_mm_mlp_adapter: str | None = None  # projector weights from a stage-1 run (mm_projector.bin/.safetensors)
    version: str = "v1"  # conversation template (polyfocus.data.templates); "plain" for stage 1
    # MG-LLaVA (docs/mg_llava.md): fusion: convgate and/or object_tokens add the high-resolution ConvNeXt, from
    # `hires_tower` (a transformers ConvNeXt directory or open_clip CLIP-ConvNeXt weights; none: a fresh one of
    # hires_config, CLIP-ConvNeXt-L by default).
    hires_tower: str | None = None
    tune_hires_tower: bool = False  # train the ConvNeXt too (MG-LLaVA keeps it frozen), at mm_hires_tower_lr
    # Drop the vision tower's layers after the deepest one the model reads: never computed (docs/training.md).
    truncate_vision_tower: bool = False
    # What trains. tune_mm_mlp_adapter: projector (+fusion) only. freeze_backbone: LLM frozen.
    tune_mm_mlp_adapter: bool = False
    freeze_backbone: bool = False
    freeze_mm_mlp_adapter: bool = False
    unfreeze_vision_layers: int = 0  # train the top N layers of the vision tower (-1: the whole tower)
    freeze_modules: list[str] = field(default_factory=list)  # parameter-name regexes frozen on top of the above
    # LoRA / QLoRA (peft) on the LLM's linear layers; the projector trains in full.
    lora_enable: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # default: every Linear of the LLM except lm_head
    lora_bias: str = "none"
    bits: int = 16  # 4 or 8: QLoRA (bitsandbytes, CUDA only)
    attn_implementation: str = "sdpa"


@dataclass
class DataArguments:
    data_path: list[str] = field(default_factory=list)  # LLaVA JSON / messages files, concatenated
    # MG-LLaVA's offline boxes (polyfocus.data.boxes, `polyfocus boxes`): one box JSON for every data_path or one each
    box_json_path: list[str] = field(default_factory=list)
    image_folder: str | None = None  # image paths are relative to this (default: the JSON file's directory)
    image_aspect_ratio: str = "pad"
    lazy_preprocess: bool = True  # accepted for LLaVA compatibility; loading is always lazy
    strict_data: bool = True  # False: skip bad samples (counted and logged) instead of stopping
    validate_data: bool = True  # check every sample (text, images) before training starts
    validate_images: str = "header"  # how validate_data checks an image: header (format and size: cheap) | decode


@dataclass
class TrainingArguments(transformers.TrainingArguments, PartLearningRates):
    stage: str | None = None  # pretrain | finetune: LLaVA-1.5 defaults for that stage (see STAGE_PRESETS)
    model_max_length: int = 2048
    group_by_modality_length: bool = False
    # Each batch's samples concatenated into fewer rows, without padding (polyfocus.data.packing, docs/training.md).
    packing: bool = False
    # A packed row's token budget (SDPA/eager; default model_max_length). FlashAttention packs a batch into one row.
    packing_max_length: int | None = None
    save_trainable_only: bool = True  # checkpoints hold only what trains (LLaVA stage 1: the projector)
    # With the vision tower frozen: each image's tower features computed once and kept (model/vision.py's
    # FeatureCache, up to vision_feature_cache_gb), not at every step (docs/training.md).
    cache_vision_features: bool = False
    vision_feature_cache_gb: float = 4.0
    calibration_images: int = 256  # mm_standardize_features: the statistics come from this many training images
    plot_loss: bool = True  # loss.png in output_dir at the end
    # Nothing on the console per step (no progress bar, no log lines: they still go to trainer_state.json, loss.png
    # and report_to) and no parameter summary: for callers that print their own line (polyfocus demo).
    quiet: bool = False


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments)


def parse_args(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """(ModelArguments, DataArguments, TrainingArguments) from a YAML recipe and `--key value` overrides."""
    values = _read_yaml(config) if config else {}
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    overrides = [f"--{RENAMED[t[2:]]}" if t.startswith("--") and t[2:] in RENAMED else t for t in overrides]
    stage = _stage(values, overrides)
    merged = {**COMMON_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available(),
              "use_cpu": _multi_process_without_accelerator(), **STAGE_PRESETS.get(stage, {}), **values}
    for key in ("data_path", "box_json_path"):
        if isinstance(merged.get(key), str):
            merged[key] = [merged[key]]
    merged["bf16"] = _resolve_auto(merged.get("bf16", "auto"), _has_bf16)
    if merged.get("tf32") is not None:  # None (the default): leave torch's setting alone
        merged["tf32"] = _resolve_auto(merged["tf32"], _has_tf32)
    merged.update(_typed_overrides(overrides))
    for key in ("model_config", "hires_config"):
        if isinstance(merged.get(key), str):
            merged[key] = json.loads(merged[key])
    model_args, data_args, training_args = HfArgumentParser(ALL_ARGUMENTS).parse_dict(merged)
    if training_args.quiet:
        training_args.disable_tqdm = True
    if data_args.validate_images not in ("header", "decode"):
        raise ValueError(f"validate_images must be header or decode, got {data_args.validate_images!r}")
    if data_args.image_aspect_ratio not in ("pad", "square", "resize"):
        raise ValueError(f"image_aspect_ratio must be pad, square or resize, got {data_args.image_aspect_ratio!r}")
    return model_args, data_args, training_args


def _typed_overrides(overrides) -> dict:
    """`--key value` pairs typed by HfArgumentParser (which knows every field's type); only the keys given."""
    parser = HfArgumentParser(ALL_ARGUMENTS)
    for action in parser._actions:
        if action.dest != "help":
            action.default, action.required = argparse.SUPPRESS, False
    return vars(parser.parse_args(list(overrides)))


def resolved_config(model_args, data_args, training_args) -> dict:
    """Every argument's final value, for the run directory (`polyfocus train <that file>` repeats the run)."""
    # to_dict: enums as values, and secrets (hub_token) masked as "<HUB_TOKEN>": leave those out, or re-running
    # the file would log in with the literal mask.
    training = {k: v for k, v in training_args.to_dict().items() if not k.endswith("_token")}
    values = {**asdict(model_args), **asdict(data_args), **training}
    return json.loads(json.dumps(values, default=str))


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such training config")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a training config is a mapping of argument names to values")
    known = {f.name for cls in ALL_ARGUMENTS for f in fields(cls)} | set(RENAMED)
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"{path}: unknown argument {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return values


def _stage(values: dict, overrides) -> str | None:
    overrides = list(overrides)
    stage = values.get("stage")
    for i, token in enumerate(overrides):  # the preset must be known before the parser applies the defaults
        if token == "--stage" and i + 1 < len(overrides):
            stage = overrides[i + 1]
        elif token.startswith("--stage="):
            stage = token.split("=", 1)[1]
    if stage not in (None, *STAGE_PRESETS):
        raise ValueError(f"stage must be one of {list(STAGE_PRESETS)}, got {stage!r}")
    return stage


def _multi_process_without_accelerator() -> bool:
    """Launched as several processes (torchrun, accelerate launch, mpirun) on a machine with no GPU/accelerator.

    accelerate sets up CPU DDP (gloo) only when told to use the CPU (`use_cpu`); otherwise it initialises the
    process group but leaves the model unwrapped, and every process silently trains its own copy on its own
    shard of the data. So such a launch defaults to use_cpu.
    """
    world = max(int(os.environ.get(k, "1")) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                                      "MV2_COMM_WORLD_SIZE"))
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world > 1 and not accelerator


def _resolve_auto(value, detect) -> bool:
    """bf16 / tf32: "auto" (bf16's default) means on where the hardware has it."""
    if value == "auto":
        return detect()
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _has_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _has_tf32() -> bool:  # Ampere or newer
    return bool(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)
