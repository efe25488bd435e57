"""The prompt and answer conventions that training data, inference and the benchmarks share: LLaVA-1.5's answer-format
suffixes, multiple-choice option letters, and boxes written as text.

One home for them, so that a model trained on synthworld or DualFocus data is asked at inference, and scored by the
benchmarks, in exactly the words it was trained on.
"""

from __future__ import annotations

import re

# LLaVA-1.5's answer-format instructions, appended to a question (its eval scripts' prompts).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MC_ANSWER = "\nAnswer with the option's letter from the given choices directly."
MC_ANSWER_CN = "\n请直接回答选项字母。"

LETTERS = ("A", "B", "C", "D")  # a tuple: substrings such as "" must not count as letters

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def mcq_letter(answer: str, options: list[str]) -> str:
    """DualFocus's process_outputs: the first character if it is a-d (as the reference reads it: "Blue" -> B),
    otherwise the letter of the first option whose text the answer contains, otherwise the answer itself."""
    text = answer.strip()
    if text[:1].lower() in ("a", "b", "c", "d"):
        return text[0].upper()
    for letter, option in zip(LETTERS, options):
        if option.lower() in text.lower():
            return letter
    return text


def box_text(box) -> str:
    """A normalised box as DualFocus / LLaVA write it: '[0.12, 0.34, 0.56, 0.78]'."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


# The shape of `box_text`'s output, for jump-forward decoding (infer/jump.py): "d" a digit that varies, "0" the integer
# digit of a coordinate (0 but for 1.00: a guess, which the decoder verifies), anything else a fixed character.
BOX_SHAPE = "[0.dd, 0.dd, 0.dd, 0.dd]"


def box_continuation(text: str) -> str | None:
    """What `box_text` writes after `text` (a reply so far; leading whitespace ignored) up to the next varying digit:
    "[0." after "", "0." after "[", ", 0." after "[0.12", "]" after the fourth value, "" before a varying digit or
    after the closing bracket; None when `text` is not the start of a box as `box_text` writes it."""
    text = text.lstrip()
    if len(text) > len(BOX_SHAPE):
        return None
    for char, shape in zip(text, BOX_SHAPE):
        if char != shape and not (shape in "d0" and char.isdigit()):
            return None
    rest = BOX_SHAPE[len(text):]
    return rest[: rest.index("d")] if "d" in rest else rest


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of `text` as a box, or None if there are fewer."""
    numbers = _NUMBER.findall(text)
    return tuple(float(v) for v in numbers[:4]) if len(numbers) >= 4 else None


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; inverted boxes have no area."""
    def area(x1, y1, x2, y2):
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0
