"""What trains: the model's parts, stage freezing, and a parameter summary printed at the start of a run.

Every parameter belongs to one part, found from its name: the part of the model's module it sits in
(polyfocus/config.py's MODEL_PARTS, where a method adds its modules). Freezing, per-part learning rates and the summary
follow that table.
"""

from __future__ import annotations

import re

from torch import nn

from polyfocus.config import MODEL_PARTS

# part -> parameter-name prefixes (after any peft wrapper prefix is removed)
PARTS = {part: tuple(f"{module}." for module, (p, _) in MODEL_PARTS.items() if p == part)
         for part, _ in MODEL_PARTS.values()}
PEFT_PREFIX = "base_model.model."


def part_of(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"parameter {name!r} belongs to no model part; add its module to polyfocus.config.MODEL_PARTS")


def trainable_parts(tune_mm_mlp_adapter: bool, freeze_backbone: bool, freeze_mm_mlp_adapter: bool) -> set[str]:
    """LLaVA's flags → the parts that train in full (the vision tower is handled by `unfreeze_vision_layers`).

    The visual-word head trains whenever the model has one: in VW-LMM's stage 3 alone (tune_mm_mlp_adapter with
    freeze_mm_mlp_adapter), in stage 4 with the projector and the LLM. `freeze_modules: [vm_head]` freezes it."""
    parts = {"projector", "fusion", "visual_words"}
    if not (tune_mm_mlp_adapter or freeze_backbone):
        parts.add("language_model")
    if freeze_mm_mlp_adapter:  # the fuser too: in MMFuser's reference it is part of mm_projector
        parts -= {"projector", "fusion"}
    return parts


def configure_trainable(model: nn.Module, parts: set[str], unfreeze_vision_layers: int = 0,
                        freeze_modules: list[str] = ()) -> None:
    """Set requires_grad: the given parts train, the tower's top `unfreeze_vision_layers` layers train (-1: every
    tower weight that feeds the selected features), then anything matching a `freeze_modules` regex is frozen."""
    tower_trains = _vision_filter(model.config, unfreeze_vision_layers)
    patterns = [re.compile(p) for p in freeze_modules]
    for name, param in model.named_parameters():
        part = part_of(name)
        trains = part in parts or (part == "vision_tower" and tower_trains(name))
        if "lora_" in name:  # peft adapters always train; peft's frozen copy of a fully trained module never does
            trains = True
        elif ".original_module." in name:
            trains = False
        param.requires_grad_(trains and not any(p.search(name) for p in patterns))


def _vision_filter(config, n: int):
    """name -> trains, for the vision tower. "Top" counts down from the deepest layer the features are read from:
    with LLaVA's mm_vision_select_layer -2 the last layer (and post_layernorm) is unused, so training it would
    only waste memory and, under DDP, fail for parameters that get no gradient."""
    n_states = config.vision_config.num_hidden_layers + 1  # hidden states: embeddings, then one per layer
    used = max(i % n_states for i in config.select_layers)  # layers 0..used-1 feed the features
    if n < -1 or n > used:
        raise ValueError(f"unfreeze_vision_layers={n}: the selected features come from the first {used} layers "
                         f"of the vision tower (use 0..{used} or -1)")
    first = 0 if n == -1 else used - n

    def trains(name: str) -> bool:
        if n == 0:
            return False
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match:
            return first <= int(match.group(1)) < used
        return n == -1 and "post_layernorm" not in name and ".head." not in name  # embeddings, pre-LN

    return trains


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
