"""Scoring on synthworld: model answers on held-out samples (what `polyfocus demo` prints), and whether a VW-LMM
model's visual words name the objects under them (`patch_word_agreement`).

Answers: pure functions over `polyfocus.data.formats.Sample`s exported by `synthworld.scenes.export` (their
`extra` holds "family" and "meta"); no model in sight. A caller does

    predictions = model_answer_fn([question_of(s) for s in test])
    results = evaluate(test, predictions)
    print(format_table(results, majority_baseline(train, test)))

Scoring per family (`score`):
- colour, shape, count, text, spatial: exact match after `normalize_answer` (LLaVA's GQA/VQA
  style for single-word answers).
- existence: the same, but a leading "yes"/"no" decides ("Yes, there is." counts as yes).
- mc: the option letter, extracted the way LLaVA's ScienceQA eval does ("B", "B.", "(B) ...",
  "The answer is B."), or else an answer equal to exactly one option's text (MMBench-style).
- grounding: IoU >= 0.5 between the first four numbers of the prediction and the reference box
  (the RefCOCO criterion).
- caption, dense_caption: F1 of mentioned objects (see `caption_score`).
Accuracies are fractions in [0, 1]; `format_table` prints them as percentages.
"""

from __future__ import annotations

import re
from collections import Counter

from polyfocus.data.prompts import box_text, iou, parse_box
from polyfocus.model.visual_words import patch_boxes, patch_visual_words, token_text
from polyfocus.synthworld.scenes import COLOURS, SHAPES, render
from polyfocus.synthworld.tasks import FAMILIES

ALL = "all"  # the key of the every-sample row in evaluate / majority_baseline results
CAPTION_FAMILIES = ("caption", "dense_caption")

# ----------------------------------------------------------------------------- normalisation

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"""[;/\[\]"{}()=+\\_\-><@`,?!:*]""")


def normalize_answer(text: str) -> str:
    """A small cut of the VQA normaliser (spec llava_base §4.1): lowercase, '1,000' -> '1000',
    punctuation -> space, drop '.' unless a decimal point, number words -> digits, drop
    articles, single spaces. ' The Red.' -> 'red', 'Two' -> '2', '3.5' -> '3.5'."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    text = _PUNCTUATION.sub(" ", text)
    text = re.sub(r"\.(?!\d)", " ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


# ----------------------------------------------------------------------------- samples


def family_of(sample) -> str:
    return sample.extra["family"]


def question_of(sample) -> list[dict]:
    """The conversation to send to a model: the sample's messages without its final answer."""
    messages = sample.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return [dict(m) for m in messages]  # copies: a caller may add to them


def reference_of(sample) -> str:
    """The expected answer: the last assistant turn."""
    answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
    if not answers:
        raise ValueError(f"sample {sample.name} has no assistant answer to score against")
    return answers[-1]


# ----------------------------------------------------------------------------- scoring

# "A" / "B." / "B)" / "B: red" / "(B) red" at the start, or "the answer is B" anywhere. A bare
# "A red star" is not a letter: the article must not read as option A.
_LETTER_AT_START = re.compile(r"^\s*(?:\(([A-D])\)|([A-D])(?=$|[.):]))")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-D])\b", re.IGNORECASE)


def option_letter(prediction: str, options: list[str] | None = None) -> str | None:
    """The option a multiple-choice answer picks, or None. Letters are read as LLaVA's
    ScienceQA eval does; failing that, an answer equal (normalised) to exactly one option's
    text picks that option, as MMBench's choice extraction does."""
    m = _LETTER_AT_START.match(prediction) or _ANSWER_IS.search(prediction)
    if m:
        return next(g for g in m.groups() if g).upper()
    if options:
        said = normalize_answer(prediction)
        hits = [letter for letter, o in zip("ABCD", options) if normalize_answer(o) == said]
        if len(hits) == 1:
            return hits[0]
    return None


_KIND = re.compile(r"\b(%s) (%s)(?:es|s)?\b" % ("|".join(COLOURS), "|".join(SHAPES)))
_QUOTED = re.compile(r'"([^"]+)"')


def mentions(text: str) -> set[str]:
    """What a caption says is in the scene: every 'colour shape' pair ('two blue circles' ->
    'blue circle') and every quoted label code ('reading "K7Q"' -> 'K7Q', dense captions only)."""
    kinds = {f"{c} {s}" for c, s in _KIND.findall(text.lower())}
    codes = {c.strip().upper() for c in _QUOTED.findall(text)}
    return kinds | codes


def caption_score(reference: str, prediction: str) -> float:
    """F1 between the objects (colour+shape kinds, plus label codes) the reference and the
    prediction mention.

    Why this: a synthworld caption's content is which kinds of object are there (and, densely
    described, what their labels read); wording, order and counts vary freely. Recall alone, the
    obvious alternative, is maximised by listing all 72 kinds, so precision is folded in to
    punish hallucinated objects, the failure POPE and CHAIR measure. Sets, not counts: dense
    captions name an object again when placing the next one relative to it."""
    ref, pred = mentions(reference), mentions(prediction)
    if not ref or not pred:
        return float(ref == pred)
    hits = len(ref & pred)
    return 2 * hits / (len(ref) + len(pred))


