"""World knowledge: the image's web alt-text, as DenseFusion's captioner is given it."""

from __future__ import annotations

from polyfocus.experts.base import Expert, Item


class AltText(Expert):
    """The alt-text with whitespace tidied and otherwise kept as is; it is noisy on purpose and the prompts tell the
    captioner it may be unrelated (spec §11.4)."""

    name = "alt_text"

    def __call__(self, items: list[Item]) -> None:
        for item in items:
            item.hints.alt_text = " ".join(item.alt_text.split()) if item.alt_text else None
