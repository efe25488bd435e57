"""Object boxes for MG-LLaVA's object tokens (spec mg_llava.md §1, §7, §9): the box JSON, and the
filtering and mapping that turn an image's detections into the model's `image_boxes`.

Box JSON (MG-LLaVA's `box_json_path`, what `polyfocus boxes` writes): a JSON list of records

    {"id": <sample id>, "boxes": [[x1, y1, x2, y2], ...], "scores": [float, ...], "labels": ["tag", ...]}

in pixels of the ORIGINAL image, keyed by the sample's `id` (as a string). Bad boxes (not four finite numbers,
x2 < x1 or y2 < y1) are rejected with the file, record and box named; boxes reaching out of the image are clipped to
it, and boxes entirely outside it are dropped with a warning naming the sample.

From an image's record to the model's boxes (`ObjectBoxes.for_image`), in MG-LLaVA's order:
    1. clip to the image (see above);
    2. class-wise NMS, IoU > `iou_threshold` suppressed; order: score, descending;
    3. a cap (`limit_num`, `limit_mode`): per_category keeps each label's top 20 (5 when limit_num < 50, 1 when the
       text is within 50 tokens of the length limit) if there are more than limit_num boxes or the text is that
       long, grouped by label in first-appearance order; per_image keeps the top limit_num (20 near the limit);
    4. into the processed (high-resolution) image's pixels as the image processor moves pixels (pad: shift by the
       pad offset; square: shortest edge + centre crop; resize), rounded (torch.round, as the reference), clipped
       to the image, boxes outside the crop dropped;
    5. none left: one all-zero box [0, 0, 0, 0] (the reference's), so every image has at least one object token.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from polyfocus.data.files import read_json, write_atomic
from polyfocus.data.images import ImageProcessor

logger = logging.getLogger(__name__)

PER_CATEGORY, PER_IMAGE = "per_category", "per_image"
NEAR_LIMIT_TOKENS = 50  # the reference's "close to max length": within 50 tokens of it


class BoxError(ValueError):
    """A bad box record: the message names the file (or source), the record and the box."""


@dataclass
class BoxRecord:
    """One image's detections in its own pixels: boxes [[x1, y1, x2, y2], ...], a score and a label each."""

    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def to_json(self, sample_id) -> dict:
        boxes = [[int(v) if float(v).is_integer() else v for v in box] for box in self.boxes]  # int pixels, as MG-LLaVA
        return {"id": sample_id, "boxes": boxes, "scores": self.scores, "labels": self.labels}


@dataclass
class BoxPolicy:
    """How many of an image's boxes become tokens (MG-LLaVA's defaults)."""

    iou_threshold: float = 0.2
    limit_mode: str = PER_CATEGORY
    limit_num: int | None = 100

    @classmethod
    def from_config(cls, config) -> BoxPolicy:
        return cls(config.box_iou_threshold, config.box_limit_mode, config.box_limit_num)


# ---- the box JSON ----------------------------------------------------------------------------------------------


def check_record(raw, where: str) -> BoxRecord:
    """A JSON record → BoxRecord; BoxError naming `where` (file and record) and the box on anything malformed."""
    if not isinstance(raw, dict):
        raise BoxError(f"{where}: a box record is a JSON object, got {type(raw).__name__}")
    boxes, scores, labels = raw.get("boxes"), raw.get("scores"), raw.get("labels")
    if not isinstance(boxes, list):
        raise BoxError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2], got {boxes!r:.80}")
    scores = [1.0] * len(boxes) if scores is None else scores
    labels = ["object"] * len(boxes) if labels is None else labels
    if not isinstance(scores, list) or not isinstance(labels, list) or not len(boxes) == len(scores) == len(labels):
        raise BoxError(f"{where}: 'boxes', 'scores' and 'labels' must be lists of one length, got "
                       f"{len(boxes)} boxes, {scores!r:.40} scores, {labels!r:.40} labels")
    clean = []
    for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise BoxError(f"{where}: box {i} must be four finite numbers [x1, y1, x2, y2], got {box!r:.80}")
        if box[2] < box[0] or box[3] < box[1]:
            raise BoxError(f"{where}: box {i} {box} is inverted (x2 < x1 or y2 < y1); boxes are [x1, y1, x2, y2]")
        if not _is_number(score) or not isinstance(label, str):
            raise BoxError(f"{where}: box {i} needs a finite score and a string label, got {score!r}, {label!r}")
        clean.append([float(v) for v in box])
    return BoxRecord(clean, [float(s) for s in scores], list(labels))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_box_json(path: str | os.PathLike) -> dict[str, BoxRecord]:
    """MG-LLaVA's box JSON (a list of records, or a mapping id → record) → {str(id): BoxRecord}."""
    path = os.fspath(path)
    data = read_json(path, BoxError)
    if isinstance(data, dict):
        data = [{"id": key, **value} if isinstance(value, dict) else value for key, value in data.items()]
    if not isinstance(data, list):
        raise BoxError(f"{path}: a box JSON is a list of {{id, boxes, scores, labels}} records")
    records = {}
    for n, raw in enumerate(data):
        if not isinstance(raw, dict) or "id" not in raw:
            raise BoxError(f"{path}: record #{n} has no 'id' (the sample it belongs to)")
        key = str(raw["id"])
        if key in records:
            raise BoxError(f"{path}: id {key!r} appears twice")
        records[key] = check_record(raw, f"{path}: id {key!r}")
    return records