def score(sample, prediction: str) -> float:
    """How right `prediction` is for `sample`: 0 or 1, or a fraction for captions."""
    family, reference = family_of(sample), reference_of(sample)
    if family == "mc":
        options = sample.extra.get("meta", {}).get("options")
        return float(option_letter(prediction, options) == reference)
    if family == "grounding":
        box = parse_box(prediction)
        return float(box is not None and iou(box, parse_box(reference)) >= 0.5)
    if family in CAPTION_FAMILIES:
        return caption_score(reference, prediction)
    said, expected = normalize_answer(prediction), normalize_answer(reference)
    if family == "existence" and said.split()[:1] in (["yes"], ["no"]):
        said = said.split()[0]  # "yes there is" -> "yes"
    return float(said == expected)


# ----------------------------------------------------------------------------- aggregates


def _summarise(samples, scores) -> dict:
    """{family: {"n", "accuracy"}} plus the ALL row (mean over samples, not over families)."""
    by_family: dict[str, list[float]] = {}
    for sample, s in zip(samples, scores):
        by_family.setdefault(family_of(sample), []).append(s)
    results = {f: {"n": len(v), "accuracy": sum(v) / len(v)} for f, v in by_family.items()}
    results[ALL] = {"n": len(scores), "accuracy": sum(scores) / len(scores) if scores else 0.0}
    return results


def evaluate(samples, predictions) -> dict[str, dict]:
    """{family: {"n": count, "accuracy": mean score}} for predictions aligned with samples,
    plus an "all" entry over every sample."""
    predictions = list(predictions)
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    return _summarise(samples, [score(s, p) for s, p in zip(samples, predictions)])


def majority_answers(train_samples) -> dict[str, str]:
    """Per family the answer a model that ignores the image would learn: the most frequent
    training answer (first seen wins a tie), or for grounding the mean training box."""
    answers: dict[str, list[str]] = {}
    for sample in train_samples:
        if "families" in sample.extra:  # a multi-turn sample: one question of each family per turn
            replies = [m["content"] for m in sample.messages if m["role"] == "assistant"]
            for family, reply in zip(sample.extra["families"], replies):
                answers.setdefault(family, []).append(reply)
        else:
            answers.setdefault(family_of(sample), []).append(reference_of(sample))
    out = {}
    for family, texts in answers.items():
        if family == "grounding":
            boxes = [b for b in map(parse_box, texts) if b is not None]
            out[family] = box_text([sum(c) / len(boxes) for c in zip(*boxes)]) if boxes else ""
        else:
            out[family] = Counter(texts).most_common(1)[0][0]
    return out


def majority_baseline(train_samples, test_samples) -> dict[str, float]:
    """{family: accuracy} of always giving the family's majority training answer on the test
    samples (0 for a family never seen in training), plus "all" over every test sample."""
    answers = majority_answers(train_samples)
    scores = [score(s, answers.get(family_of(s), "")) for s in test_samples]
    return {f: r["accuracy"] for f, r in _summarise(test_samples, scores).items()}


def format_table(results: dict[str, dict], baseline: dict[str, float] | None = None) -> str:
    """A plain-text table: family | n | accuracy | majority baseline, percentages with one
    decimal, families in synthworld's order and "all" last."""
    order = [f for f in FAMILIES if f in results]
    order += sorted(f for f in results if f not in order and f != ALL)
    if ALL in results:
        order.append(ALL)
    baseline = baseline or {}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [("family", "n", "accuracy", "majority baseline")]
    rows += [(f, str(results[f]["n"]), pct(results[f]["accuracy"]), pct(baseline.get(f)))
             for f in order]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- visual words (VW-LMM)


def patch_word_agreement(model, tokenizer, image_processor, scenes, attribute: str = "either") -> float:
    """Fraction of the patches lying on an object (patch centre inside the object's box) whose argmax visual word
    is the object's shape ("shape"), its colour ("colour"), or either ("either"). Scenes are synthworld `Scene`s,
    rendered at their own size. 0.0 when no patch lies on an object."""
    hits = total = 0
    for scene in scenes:
        image = render(scene)
        _, ids = patch_visual_words(model, image_processor([image]))
        words = [[token_text(tokenizer, i).strip().lower() for i in row] for row in ids[0, ..., 0].tolist()]
        boxes = patch_boxes(image.size, len(words), image_processor)
        scene_hits, scene_total = word_agreement_counts(scene, words, boxes, attribute)
        hits, total = hits + scene_hits, total + scene_total
    return hits / total if total else 0.0


def word_agreement_counts(scene, words: list[list[str]], boxes, attribute: str = "either") -> tuple[int, int]:
    """(patches whose word names the object under them, patches on an object) for one scene.

    words, boxes: [row][col] grids, boxes in the pixels of the scene's image (scene.image_size)."""
    if attribute not in ("either", "shape", "colour"):
        raise ValueError(f"attribute must be either, shape or colour, got {attribute!r}")
    hits = total = 0
    for word_row, box_row in zip(words, boxes):
        for word, (x1, y1, x2, y2) in zip(word_row, box_row):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            under = next((o for o in scene.objects
                          if o.box[0] <= cx < o.box[2] and o.box[1] <= cy < o.box[3]), None)
            if under is None:
                continue
            names = {"shape": {under.shape}, "colour": {under.colour}}.get(attribute, {under.shape, under.colour})
            total += 1
            hits += word in names
    return hits, total
