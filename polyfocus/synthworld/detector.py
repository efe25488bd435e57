"""A pixel-based detector for synthworld scenes: the objects of a rendered image, found from its pixels alone.

synthworld draws every shape as one flat palette colour (no anti-aliasing), on a background far from every palette
colour, with a free gap around every object. So:

1. colour: each pixel within `tolerance` of a palette colour (per channel) gets that colour; pixels near a
   background colour are background; the rest are "other" (a label plate and its text, drawn inside an object);
2. objects: the 8-connected components of one colour's pixels together with "other" pixels (so a plate that cuts a
   shape in two does not split it); the box is that of the colour's own pixels (half-open, synthworld's convention);
3. shape: the shape whose drawing in that box (synthworld's own drawing code) best matches the colour's pixels,
   ignoring "other" pixels; the score is that match's IoU (1.0 for a clean render).

It serves MG-LLaVA as a box source (`box_detector: synthworld`, `polyfocus boxes --detector synthworld`) and
DenseFusion's data engine as the "synthworld" detection expert: both names are registered with polyfocus.experts
when this module is imported (the package's root imports it, so every entry point has them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from polyfocus.data.boxes import BoxRecord
from polyfocus.experts import Detection, Expert, Item, register_expert
from polyfocus.experts.detectors import normalized, register_detector
from polyfocus.synthworld.scenes import BACKGROUNDS, COLOURS, SHAPES, Box, _draw_shape

PALETTE = np.array(list(COLOURS.values()), dtype=np.int16)  # [9, 3]
BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.int16)  # [4, 3]
BACKGROUND_TOLERANCE = 16  # textures move a background by at most 12 levels
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)

Found = tuple[Box, str, str, float]  # (box, colour, shape, score)


def detect(image: Image.Image | np.ndarray, tolerance: int = 8, min_pixels: int = 4) -> list[Found]:
    """The objects of a synthworld image as (box, colour, shape, score), in reading order (top to bottom, then left
    to right by box corner). box: pixels (x1, y1, x2, y2), half-open; score: IoU of the drawn shape in [0, 1].

    tolerance: per-channel distance (0-255) within which a pixel has a palette colour; min_pixels: smaller
    components are noise."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.int16)  # [H, W, 3]
    colour_of, other = classify_pixels(rgb, tolerance)
    detections = []
    for k, colour in enumerate(COLOURS):
        own = colour_of == k  # [H, W]
        if not own.any():
            continue
        labels, _ = ndimage.label(own | other, structure=EIGHT_NEIGHBOURS)
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            mask = own[region] & (labels[region] == index)
            if mask.sum() < min_pixels:  # a plate alone, or noise
                continue
            rows, cols = np.nonzero(mask)
            y0, x0 = region[0].start, region[1].start
            box = (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1)
            shape, score = classify_shape(own, other, box)
            detections.append((box, colour, shape, score))
    return sorted(detections, key=lambda d: (d[0][1], d[0][0]))


def classify_pixels(rgb: np.ndarray, tolerance: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] -> (palette index per pixel, -1 for none: [H, W]; "other" pixels, neither palette nor
    background: [H, W] bool). Decided once per distinct colour (a scene has a few hundred)."""
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]  # [H, W]
    keys, pixel_to_colour = np.unique(packed.ravel(), return_inverse=True)  # [U], [H*W]
    colours = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.int16)  # [U, 3]
    distance = np.abs(colours[:, None, :] - PALETTE).max(-1)  # [U, 9]
    colour_of = np.where(distance.min(-1) <= tolerance, distance.argmin(-1), -1)  # [U]
    background = (np.abs(colours[:, None, :] - BACKGROUND_RGB).max(-1) <= BACKGROUND_TOLERANCE).any(-1)  # [U]
    other = (colour_of < 0) & ~background
    shape = rgb.shape[:2]
    return colour_of[pixel_to_colour].reshape(shape), other[pixel_to_colour].reshape(shape)


def classify_shape(own: np.ndarray, other: np.ndarray, box: Box) -> tuple[str, float]:
    """The shape whose drawing fills `box` most like `own` does there, and that IoU; "other" pixels (a plate)
    count for neither side."""
    x1, y1, x2, y2 = box
    seen = own[y1:y2, x1:x2]
    valid = ~other[y1:y2, x1:x2]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        drawn = shape_mask(shape, box)
        union = ((seen | drawn) & valid).sum()
        iou = float(((seen & drawn) & valid).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def shape_mask(shape: str, box: Box) -> np.ndarray:
    """[y2 - y1, x2 - x1] bool: the pixels synthworld draws for `shape` in `box`. Drawn at the box's own place:
    rounding the vertices depends on where they are, not only on the box's size."""
    x1, y1, x2, y2 = box
    canvas = Image.new("L", (x2, y2))
    _draw_shape(ImageDraw.Draw(canvas), shape, box, (255,))
    return np.asarray(canvas.crop(box)) > 0


# ---- as a box source and as an expert ----------------------------------------------------------------------------


class SynthworldDetector:
    """A box source (image → BoxRecord): labels "<colour> <shape>"; with queries, only the detections matching one (a
    query matches a label, its colour or its shape)."""

    def __init__(self, queries: Sequence[str] | None = None):
        self.queries = normalized(queries) if queries else None

    def __call__(self, image: Image.Image, queries: Sequence[str] | None = None) -> BoxRecord:
        """queries: this image's (a tagger's), instead of the detector's own."""
        queries = normalized(queries) if queries is not None else self.queries
        record = BoxRecord()
        for box, colour, shape, score in detect(image):
            label = f"{colour} {shape}"
            if queries is None or any(q in (label, colour, shape) for q in queries):
                record.boxes.append([float(v) for v in box])
                record.scores.append(float(score))
                record.labels.append(label)
        return record


class SynthworldExpert(Expert):
    """Closed-set detection for DenseFusion's engine: every object, labelled "colour shape" ("red star"), the
    stand-in for DenseFusion's EVA02 detector on the embedded world."""

    name = "synthworld"

    def __init__(self, min_score: float = 0.5):
        self.min_score = float(min_score)

    def __call__(self, items: list[Item]) -> None:
        for item in items:
            item.hints.detections += [Detection.from_pixels(f"{colour} {shape}", box, item.image.size, score,
                                                            self.name)
                                      for box, colour, shape, score in detect(item.image) if score >= self.min_score]


def scene_box_records(path) -> dict[str, BoxRecord]:
    """An export's scenes.jsonl → {scene id: every object's exact box, score 1, label "<colour> <shape>"}: the true
    boxes (`polyfocus boxes --scenes`)."""
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                scene = json.loads(line)
                objects = scene["objects"]
                records[scene["id"]] = BoxRecord([[float(v) for v in o["box"]] for o in objects], [1.0] * len(objects),
                                                 [f"{o['colour']} {o['shape']}" for o in objects])
    return records


register_detector("synthworld", SynthworldDetector)
register_expert("synthworld", SynthworldExpert)
