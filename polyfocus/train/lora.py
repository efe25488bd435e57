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
import logging
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from polyfocus.model.modeling import PolyfocusForConditionalGeneration

logger = logging.getLogger(__name__)

# peft full-matches a string `exclude_modules` against each module name: everything outside the LLM.
OUTSIDE_LLM = r"(?!language_model\.).*"


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


