"""DualFocus data (spec dualfocus.md §2-3): the box as text, the zoom crop shared by training and inference, and the
conversion of box-annotated VQA into DualFocus's two-turn training format (`polyfocus dualfocus-data IN OUT`).

A training record (LLaVA JSON; the crop is written as an image file, so the ordinary dataset trains on it):

    {"id": "..._dualfocus", "image": ["images/scene.png", "train_crops/scene_1a2b3c4d_40_52_98_110.png"],
     "sub_area": [0.12, 0.34, 0.56, 0.78],
     "conversations": [
       {"from": "human", "value": "<image>\\n" + BOX_PROMPT + "{Q}"},
       {"from": "gpt",   "value": "[0.12, 0.34, 0.56, 0.78]"},
       {"from": "human", "value": "<image>\\n" + ZOOM_PROMPT + "{prompt}"},
       {"from": "gpt",   "value": "{answer}"}]}

BOX_PROMPT = "Please provide the bounding box coordinate of the region this question asks: ",
ZOOM_PROMPT = "Please combine the information from these two images and answer this question: " (spec §2, §4).

Q is the bare question (no options, no answer-format line); {prompt} is the sample's own prompt (question, options
and answer-format line), as the micro turn at inference. Both replies are supervised (LLaVA's v1 masking).

The crop comes from the box *as written in the text* (two decimals), through `zoom`, the function inference uses on
the model's predicted box text: a model that predicts the training box exactly sees exactly the training crop. (The
reference crops from the unrounded `sub_area`; the difference is at most half a hundredth of the image side.)

Inputs (`convert`): any LLaVA / messages file whose single-image records carry an evidence box per question
(synthworld's `boxes`, normalised; or `sub_area`, DualFocus's own key, normalised or in pixels; a multi-turn record,
as synthworld's conversations, gives one list item per question); a DualFocus record
that is already two-turn (its crop is made); or GQA's questions JSON with its scene graphs (`scene_graphs=`): the
box is the union of the objects the question and answer annotations point at (spec §2.2, GQA route).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from polyfocus.data.files import read_json
from polyfocus.data.formats import DataError, Sample, load_samples, save_samples
from polyfocus.data.images import ImageLoadError, load_image
from polyfocus.data.prompts import MC_ANSWER, MC_ANSWER_CN, SHORT_ANSWER, box_text  # box_text: DualFocus's box2str
from polyfocus.data.templates import IMAGE_TOKEN

BOX_PROMPT = "Please provide the bounding box coordinate of the region this question asks: "
ZOOM_PROMPT = "Please combine the information from these two images and answer this question: "
MARGIN = 25  # pixels added around the squared box (the reference's enlarge_pixel)
MIN_SIDE = 2  # a crop narrower than this is degenerate (spec §6: fall back to the macro answer)
MAX_AREA = 0.7  # boxes covering more of the image are not worth zooming into (spec §2.2 recommends 50-70 %)
# synthworld families whose answer is not a word or phrase
NOT_VQA = ("grounding", "caption", "dense_caption", "chat", "facts")
# A multi-turn record's per-question keys (synthworld's conversations) and the key each has on one question
PER_TURN_KEYS = {"boxes": "boxes", "families": "family", "meta": "meta"}

# The reference's find_boxes: four unsigned decimals separated by commas; the first match wins, signs are ignored.
_BOX = re.compile(r"(\d+\.?\d*),\s*(\d+\.?\d*),\s*(\d+\.?\d*),\s*(\d+\.?\d*)")
_OPTION = re.compile(r"^([A-Z])\. (.*)$")
_INSTRUCTIONS = {s.strip() for s in (SHORT_ANSWER, MC_ANSWER, MC_ANSWER_CN)}
_OCR_PREFIX = "Reference OCR token:"  # LLaVA's TextVQA prompt line; the box prompt uses the bare question (§4)

Box = tuple[float, float, float, float]


# ----------------------------------------------------------------------------- box text and the crop


def parse_box_text(text: str) -> Box | None:
    """The first "x1, y1, x2, y2" in `text` (as `box_text` writes it, brackets optional), or None."""
    match = _BOX.search(text)
    return tuple(float(v) for v in match.groups()) if match else None


def to_pixels(box: Box, width: int, height: int) -> Box:
    """A box normalised by the original width/height -> pixels."""
    return box[0] * width, box[1] * height, box[2] * width, box[3] * height


def zoom_box(box: Box, width: int, height: int, margin: int = MARGIN) -> tuple[int, int, int, int] | None:
    """The reference's crop box (misc/boxes.py expand_box + enlarge_box) for a pixel box: a square of the box's
    longer side around its centre, clipped to [0, W-1] x [0, H-1], grown by `margin` pixels, clipped again and
    truncated to ints. None where the reference fails (every coordinate <= 1 pixel: its assertion) or where the crop
    would be degenerate (a side under MIN_SIDE pixels, which the reference does not guard)."""
    if max(box) <= 1:
        return None
    # In float32, as the reference (expand_box casts the pixel box to float32): where a coordinate lands on an
    # integer, float64 and float32 round to opposite sides of it and truncate 1 px apart (~0.4 % of crops).
    b = np.asarray(box, dtype=np.float32)
    centre, side = (b[:2] + b[2:]) / 2, (b[2:] - b[:2]).max()
    limits = np.array([width - 1, height - 1] * 2, dtype=np.float32)
    square = np.clip(np.concatenate([centre - side / 2, centre + side / 2]), 0, limits)
    grown = square + np.array([-margin, -margin, margin, margin], dtype=np.float32)
    x1, y1, x2, y2 = (int(v) for v in np.clip(grown, 0, limits))  # values >= 0: int() truncates as astype
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
        return None
    return x1, y1, x2, y2


def zoom(image: Image.Image, box: Box) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """The zoomed crop for a normalised box (a parsed prediction or a training box) and its pixel box, or None.
    The crop is image[y1:y2, x1:x2] (end-exclusive, as the reference's numpy slice); the image processor then pads
    it to a square and resizes it like any image."""
    crop_box = zoom_box(to_pixels(box, *image.size), *image.size)
    if crop_box is None:
        return None
    return image.crop(crop_box), crop_box


# ----------------------------------------------------------------------------- prompts


@dataclass
class Question:
    """A VQA prompt taken apart: `question` goes into the box prompt, `options` decide the selection rule."""

    prompt: str  # the whole user text without "<image>" (question, options, answer-format line)
    question: str  # the bare question
    options: list[str] | None = None  # option texts, for "A. ...\nB. ..." lines


def split_prompt(text: str) -> Question:
    """Take a LLaVA-style VQA prompt apart: the image tags go; a final answer-format line (LLaVA-1.5's short-answer
    or option-letter instruction), a trailing block of "A. ..." option lines and TextVQA's "Reference OCR token"
    line are not part of the bare question. What is left (a hint or context line included) is the question."""
    prompt = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
    lines = prompt.split("\n")
    if len(lines) > 1 and lines[-1].strip() in _INSTRUCTIONS:
        lines = lines[:-1]
    options = []
    while len(lines) > 1 and (m := _OPTION.match(lines[-1])):
        options.insert(0, m)
        lines = lines[:-1]
    letters = [m.group(1) for m in options]
    if letters != [chr(ord("A") + i) for i in range(len(letters))] or len(letters) < 2:
        lines += [m.group(0) for m in options]  # not an A, B, C... block: part of the question
        options = []
    question = "\n".join(line for line in lines if not line.startswith(_OCR_PREFIX)).strip()
    return Question(prompt, question, [m.group(2) for m in options] or None)


def box_turn(question: str) -> str:
    """Round 1: ask for the region's box."""
    return f"{IMAGE_TOKEN}\n{BOX_PROMPT}{question}"


def zoom_turn(prompt: str) -> str:
    """Round 2: the full question again, with the full image and the crop."""
    return f"{IMAGE_TOKEN}\n{ZOOM_PROMPT}{prompt}"


# ----------------------------------------------------------------------------- conversion


@dataclass
class VQA:
    """One box-annotated question, from whichever input format."""

    id: str
    image: str  # path relative to the input image folder
    prompt: str
    answer: str
    boxes: list  # evidence boxes: normalised, or pixels (a box with any value > 1)
    extra: dict


def convert(src: str | os.PathLike, dst: str | os.PathLike, image_folder: str | os.PathLike | None = None,
            crops: str | os.PathLike | None = None, scene_graphs: str | os.PathLike | None = None,
            max_area: float = MAX_AREA, families: list[str] | None = None) -> dict:
    """Write DualFocus training records for every usable question of `src` to `dst` (LLaVA JSON, or JSONL by
    suffix) and their crops as PNGs under `crops` (default: `<dst stem>_crops/` next to `dst`). Image paths in
    `dst` are relative to `dst`'s directory (the training default when `image_folder` is unset there).

    image_folder: where `src`'s image paths are relative to (default: `src`'s directory).
    scene_graphs: GQA's sceneGraphs JSON; `src` is then GQA's questions JSON.
    families: synthworld families to convert (default: all but NOT_VQA).
    Questions without a box, with a box over `max_area` of the image or a degenerate one are skipped and counted
    (with the first few ids) in the returned summary; anything malformed raises DataError naming file and sample.
    """
    src, dst = Path(src), Path(dst)
    image_root = Path(image_folder) if image_folder is not None else src.parent
    crops = Path(crops) if crops is not None else dst.with_name(dst.stem + "_crops")
    crops.mkdir(parents=True, exist_ok=True)
    questions = gqa_questions(src, scene_graphs) if scene_graphs is not None else vqa_questions(src)
    wanted = set(families) if families is not None else None
    records, skipped = [], defaultdict(list)
    for q in questions:
        family = q.extra.get("family")
        if family is not None and (family not in wanted if wanted is not None else family in NOT_VQA):
            skipped["family"].append(q.id)
            continue
        reason, record = make_record(q, image_root, dst.parent, crops, max_area)
        if reason:
            skipped[reason].append(q.id)
        else:
            records.append(record)
    if not records:
        raise DataError(f"{src}: no question could be converted (skipped: "
                        f"{ {k: len(v) for k, v in skipped.items()} })", "empty")
    save_samples(records, dst)
    return {"src": str(src), "dst": str(dst), "crops": str(crops), "written": len(records),
            "skipped": {k: {"n": len(v), "first": v[:5]} for k, v in skipped.items()}}


def make_record(q: VQA, image_root: Path, out_root: Path, crops: Path, max_area: float
                ) -> tuple[str | None, Sample | None]:
    """(skip reason, None) or (None, the two-turn sample), its crop written under `crops`."""
    if not q.boxes:
        return "no_box", None
    path = image_root / q.image
    try:
        image = load_image(path)
    except ImageLoadError as e:
        raise DataError(f"sample {q.id!r}: {e}", "image", sample=q.id) from None
    width, height = image.size
    box = union([to_normalised(b, width, height, q.id) for b in q.boxes])
    x1, y1, x2, y2 = to_pixels(box, width, height)
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:  # (spec §2.2) inverted, or too thin to show anything
        return "degenerate_box", None
    if (box[2] - box[0]) * (box[3] - box[1]) > max_area:
        return "large_box", None
    text = box_text(box)
    zoomed = zoom(image, parse_box_text(text))
    if zoomed is None:
        return "degenerate_box", None
    crop, crop_box = zoomed
    # One file per (image, crop box): questions about the same region share it. PNG: the pixels inference crops.
    crop_path = crops / f"{Path(q.image).stem}_{hashlib.sha1(q.image.encode()).hexdigest()[:8]}_" \
                        f"{'_'.join(map(str, crop_box))}.png"
    crop.save(crop_path)
    parts = split_prompt(q.prompt)
    messages = [{"role": "user", "content": box_turn(parts.question)}, {"role": "assistant", "content": text},
                {"role": "user", "content": zoom_turn(parts.prompt)}, {"role": "assistant", "content": q.answer}]
    images = [os.path.relpath(path, out_root), os.path.relpath(crop_path, out_root)]
    extra = {**q.extra, "sub_area": [round(v, 4) for v in box]}
    return None, Sample(f"{q.id}_dualfocus", messages, images, extra)


def to_normalised(box, width: int, height: int, name: str) -> Box:
    """A box as [0, 1] fractions of the original size. As the reference's denorm_bbox: all values <= 1 means
    normalised, otherwise pixels."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise DataError(f"sample {name!r}: a box must be 4 numbers [x1, y1, x2, y2], got {box!r:.80}", sample=name)
    if max(box) <= 1:
        return tuple(float(v) for v in box)
    return box[0] / width, box[1] / height, box[2] / width, box[3] / height


def union(boxes: list[Box]) -> Box:
    """The smallest box holding all of them (spec §2.2: the union of the referenced objects)."""
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


# ----------------------------------------------------------------------------- readers


def vqa_questions(path: Path) -> list[VQA]:
    """The questions of a LLaVA / messages file, with their evidence boxes (`boxes` or `sub_area`): one per record
    of one question and its answer, or per question of a multi-turn record whose per-turn keys are lists, one item
    per question (synthworld's conversations: `boxes`, `families`, `meta`). A DualFocus record that is already
    two-turn keeps its own question, prompt and answer."""
    out = []
    for sample in load_samples(path):
        if len(sample.images) != 1:
            raise DataError(f"{path}: sample {sample.name}: DualFocus data needs one image per question, got "
                            f"{len(sample.images)}", sample=sample.name)
        sample_id = str(sample.id if sample.id is not None else sample.where)
        turns = [m for m in sample.messages if m["role"] != "system"]
        if len(turns) == 4 and turns[0]["content"].startswith(box_turn("")):  # already DualFocus: reuse its turns
            prompt = turns[2]["content"].replace(IMAGE_TOKEN, "").strip().removeprefix(ZOOM_PROMPT)
            out.append(question_of(path, sample, sample_id, prompt, turns[-1]["content"], dict(sample.extra)))
            continue
        if len(turns) < 2 or len(turns) % 2 or [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2):
            raise DataError(f"{path}: sample {sample.name}: expected questions each followed by its answer, got "
                            f"the roles {[m['role'] for m in turns]}", sample=sample.name)
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
        if len(pairs) == 1:
            out.append(question_of(path, sample, sample_id, *pairs[0], dict(sample.extra)))
            continue
        per_turn = {k: v for k, v in sample.extra.items() if k in PER_TURN_KEYS}
        if "boxes" not in per_turn or any(not isinstance(v, list) or len(v) != len(pairs) for v in per_turn.values()):
            raise DataError(f"{path}: sample {sample.name}: a record of {len(pairs)} questions needs 'boxes' (and "
                            f"'families', 'meta' if given) as lists of {len(pairs)} items, one per question",
                            sample=sample.name)
        shared = {k: v for k, v in sample.extra.items() if k not in per_turn}
        for k, (prompt, answer) in enumerate(pairs):
            extra = {**shared, **{PER_TURN_KEYS[key]: v[k] for key, v in per_turn.items()}}
            out.append(question_of(path, sample, f"{sample_id}_{k}", prompt, answer, extra))
    return out


def question_of(path: Path, sample: Sample, qid: str, prompt: str, answer: str, extra: dict) -> VQA:
    """One question with its evidence boxes (`boxes`, or DualFocus's own `sub_area`) taken out of `extra`."""
    boxes = extra.pop("boxes", None)
    if boxes is None and "sub_area" in extra:
        boxes = [extra.pop("sub_area")]
    if not isinstance(boxes, list) or (boxes and not isinstance(boxes[0], (list, tuple))):
        raise DataError(f"{path}: sample {sample.name}: 'boxes' must be a list of [x1, y1, x2, y2] (or give "
                        f"'sub_area'), got {boxes!r:.80}", sample=sample.name)
    return VQA(qid, sample.images[0], prompt, answer, boxes, extra)


def gqa_questions(path: Path, scene_graphs: str | os.PathLike) -> list[VQA]:
    """GQA's questions JSON ({qid: {"imageId", "question", "answer", "annotations"}}) with its scene graphs
    ({imageId: {"width", "height", "objects": {id: {"x", "y", "w", "h"}}}}); images are "<imageId>.jpg". The box
    is the union of every object the question, answer and fullAnswer annotations point at; the prompt is LLaVA's
    GQA prompt (question + the short-answer line)."""
    questions, graphs = read_json(path, DataError), read_json(scene_graphs, DataError)
    out = []
    for qid, q in questions.items():
        where = f"{path}: question {qid}"
        if not isinstance(q, dict) or not all(k in q for k in ("imageId", "question", "answer")):
            raise DataError(f"{where}: needs 'imageId', 'question' and 'answer'", sample=qid)
        graph = graphs.get(q["imageId"])
        if graph is None:
            raise DataError(f"{where}: image {q['imageId']!r} is not in {scene_graphs}", sample=qid)
        referenced = {obj for part in (q.get("annotations") or {}).values() for ids in part.values()
                      for obj in str(ids).split(",")}
        objects = graph.get("objects", {})
        missing = sorted(referenced - set(objects))
        if missing:
            raise DataError(f"{where}: annotated object(s) {missing} are not in the scene graph of "
                            f"{q['imageId']}", sample=qid)
        boxes = [[o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]] for o in (objects[i] for i in sorted(referenced))]
        out.append(VQA(str(qid), f"{q['imageId']}.jpg", q["question"] + SHORT_ANSWER, q["answer"], boxes, {}))
    return out
