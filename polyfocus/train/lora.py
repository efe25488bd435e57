"""LoRA / QLoRA for polyfocus models, LLaVA-1.5's `finetune_lora.sh` recipe on peft.

What LLaVA trains: LoRA on every linear layer of the LLM (not lm_head, the projector or the vision tower), and
the projector in full. Two differences from LLaVA, both fixing known complaints:

- Targets are matched by full module name inside `language_model`. LLaVA's `find_all_linear_names` returns
  suffixes ("q_proj", ...), which peft also matches inside CLIP, so LLaVA silently adapts the tower's q/k/v too.
- The projector is trained through peft's `modules_to_save`, so it is saved in the adapter itself: the adapter
  directory (adapter_config.json + adapter_model.safetensors) is self-contained, where LLaVA needs a separate
  `non_lora_trainables.bin` and a name-based loader to re-attach it, and resuming or merging without that file
  silently loses the projector.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from polyfocus.model.convert import copy_processor_files, load_model
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

logger = logging.getLogger(__name__)

# peft full-matches a string `exclude_modules` against each module name: everything outside the LLM.
OUTSIDE_LLM = r"(?!language_model\.).*"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "preprocessor_config.json")


def lora_config(
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    bias: str = "none",
    modules_to_save: tuple[str, ...] | None = ("mm_projector",),
) -> LoraConfig:
    """LLaVA-1.5's LoRA settings (r 128, alpha 256, dropout 0.05).

    target_modules=None: every nn.Linear inside `language_model` except the output head. peft's "all-linear"
    finds them, and `exclude_modules` keeps the vision tower and projector out; `apply_lora` then writes the
    resolved full names, so adapter_config.json lists exactly what was adapted. Explicit target_modules are used
    as given. modules_to_save: modules trained in full and stored in the adapter (the projector, by default).
    """
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or "all-linear",
        exclude_modules=None if target_modules else OUTSIDE_LLM,
        bias=bias,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )


def llm_linear_names(model: PolyfocusForConditionalGeneration) -> list[str]:
    """Full names of the LLM's linear layers, lm_head excluded (bitsandbytes' Linear4bit/8bitLt are nn.Linear)."""
    head = model.get_output_embeddings()
    return [f"language_model.{name}" for name, module in model.language_model.named_modules()
            if isinstance(module, nn.Linear) and module is not head]


def apply_lora(model: PolyfocusForConditionalGeneration, config: LoraConfig, bits: int = 16) -> PeftModel:
    """Wrap `model` for LoRA training: only the LoRA weights and `modules_to_save` stay trainable.

    bits 4/8 (QLoRA): `model` must already be quantized (`load_quantized`); it is prepared with peft's
    `prepare_model_for_kbit_training` (norms and non-quantized weights upcast to fp32).
    """
    quantized = bool(getattr(model, "is_quantized", False))
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    if bits < 16 and not quantized:
        raise ValueError(f"bits={bits} but the model is not quantized: load it with load_quantized(path, {bits})")
    # Unquantized needs no preparing: under activation checkpointing peft itself makes the embeddings require grad.
    if quantized:
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if config.target_modules == "all-linear" and config.exclude_modules == OUTSIDE_LLM:
        config = dataclasses.replace(config, target_modules=llm_linear_names(model))
    peft_model = get_peft_model(model, config)
    base = peft_model.peft_config["default"].base_model_name_or_path
    if base and Path(base).is_dir():  # absolute, so that merging works from any working directory
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    else:  # said now rather than at merge time, when the base may be gone
        logger.warning("the model was not loaded from a checkpoint directory (name_or_path %r): save it before "
                       "training; merging the adapter will need it (--model-base)", base)
    return peft_model


# Modules QLoRA keeps in full precision: everything but the LLM's body (they train in full or feed the LLM), and
# lm_head. An explicit list replaces transformers' default (lm_head).
SKIP_QUANTIZATION = ["vision_tower", "mm_projector", "mm_fusion", "vm_head", "hires_tower", "mm_object_projector",
                     "lm_head"]


def load_quantized(path: str | Path, bits: int = 4, **from_pretrained_kwargs) -> PolyfocusForConditionalGeneration:
    """Load a checkpoint (any format `load_model` reads) with its LLM quantized by bitsandbytes, for QLoRA.

    4 bits: nf4, double quantization, bf16 compute. The modules of SKIP_QUANTIZATION stay unquantized.
    Needs bitsandbytes and a CUDA device (`pip install 'polyfocus[gpu]'`).
    """
    try:
        import bitsandbytes  # noqa: F401  (transformers would fail later, with a less direct message)
    except ImportError:
        raise ImportError("load_quantized needs bitsandbytes (CUDA only): pip install 'polyfocus[gpu]'") from None
    from transformers import BitsAndBytesConfig

    skip = list(SKIP_QUANTIZATION)  # a copy: transformers may extend the list it is given
    if bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    elif bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()}, **from_pretrained_kwargs}
    return load_model(path, quantization_config=quantization, **kwargs)


def base_of(adapter_dir: str | Path, model_base: str | Path | None = None) -> Path:
    """The base checkpoint directory: `model_base`, else adapter_config.json's base_model_name_or_path."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter directory?")
    base = model_base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        source = "model_base" if model_base else f"{config_file}'s base_model_name_or_path"
        raise FileNotFoundError(f"{source} {str(base) if base else None!r} is not a local checkpoint directory with "
                                "a config.json; pass the base model directory (model_base=... / --model-base)")
    return Path(base)


def load_adapter(adapter_dir: str | Path, model_base: str | Path | None = None, is_trainable: bool = False,
                 **load_kwargs) -> PeftModel:
    """The base model with the adapter (LoRA weights and the trained projector) attached.

    is_trainable=True resumes training: the same parameters as `apply_lora` gave are trainable again.
    load_kwargs go to `load_model` for the base (dtype, device_map, vision_tower, ...).
    """
    base = load_model(base_of(adapter_dir, model_base), **load_kwargs)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, model_base: str | Path | None = None) -> Path:
    """Merge an adapter into its base and save a plain polyfocus checkpoint (safetensors) with the tokenizer and
    image-processor files of the adapter directory, or else of the base."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = base_of(adapter_dir, model_base)
    model = load_adapter(adapter_dir, base).merge_and_unload()
    model.save_pretrained(out_dir)
    # One directory's files, not a per-file mix: a tokenizer's files must come from the same save.
    has_processor_files = any((adapter_dir / name).is_file() for name in PROCESSOR_FILES)
    copy_processor_files(adapter_dir if has_processor_files else base, out_dir)
    return out_dir
