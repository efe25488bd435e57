"""POPE (object hallucination), scored as LLaVA's `eval_pope.py`.

Files (LLaVA's `playground/data/eval/pope`): `llava_pope_test.jsonl` (`{"question_id", "image", "text",
"category"}`), the labels `coco/coco_pope_<category>.json` (JSON lines `{"question_id", "image", "text",
"label": "yes"|"no"}`, one file per category: random, popular, adversarial) and the COCO `val2014/` images.
Without the LLaVA question file the questions are read from the label files themselves (POPE's own release).

As in eval_pope.py, the k-th question of a category is scored against the k-th line of that category's label
file (the reference zips them in order; here the question texts are also checked to agree). A reply is "no"
when its first sentence (text before the first '.'), commas removed, split on single spaces, contains "No",
"not" or "no"; anything else is "yes".
"""

from __future__ import annotations

from polyfocus.data.prompts import SHORT_ANSWER
from polyfocus.eval.benchmarks.base import (
    Benchmark, EvalDataError, Row, field_of, read_jsonl, with_suffix, without_suffix,
)
from polyfocus.eval.benchmarks.vqa import llava_question_rows

CATEGORIES = ("adversarial", "popular", "random")


def pope_yes_no(text: str) -> str:
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """TP/FP/TN/FN, accuracy, precision, recall, F1 and yes-ratio (percentages), "yes" being the positive class.
    A zero denominator gives 0 (the reference divides by zero)."""
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {"n": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": 100 * (tp + tn) / n if n else 0.0,
            "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "yes_ratio": 100 * predictions.count("yes") / n if n else 0.0}


class POPE(Benchmark):
    name = "pope"
    main_metric = "f1"  # LLaVA-1.5's tables report the mean F1 over the three categories

    def __init__(self, data, question_file: str = "llava_pope_test.jsonl", image_folder: str = "val2014",
                 annotation_dir: str = "coco", categories: str = ",".join(CATEGORIES)):
        super().__init__(data)
        self.question_file, self.image_folder, self.annotation_dir = question_file, image_folder, annotation_dir
        self.categories = [c.strip() for c in categories.split(",") if c.strip()]

    def label_file(self, category: str):
        return self.path(self.annotation_dir) / f"coco_pope_{category}.json"

    def load(self) -> list[Row]:
        present = [c for c in self.categories if self.label_file(c).is_file()]
        if not present:
            raise EvalDataError(f"{self.name}: no label file coco_pope_<category>.json for {self.categories} in "
                                f"{self.path(self.annotation_dir)}")
        labels = {c: list(read_jsonl(self.require(self.label_file(c), "label file"))) for c in present}
        if self.path(self.question_file).is_file():
            rows = llava_question_rows(self, self.question_file, self.image_folder, SHORT_ANSWER)
            for row in rows:
                if not isinstance(row.meta["category"], str):
                    raise EvalDataError(f"{row.where}: missing field 'category' (random, popular or adversarial)")
            rows = [r for r in rows if r.meta["category"] in labels]
        else:  # POPE's own release: the label files are the questions
            images = self.path(self.image_folder)
            rows = [Row(question_id=f"{c}/{field_of(line, 'question_id', f'{self.label_file(c)}:{n}')}",
                        prompt=with_suffix(field_of(line, "text", f"{self.label_file(c)}:{n}", str), SHORT_ANSWER),
                        images=[images / field_of(line, "image", f"{self.label_file(c)}:{n}", str)],
                        question=line["text"], meta={"category": c}, where=f"{self.label_file(c)}:{n}")
                    for c in present for n, line in labels[c]]
        self._attach_labels(rows, labels)
        return rows

    def _attach_labels(self, rows: list[Row], labels: dict) -> None:
        seen: dict[str, int] = {}
        for row in rows:
            category = row.meta["category"]
            k = seen.get(category, 0)
            seen[category] = k + 1
            path = self.label_file(category)
            if k >= len(labels[category]):
                raise EvalDataError(f"{row.where}: question {k + 1} of category {category!r}, but {path} has only "
                                    f"{len(labels[category])} labels")
            number, line = labels[category][k]
            label = field_of(line, "label", f"{path}:{number}", str)
            if label not in ("yes", "no"):
                raise EvalDataError(f"{path}:{number}: label must be 'yes' or 'no', got {label!r}")
            if "text" in line and without_suffix(line["text"], SHORT_ANSWER) != row.question:
                raise EvalDataError(f"{row.where}: question {row.question!r} does not match {path}:{number} "
                                    f"({line['text']!r}); the labels are matched by position per category")
            row.reference = label

    def score_one(self, row: Row, answer: str) -> dict:
        predicted = pope_yes_no(answer)
        return {"score": float(predicted == row.reference), "prediction": predicted}

    def aggregate(self, rows, judged) -> dict:
        per_category = {}
        for category in self.categories:
            pairs = [(j["prediction"], r.reference) for r, j in zip(rows, judged) if r.meta["category"] == category]
            if pairs:
                per_category[category] = pope_metrics([p for p, _ in pairs], [l for _, l in pairs])
        mean = {k: sum(m[k] for m in per_category.values()) / len(per_category)
                for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} if per_category else {}
        return {"n": len(rows), **mean, "per_category": per_category}
