"""What the experts share: an image going through the engine (`Item`), the structured hints the experts add to it
(`Hints`, `Detection`), and the interface of an expert.

An expert takes a batch of items (each with its decoded image) and adds what it finds to each item's hints. The
engine runs them in the order given, so a later expert may read an earlier one's hints (OWLv2 is queried with the
CLIP tagger's tags, as DenseFusion queries OWL-ViTv2 with RAM++'s).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 normalised to [0, 1] by the image's width and height
    score: float
    expert: str  # which expert found it

    @classmethod
    def from_pixels(cls, label: str, box, size: tuple[int, int], score: float, expert: str) -> Detection:
        """A pixel box (x1, y1, x2, y2) of an image of `size` (width, height), normalised and clipped to [0, 1]."""
        width, height = size
        x1, y1, x2, y2 = (float(v) for v in box)
        clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
        return cls(label, (clip(x1 / width), clip(y1 / height), clip(x2 / width), clip(y2 / height)), float(score),
                   expert)


@dataclass
class Hints:
    """Everything the experts found about one image (spec densefusion.md §3)."""
    alt_text: str | None = None  # world knowledge: the web alt-text, kept as is (noisy on purpose)
    tags: list[str] = field(default_factory=list)  # image tagging: the query vocabulary of open-set detection
    detections: list[Detection] = field(default_factory=list)
    ocr: list[str] = field(default_factory=list)  # one recognised text line each

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Hints:
        detections = [Detection(x["label"], tuple(x["box"]), x["score"], x["expert"]) for x in d.get("detections", [])]
        return cls(d.get("alt_text"), list(d.get("tags", [])), detections, list(d.get("ocr", [])))


@dataclass
class Item:
    """One image through the engine: where it comes from, its decoded pixels (while it is worked on) and its hints."""
    image_id: str
    image_path: str | None = None  # relative to the image root
    url: str | None = None
    alt_text: str | None = None
    image: Image.Image | None = None
    hints: Hints = field(default_factory=Hints)

    def source(self) -> dict:
        """The JSON-able part: what an engine worker needs to redo this item."""
        return {"image_id": self.image_id, "image_path": self.image_path, "url": self.url, "alt_text": self.alt_text}


class Expert:
    """A vision expert. Subclasses set `name` and implement `__call__`; their __init__ keywords are the options a
    user passes as `--expert-option NAME.KEY=VALUE`. Model-backed experts load from local directories."""

    name: str = ""

    def __call__(self, items: list[Item]) -> None:
        """Add this expert's findings to `item.hints` for each item (its image is `item.image`, RGB)."""
        raise NotImplementedError


def hf_image_processor(path: str):
    """transformers' image processor of a model directory; the PIL backend where torchvision is not installed (as
    here: it is not a dependency), which transformers would otherwise pick with a warning."""
    from transformers import AutoImageProcessor

    backend = None if importlib.util.find_spec("torchvision") else "pil"
    return AutoImageProcessor.from_pretrained(path, backend=backend)


def pooled(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` give a tensor, or (transformers 5) an output whose pooler_output
    holds the projected features."""
    return output if torch.is_tensor(output) else output.pooler_output


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
