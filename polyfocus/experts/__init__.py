"""Vision experts, shared by MG-LLaVA's object boxes and DenseFusion's data engine.

- detectors.py: object detectors (image → boxes): OWLv2 / OWL-ViT / Grounding DINO, a tagger-queried detector, and
  the named detectors other parts register (synthworld's); what `box_detector` and `polyfocus boxes` use;
- DenseFusion's experts behind one interface (`Expert`: a batch of items in, hints added to each): OCR, the CLIP
  tagger (also `polyfocus boxes --tagger`), OWLv2 detection, the alt-text.

Adding an expert: a subclass of Expert with a `name` and a `__call__`, and a line in EXPERTS (or, for one that lives
with what it knows, e.g. synthworld's, `register_expert`). Its __init__ keywords are its options
(`--expert-option NAME.KEY=VALUE` on the command line).
"""

from __future__ import annotations

import importlib
import inspect

from polyfocus.experts.base import Detection, Expert, Hints, Item

# name -> "module:class", imported when used (each pulls in its own library), or a registered class
EXPERTS: dict[str, str | type[Expert]] = {
    "ocr": "polyfocus.experts.ocr:OCR",
    "tags": "polyfocus.experts.clip_tags:CLIPTagger",
    "owlv2": "polyfocus.experts.owlv2:OWLv2",
    "alt_text": "polyfocus.experts.alt_text:AltText",
}

__all__ = ["EXPERTS", "Detection", "Expert", "Hints", "Item", "build_experts", "expert_class", "register_expert"]


def register_expert(name: str, cls: type[Expert]) -> None:
    """An expert defined outside this package (synthworld's detector registers itself)."""
    EXPERTS[name] = cls


def expert_class(name: str) -> type[Expert]:
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; known: {', '.join(EXPERTS)}")
    if not isinstance(EXPERTS[name], str):
        return EXPERTS[name]
    module, cls = EXPERTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_experts(names: list[str], options: dict[str, dict] | None = None) -> list[Expert]:
    """The experts, in order, each built with its options ({name: {keyword: value}})."""
    options = dict(options or {})
    unknown = [n for n in options if n not in names]
    if unknown:
        raise ValueError(f"options given for expert(s) {unknown} that are not used (experts: {names})")
    if len(set(names)) != len(names):
        raise ValueError(f"an expert is listed twice: {names}")
    if "owlv2" in names and "queries" not in options.get("owlv2", {}) and (
            "tags" not in names or names.index("tags") > names.index("owlv2")):
        raise ValueError("the owlv2 expert is queried with the tags of the 'tags' expert: list tags before owlv2, "
                         "or give fixed queries (--expert-option owlv2.queries=FILE)")
    experts = []
    for name in names:
        cls = expert_class(name)
        known = list(inspect.signature(cls).parameters)
        wrong = [k for k in options.get(name, {}) if k not in known]
        if wrong:
            raise ValueError(f"expert {name!r} has no option(s) {wrong}; its options: {known}")
        experts.append(cls(**options.get(name, {})))
    return experts