def write_box_json(records: dict, path: str | os.PathLike) -> None:
    """{sample id: BoxRecord} → MG-LLaVA's box JSON (a list, written atomically)."""
    write_atomic(path, json.dumps([record.to_json(key) for key, record in records.items()]))


# ---- filtering ---------------------------------------------------------------------------------------------------


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.nms without torchvision: indices kept, by decreasing score; a box is suppressed by a kept one
    when their IoU is > iou_threshold (zero-area pairs: IoU 0/0, never suppressed)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order].double()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in range(len(boxes)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold  # NaN compares False
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: Sequence[str], iou_threshold: float):
    """Class-wise NMS (torchvision.ops.batched_nms): boxes only suppress boxes of their own label; kept indices by
    decreasing score."""
    keep = [torch.tensor([], dtype=torch.long)]
    for label in dict.fromkeys(labels):
        mine = torch.tensor([i for i, l in enumerate(labels) if l == label])
        keep.append(mine[nms(boxes[mine], scores[mine], iou_threshold)])
    keep = torch.cat(keep).sort().values  # ties in score keep the input order
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def limit(scores: torch.Tensor, labels: Sequence[str], policy: BoxPolicy, near_limit: bool = False) -> list[int]:
    """MG-LLaVA's cap on an image's (NMS-ordered) boxes: the indices kept, in the reference's order."""
    n = len(labels)
    if n == 0 or (policy.limit_num is None and not near_limit):
        return list(range(n))
    if policy.limit_mode == PER_IMAGE:
        k = 20 if near_limit else policy.limit_num
        return torch.topk(scores, k).indices.tolist() if n > k else list(range(n))
    # per category. The reference leaves limit_num == 50 undefined (a NameError); it gets 5 here.
    k = 1 if near_limit else (20 if policy.limit_num > 50 else 5)
    if not near_limit and n <= policy.limit_num:
        return list(range(n))
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    kept = []
    for members in groups.values():
        if len(members) > k:
            top = torch.topk(scores[members], k).indices.tolist()
            members = [members[i] for i in top]
        kept += members
    return kept


def clip_to_image(record: BoxRecord, width: int, height: int, where: str = "") -> BoxRecord:
    """Boxes clipped to the image; boxes entirely outside it are dropped (a warning names them)."""
    kept = BoxRecord()
    for i, (box, score, label) in enumerate(zip(record.boxes, record.scores, record.labels)):
        x1, y1, x2, y2 = box
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            logger.warning("%s: box %d %s lies outside the %dx%d image: dropped", where or "boxes", i, box, width,
                           height)
            continue
        kept.boxes.append([min(max(x1, 0), width), min(max(y1, 0), height), min(x2, width), min(y2, height)])
        kept.scores.append(score)
        kept.labels.append(label)
    return kept


