"""What trains: the model's parts, stage freezing, and a parameter summary printed at the start of a run.

Every parameter belongs to one part, found from its name. Later methods add their modules to PARTS
(fusion modules to "fusion"), and everything here (freezing, per-part learning rates, the summary) follows.
"""

from __future__ import annotations

import re

from torch import nn

# part -> parameter-name prefixes (after any peft wrapper prefix is removed)
PARTS = {
    "vision_tower": ("vision_tower.",),
    "projector": ("mm_projector.",),
    "fusion": ("mm_fusion.",),
    "language_model": ("language_model.",),
}
PEFT_PREFIX = "base_model.model."


def part_of(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to no model part; add its prefix to polyfocus.train.freeze.PARTS")


def trainable_parts(tune_mm_mlp_adapter: bool, freeze_backbone: bool, freeze_mm_mlp_adapter: bool) -> set[str]:
    """LLaVA's flags → the parts that train in full (the vision tower is handled by `unfreeze_vision_layers`)."""
    parts = {"projector", "fusion"}
    if not (tune_mm_mlp_adapter or freeze_backbone):
        parts.add("language_model")
    if freeze_mm_mlp_adapter:
        parts -= {"projector"}
    return parts


def configure_trainable(model: nn.Module, parts: set[str], unfreeze_vision_layers: int = 0,
                        freeze_modules: list[str] = ()) -> None:
    """Set requires_grad: the given parts train, the tower's top `unfreeze_vision_layers` layers (-1: all of it)
    train, then anything matching a `freeze_modules` regex is frozen."""
    vision_layers = _top_vision_layers(model, unfreeze_vision_layers)
    patterns = [re.compile(p) for p in freeze_modules]
    for name, param in model.named_parameters():
        part = part_of(name)
        trains = part in parts or (part == "vision_tower" and _in_layers(name, vision_layers, unfreeze_vision_layers))
        if "lora_" in name:  # peft adapters always train; peft's frozen copy of a fully trained module never does
            trains = True
        elif ".original_module." in name:
            trains = False
        param.requires_grad_(trains and not any(p.search(name) for p in patterns))


def _top_vision_layers(model: nn.Module, n: int) -> set[int]:
    if n == 0 or n == -1:
        return set()
    layers = model.config.vision_config.num_hidden_layers
    if n < -1 or n > layers:
        raise ValueError(f"unfreeze_vision_layers={n}: the vision tower has {layers} layers (use 0..{layers} or -1)")
    return set(range(layers - n, layers))


def _in_layers(name: str, layers: set[int], n: int) -> bool:
    if n == -1:
        return True
    match = re.search(r"\.layers\.(\d+)\.", name)
    return bool(match) and int(match.group(1)) in layers


def parameter_summary(model: nn.Module) -> str:
    """One line per part: trainable / total parameters."""
    totals: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = "lora" if "lora_" in name else part_of(name)
        counts = totals.setdefault(part, [0, 0])
        counts[0] += param.numel() if param.requires_grad else 0
        counts[1] += param.numel()
    width = max(len(p) for p in totals)
    lines = [f"{part:<{width}}  {t:>13,} / {n:>13,} trainable" for part, (t, n) in totals.items()]
    trainable, total = sum(t for t, _ in totals.values()), sum(n for _, n in totals.values())
    lines.append(f"{'all':<{width}}  {trainable:>13,} / {total:>13,} trainable ({100 * trainable / total:.2f}%)")
    return "\n".join(lines)
