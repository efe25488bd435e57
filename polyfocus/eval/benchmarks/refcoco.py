"""RefCOCO / RefCOCO+ / RefCOCOg grounding: Acc@0.5 (a referring expression is right when the predicted box
overlaps the annotated one with IoU >= 0.5).

Files: the original release (`refer` toolkit layout): `refs(unc).p` (RefCOCO, RefCOCO+) or `refs(umd).p`
(RefCOCOg), a pickled list of refs `{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent_id",
"sent"}]}`, next to `instances.json` (COCO-style `images` and `annotations` with `bbox` = [x, y, w, h]); the
COCO `train2014/` images. The pickle is read with an unpickler that refuses every class and function, so a
file cannot run code. One question per sentence of the chosen split (val, testA, testB; RefCOCOg: val, test).

Prompt: LLaVA-1.5's grounding instruction, "Please provide the bounding box coordinate of the region this
sentence describes: <sentence>". The reply's first four numbers are the box. Numbers in [0, 1] are read as
LLaVA-1.5 writes boxes: normalised to the image *after* pad-to-square (box_space="pad", the default;
"image" = normalised to the original image) [unverified: LLaVA's RefCOCO evaluation is not in its repo];
larger numbers are taken as pixels.
"""

from __future__ import annotations

import pickle

from polyfocus.data.prompts import iou, parse_box
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, field_of, percent, read_json

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


class _NoClasses(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a refs file holds only plain data")


def read_refs(path) -> list[dict]:
    try:
        with open(path, "rb") as f:
            refs = _NoClasses(f, encoding="latin1").load()  # the release was pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise EvalDataError(f"{path}: not a readable refs pickle ({e})") from None
    if not isinstance(refs, list):
        raise EvalDataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def box_to_pixels(box, width: int, height: int, box_space: str = "pad") -> tuple[float, ...]:
    """A predicted (x1, y1, x2, y2) in pixels of the original image."""
    if max(box) > 1.0:
        return tuple(box)
    if box_space == "image":
        return (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    side = max(width, height)  # expand2square centres the image on a side x side canvas
    dx, dy = (side - width) / 2, (side - height) / 2
    return (box[0] * side - dx, box[1] * side - dy, box[2] * side - dx, box[3] * side - dy)


class RefCOCO(Benchmark):
    name = "refcoco"
    refs_file = "refs(unc).p"
    splits = ("val", "testA", "testB")

    def __init__(self, data, split: str = "val", image_folder: str = "train2014", refs: str | None = None,
                 instances: str = "instances.json", box_space: str = "pad"):
        super().__init__(data)
        if split not in self.splits:
            raise EvalDataError(f"{self.name}: split {split!r} is not one of {self.splits}")
        if box_space not in ("pad", "image"):
            raise EvalDataError(f"{self.name}: box_space must be 'pad' or 'image', got {box_space!r}")
        self.split, self.image_folder, self.box_space = split, image_folder, box_space
        self.refs, self.instances = refs or self.refs_file, instances

    def load(self) -> list[Row]:
        refs_path = self.require(self.refs, "refs file")
        instances_path = self.require(self.instances, "instances.json")
        instances = read_json(instances_path)
        images = {i["id"]: i for i in field_of(instances, "images", str(instances_path), list)}
        boxes = {a["id"]: a["bbox"] for a in field_of(instances, "annotations", str(instances_path), list)}
        rows = []
        for i, ref in enumerate(read_refs(refs_path)):
            if not isinstance(ref, dict) or ref.get("split") != self.split:
                continue
            where = f"{refs_path}[{i}]"
            image = images.get(field_of(ref, "image_id", where))
            box = boxes.get(field_of(ref, "ann_id", where))
            if image is None or box is None:
                raise EvalDataError(f"{where}: image {ref['image_id']} or annotation {ref['ann_id']} is not in "
                                    f"{instances_path}")
            x, y, w, h = box
            for sentence in field_of(ref, "sentences", where, list):
                text = field_of(sentence, "sent", where, str)
                rows.append(Row(question_id=field_of(sentence, "sent_id", where), prompt=GROUNDING_PROMPT + text,
                                images=[self.path(self.image_folder) / image["file_name"]], question=text,
                                reference=[x, y, x + w, y + h], where=where,
                                meta={"width": image["width"], "height": image["height"]}))
        if not rows:
            raise EvalDataError(f"{refs_path}: no refs in split {self.split!r}")
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        box = parse_box(answer)
        if box is None:
            return {"score": 0.0, "box": None, "iou": 0.0}
        pixels = box_to_pixels(box, row.meta["width"], row.meta["height"], self.box_space)
        overlap = iou(pixels, row.reference)
        return {"score": float(overlap >= 0.5), "box": [round(v, 2) for v in pixels], "iou": overlap}

    def aggregate(self, rows, judged) -> dict:
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "mean_iou": percent(j["iou"] for j in judged), "split": self.split}


class RefCOCOPlus(RefCOCO):
    name = "refcoco+"


class RefCOCOg(RefCOCO):
    name = "refcocog"
    refs_file = "refs(umd).p"
    splits = ("val", "test")
