"""The experts that need no model: synthworld's pixel detector and the alt-text."""

from __future__ import annotations

from polyfocus.densefusion.experts.base import Detection, Expert, Item


class SynthworldDetector(Expert):
    """Closed-set detection for synthworld images (polyfocus/data/synthworld_detector.py): every object, labelled
    "colour shape" ("red star"), the stand-in for DenseFusion's EVA02 detector on the embedded world."""

    name = "synthworld"

    def __init__(self, min_score: float = 0.5):
        self.min_score = float(min_score)

    def __call__(self, items: list[Item]) -> None:
        from polyfocus.data.synthworld_detector import detect

        for item in items:
            item.hints.detections += [Detection.from_pixels(f"{colour} {shape}", box, item.image.size, score,
                                                            self.name)
                                      for box, colour, shape, score in detect(item.image) if score >= self.min_score]


class AltText(Expert):
    """World knowledge: the image's web alt-text, whitespace tidied and otherwise kept as is; it is noisy on purpose
    and the prompts tell the captioner it may be unrelated (spec §11.4)."""

    name = "alt_text"

    def __call__(self, items: list[Item]) -> None:
        for item in items:
            item.hints.alt_text = " ".join(item.alt_text.split()) if item.alt_text else None
