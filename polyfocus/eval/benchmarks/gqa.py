"""GQA testdev-balanced (open-ended) and GQA-MCQ (DualFocus's 4-option version), scored like the official
GQA `eval.py --tier testdev_balanced`: exact match of the prediction against the question's `answer` in
`testdev_balanced_questions.json`, over the balanced questions.

GQA: LLaVA's `llava_gqa_testdev_balanced.jsonl` (`{"question_id", "image", "text"}`), prompt = text + "Answer
the question using a single word or phrase."; the prediction is `text.rstrip('.').lower()`
(convert_gqa_for_eval.py).

GQA-MCQ (spec dualfocus.md §7): `llava_gqa_testdev_balanced_mcq.jsonl`, `{"question_id", "image", "question":
"Q\\nA. opt\\nB. opt\\nC. opt\\nD. opt"}`, prompt = question + "Answer with the option's letter from the given
choices directly."; the reply is mapped to a letter as DualFocus's process_outputs does (its first character
when that is a-d, otherwise the first option whose text it contains), and the chosen option's text, lower-cased
with a trailing '.' stripped, is compared with the GQA answer (a line's own "answer" field wins when present).
"""

from __future__ import annotations

from pathlib import Path

from polyfocus.data.prompts import LETTERS, MC_ANSWER, SHORT_ANSWER, mcq_letter
from polyfocus.eval.benchmarks.base import (
    Benchmark, EvalDataError, Row, field_of, percent, read_json, read_jsonl, with_suffix,
)
from polyfocus.eval.benchmarks.vqa import llava_question_rows, write_json


class GQA(Benchmark):
    name = "gqa"

    def __init__(self, data, question_file: str = "llava_gqa_testdev_balanced.jsonl", image_folder: str = "data/images",
                 questions_json: str = "data/testdev_balanced_questions.json"):
        super().__init__(data)
        self.question_file, self.image_folder, self.questions_json = question_file, image_folder, questions_json

    def load(self) -> list[Row]:
        rows = llava_question_rows(self, self.question_file, self.image_folder, SHORT_ANSWER)
        self.attach_gold(rows)
        return rows

    def attach_gold(self, rows: list[Row]) -> None:
        path = self.require(self.questions_json, "GQA questions file")
        questions = read_json(path)
        for row in rows:
            question = questions.get(str(row.question_id))
            if question is None:
                if row.reference is not None:  # GQA-MCQ lines may carry their own answer
                    continue
                raise EvalDataError(f"{row.where}: question {row.question_id!r} is not in {path}")
            if row.reference is None:
                row.reference = field_of(question, "answer", f"{path}[{row.question_id}]", str)
            types = question.get("types") or {}
            row.meta.update(balanced=question.get("isBalanced", True), structural=types.get("structural"),
                            semantic=types.get("semantic"))

    def prediction(self, row: Row, answer: str) -> str:
        return answer.rstrip(".").lower()

    def score_one(self, row: Row, answer: str) -> dict:
        predicted = self.prediction(row, answer)
        return {"score": float(predicted == row.reference), "prediction": predicted}

    def aggregate(self, rows, judged) -> dict:
        """eval.py's numbers over the balanced questions: accuracy, binary/open, per structural/semantic type."""
        kept = [(r, j["score"]) for r, j in zip(rows, judged) if r.meta.get("balanced", True)]
        scores = {"n": len(kept), "accuracy": percent(s for _, s in kept)}
        typed = [(r, s) for r, s in kept if r.meta.get("structural")]
        if typed:
            scores["binary"] = percent(s for r, s in typed if r.meta["structural"] != "query")
            scores["open"] = percent(s for r, s in typed if r.meta["structural"] == "query")
            for kind in ("structural", "semantic"):
                groups: dict[str, list[float]] = {}
                for r, s in typed:
                    groups.setdefault(r.meta[kind], []).append(s)
                scores[f"per_{kind}_type"] = {k: percent(v) for k, v in sorted(groups.items())}
        return scores

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        predictions = [{"questionId": row.question_id, "prediction": self.prediction(row, a)}
                       for row, a in zip(rows, answers)]
        return [write_json(out_dir / "testdev_balanced_predictions.json", predictions)]


class GQAMCQ(GQA):
    name = "gqa_mcq"

    def __init__(self, data, question_file: str = "llava_gqa_testdev_balanced_mcq.jsonl", **options):
        super().__init__(data, question_file=question_file, **options)

    def load(self) -> list[Row]:
        path = self.require(self.question_file, "question file")
        images = self.path(self.image_folder)
        rows = []
        for number, line in read_jsonl(path):
            where = f"{path}:{number}"
            text = line.get("question", line.get("text"))
            if not isinstance(text, str):
                raise EvalDataError(f"{where}: missing field 'question' (the question and its options)")
            text = text[: -len(MC_ANSWER)] if text.endswith(MC_ANSWER) else text
            question, *option_lines = text.split("\n")
            if len(option_lines) < 2 or any(l[1:3] != ". " for l in option_lines):
                raise EvalDataError(f"{where}: expected 'question\\nA. option\\nB. option...', got {text!r}")
            options = [l[3:] for l in option_lines]
            answer = line.get("answer")
            if isinstance(answer, str) and answer.strip() in LETTERS[: len(options)]:
                answer = options[LETTERS.index(answer.strip())]  # an answer given as the option letter: its text
            reference = answer.lower().rstrip(".") if isinstance(answer, str) else None
            rows.append(Row(question_id=field_of(line, "question_id", where, (int, str)),
                            prompt=with_suffix(text, MC_ANSWER), images=[images / field_of(line, "image", where, str)],
                            question=question, reference=reference, meta={"options": options}, where=where))
        self.attach_gold(rows)
        return rows

    def prediction(self, row: Row, answer: str) -> str:
        options = row.meta["options"]
        letter = mcq_letter(answer, options)
        chosen = options[LETTERS.index(letter)] if letter in LETTERS[: len(options)] else answer
        return chosen.lower().rstrip(".")

    def score_one(self, row: Row, answer: str) -> dict:
        predicted = self.prediction(row, answer)
        return {"score": float(predicted == row.reference), "letter": mcq_letter(answer, row.meta["options"]),
                "prediction": predicted}


