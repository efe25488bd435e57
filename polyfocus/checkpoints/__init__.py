"""Every checkpoint format polyfocus reads, and the ones it writes: `load_model(path)` detects the format and loads it
as a polyfocus model.

| format      | what it is                                                   | module      |
|-------------|--------------------------------------------------------------|-------------|
| polyfocus   | `save_pretrained` of a polyfocus model                       | (transformers' own from_pretrained) |
| llava-hf    | transformers' `LlavaForConditionalGeneration` (import, export) | llava_hf.py |
| llava       | original LLaVA-1.5 (and MMFuser, VW-LMM, LLaVA-S2 in its layout) | llava.py  |
| projector   | a stage-1 `mm_projector.bin` on a base LLM (`model_base`)    | llava.py    |
| mg-llava    | MG-LLaVA's xtuner state dict or converted layout             | mg_llava.py |
| lora        | a peft adapter over any of the above (merged on load)        | here        |

Also: a new model from a pretrained LLM and vision tower (backbones.py), MG-LLaVA's ConvNeXt weights (convnext.py),
QLoRA loading. Every path goes through transformers' `from_pretrained` with a `key_mapping`, so sharding, .bin
(`weights_only=True`) vs safetensors, dtype and device_map behave as users of transformers expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from polyfocus.checkpoints.common import copy_processor_files, has_tokenizer
from polyfocus.checkpoints.llava import LLAVA_TEXT_MODEL_TYPES, load_llava_original, vw_lmm_text_type
from polyfocus.checkpoints.llava_hf import load_llava_hf, save_llava_hf, to_llava_hf
from polyfocus.checkpoints.mg_llava import is_deepspeed_checkpoint, load_mg_llava
from polyfocus.config import MODEL_PARTS
from polyfocus.data.files import require_local
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

__all__ = ["ADAPTER_PROCESSOR_FILES", "SKIP_QUANTIZATION", "base_of", "checkpoint_format", "copy_processor_files",
           "has_tokenizer", "load_adapter", "load_model", "load_quantized", "merge_lora", "save_llava_hf",
           "to_llava_hf"]


def checkpoint_format(path: str | Path) -> str:
    """'polyfocus' | 'llava-hf' | 'llava' (original LLaVA-1.5) | 'projector' (stage-1 mm_projector.bin only)
    | 'lora' (a peft adapter directory: polyfocus.train.lora) | 'mg-llava' (MG-LLaVA's xtuner state dict, or
    its converted layout: see load_mg_llava)."""
    path = Path(require_local(path, "checkpoint", directory=Path(path).suffix not in (".pth", ".pt")))  # MG-LLaVA's
    if (path.suffix in (".pth", ".pt") and (path.is_file() or is_deepspeed_checkpoint(path))
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
        model_type = "llava_" + vw_lmm_text_type(raw)  # VW-LMM: LLaVA's flat layout under llava-hf's name
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
    for given, what in ((model_base, "model_base"), (vision_tower, "vision_tower"), (hires_tower, "hires_tower")):
        if given is not None:
            require_local(given, what, directory=what != "hires_tower")  # open_clip's ConvNeXt may be one file
    if fmt == "mg-llava":
        return load_mg_llava(path, model_base, vision_tower, hires_tower, **from_pretrained_kwargs)
    if fmt == "lora":
        return load_adapter(path, model_base, vision_tower=vision_tower, **from_pretrained_kwargs).merge_and_unload()
    if fmt == "polyfocus":
        return PolyfocusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    if fmt == "llava-hf":
        return load_llava_hf(path, **from_pretrained_kwargs)
    return load_llava_original(path, model_base, vision_tower, fmt == "projector", **from_pretrained_kwargs)


# ---- LoRA adapters and QLoRA ----------------------------------------------------------------------------------

ADAPTER_PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "preprocessor_config.json")

# Modules QLoRA keeps in full precision: everything but the LLM's body (they train in full or feed the LLM), and
# lm_head. An explicit list replaces transformers' default (lm_head).
SKIP_QUANTIZATION = [module for module, (part, _) in MODEL_PARTS.items() if part != "language_model"] + ["lm_head"]


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
    has_processor_files = any((adapter_dir / name).is_file() for name in ADAPTER_PROCESSOR_FILES)
    copy_processor_files(adapter_dir if has_processor_files else base, out_dir)
    return out_dir