def to_processed(boxes: torch.Tensor, width: int, height: int, processor: ImageProcessor) -> torch.Tensor:
    """[N, 4] boxes in a width x height image's pixels → [M, 4] in the processed image's pixels (M <= N: boxes
    outside the crop dropped), moved as `processor` moves pixels, rounded half to even (torch.round)."""
    size = processor.image_size
    if processor.aspect_ratio == "pad":  # expand2square pastes at the (side - w) // 2, (side - h) // 2 offset
        side = max(width, height)
        offset = torch.tensor([(side - width) // 2, (side - height) // 2] * 2, dtype=boxes.dtype)
        scale, start = torch.tensor(size / side), torch.zeros(4)
        boxes = boxes + offset
    elif processor.aspect_ratio == "square":  # shortest edge → size, centre crop (the processor's own arithmetic)
        scale = torch.tensor(size / min(width, height))
        new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        start = torch.tensor([(new_w - size) // 2, (new_h - size) // 2] * 2, dtype=boxes.dtype)
    else:  # "resize": each axis on its own
        scale, start = torch.tensor([size / width, size / height] * 2), torch.zeros(4)
    boxes = torch.round(boxes * scale) - start
    inside = (boxes[:, 2] >= 0) & (boxes[:, 3] >= 0) & (boxes[:, 0] <= size) & (boxes[:, 1] <= size)
    return boxes[inside].clamp(0, size)


# ---- an image's boxes for the model ------------------------------------------------------------------------------


class ObjectBoxes:
    """Where images' boxes come from (a box JSON's records by sample id, or a detector) and how they become the
    model's boxes: `for_image` → [N, 4] in the processed image's pixels, N >= 1.

    max_length: the sequence limit, for the reference's "close to max length" rule (None: no such rule, as at
    inference)."""

    def __init__(self, processor: ImageProcessor, policy: BoxPolicy | None = None,
                 records: dict[str, BoxRecord] | None = None, detector: Callable | None = None,
                 max_length: int | None = None, source: str = ""):
        self.processor, self.policy = processor, policy or BoxPolicy()
        self.records, self.detector, self.max_length, self.source = records, detector, max_length, source
        self.detections: dict[str, BoxRecord] = {}  # the detector's, by image file (many samples share an image)

    @classmethod
    def for_model(cls, config, processor: ImageProcessor, box_json: str | Sequence[str] | None = None,
                  max_length: int | None = None, required: bool = True,
                  detector: Callable | None = None) -> ObjectBoxes:
        """From a model config: its box policy, and `detector` (the one config.box_detector names:
        polyfocus.experts.detectors.model_detector) unless box JSON is given. required: refuse to make one with
        neither (training); inference may bring its boxes with the request."""
        files = [box_json] if isinstance(box_json, (str, os.PathLike)) else list(box_json or [])
        records = {}
        for file in files:
            for key, record in read_box_json(file).items():
                if key in records:
                    raise BoxError(f"{file}: id {key!r} is also in an earlier box JSON")
                records[key] = record
        detector = None if files else detector
        if required and not files and detector is None:
            raise ValueError("this model has object tokens: give boxes (box_json_path, from `polyfocus boxes`) or a "
                             "detector (box_detector: synthworld, or a local OWLv2 / Grounding DINO directory)")
        return cls(processor, BoxPolicy.from_config(config), records if files else None, detector, max_length,
                   ", ".join(map(str, files)))

    def record_of(self, sample_id, image: Image.Image | None, n_images: int = 1, path: str | None = None) -> BoxRecord:
        """The detections of a sample's image: its box JSON record, else the detector's on `image` (kept by image
        `path`, when given, for the next sample of that image)."""
        if self.records is not None:
            if n_images != 1:
                raise BoxError(f"the box JSON ({self.source}) holds one image's boxes per sample; this sample has "
                               f"{n_images} images")
            record = self.records.get(str(sample_id))
            if record is None:
                raise BoxError(f"no boxes for this sample in {self.source} (its records are keyed by the sample id)")
            return record
        if self.detector is None:
            raise BoxError("no boxes for this image: give them, or set the model's box_detector (synthworld, or a "
                           "local OWLv2 / Grounding DINO directory)")
        if image is None:
            raise BoxError("no box JSON and no image to detect boxes on")
        if path is None:
            return self.detector(image)
        if path not in self.detections:
            self.detections[path] = self.detector(image)
        return self.detections[path]

    def for_image(self, image: Image.Image, record: BoxRecord | None = None, text_tokens: int | None = None,
                  where: str = "") -> torch.Tensor:
        """One image's boxes for the model: [N, 4] float, pixels of the processed image, N >= 1 (steps 1-5 above).

        record: the image's detections (None: run the detector); text_tokens: the sample's length before object
        tokens (for the near-limit rule)."""
        if record is None:
            record = self.record_of(None, image)
        width, height = image.size
        record = clip_to_image(record, width, height, where)
        boxes = torch.tensor(record.boxes, dtype=torch.float64).view(-1, 4)
        scores = torch.tensor(record.scores, dtype=torch.float64)
        keep = batched_nms(boxes, scores, record.labels, self.policy.iou_threshold)
        labels = [record.labels[i] for i in keep.tolist()]
        near_limit = (self.max_length is not None and text_tokens is not None
                      and text_tokens >= self.max_length - NEAR_LIMIT_TOKENS)
        keep = keep[limit(scores[keep], labels, self.policy, near_limit)]
        boxes = to_processed(boxes[keep], width, height, self.processor)
        return (boxes if len(boxes) else torch.zeros(1, 4, dtype=boxes.dtype)).float()


def indexed(per_image: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image [N_i, 4] boxes → the model's image_boxes [sum N_i, 5] (image index, x1, y1, x2, y2)."""
    if not per_image:
        return torch.zeros(0, 5)
    return torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)])


# ---- `polyfocus boxes` ---------------------------------------------------------------------------------------------


def boxes_for_dataset(data_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                      detector: Callable | None = None, truth: dict[str, BoxRecord] | None = None,
                      truth_source: str = "") -> dict:
    """{sample id: BoxRecord} for every one-image sample of a LLaVA / messages file: from `detector` run on each
    image, or the true boxes of each sample's scene (`truth`: {scene id: record}, e.g. synthworld's
    `scene_box_records`; samples name their scene in "scene_id")."""
    from polyfocus.data.formats import load_samples
    from polyfocus.data.images import load_image

    samples = load_samples(data_path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.fspath(data_path))
    records = {}
    for sample in samples:
        if len(sample.images) != 1:
            continue  # text-only samples take no boxes; the box JSON holds one image per sample
        if sample.id is None:
            raise BoxError(f"{data_path}: {sample.name} has no id: box records are keyed by sample id")
        if truth is not None:
            scene_id = sample.extra.get("scene_id")
            if scene_id not in truth:
                raise BoxError(f"{data_path}: sample {sample.name}: scene {scene_id!r} is not in {truth_source}")
            records[str(sample.id)] = truth[scene_id]
        else:
            records[str(sample.id)] = detector(load_image(os.path.join(root, sample.images[0])))
    return records
