"""What the checkpoint loaders share: loading under renamed keys, reading a checkpoint's weight names, a tower
directory's config and weights, and the tokenizer / image-processor files beside the weights.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from polyfocus.config import PolyfocusConfig
from polyfocus.model.modeling import PolyfocusForConditionalGeneration


@contextmanager
def quiet_loading_report():
    """Mute transformers' load report (a warning listing missing keys) where the missing keys are the point: the
    modules a new model initialises itself."""
    # A filter, not a higher level: transformers runs extra checks (and warns of them) when this logger's level is
    # raised.
    report = logging.getLogger("transformers.modeling_utils")
    mute = logging.Filter("nothing")  # passes no record
    report.addFilter(mute)
    try:
        yield
    finally:
        report.removeFilter(mute)


def load_renamed(path, config: PolyfocusConfig, key_mapping: dict[str, str], may_miss: tuple[str, ...] = (),
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


def renamed(key: str, mapping: dict[str, str]) -> str:
    """A key renamed as transformers' key_mapping does: every matching pattern, in order."""
    for pattern, replacement in mapping.items():
        key = re.sub(pattern, replacement, key)
    return key


def checkpoint_keys(path: Path) -> set[str]:
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


def vision_config_of(tower_path: Path) -> PreTrainedConfig:
    """A tower directory holds either a vision config or a full CLIP/SigLIP one (take its vision part)."""
    config = AutoConfig.from_pretrained(tower_path)
    return getattr(config, "vision_config", config)


def vision_state(tower) -> dict[str, torch.Tensor]:
    """State dict of a loaded tower in our tower's layout: a whole CLIP/SigLIP model gives its vision part."""
    return (tower.vision_model if hasattr(tower, "text_model") else tower).state_dict()


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def copy_processor_files(src: str | Path, dst: str | Path) -> None:
    """Tokenizer, chat template and image-processor files: what a model directory needs besides weights."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "added_tokens.json", "preprocessor_config.json"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)

