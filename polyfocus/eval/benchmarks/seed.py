"""SEED-Bench (image questions), scored as LLaVA's `convert_seed_for_submission.py`.

Files: SEED-Bench's `SEED-Bench.json` (`{"questions": [{"question_id", "question", "choice_a".."choice_d",
"answer", "data_id", "data_type", "question_type_id"}], "question_type": {name: id}}`) and the images in
`SEED-Bench-image/<data_id>`. Only `data_type == "image"` questions are run (SEED-IMG); video questions need
LLaVA's extracted middle frames and are left out.

Prompt: question + "\\nA. ...\\nB. ...\\nC. ...\\nD. ..." + "\\nAnswer with the option's letter from the given
choices directly." (the text of LLaVA's llava-seed-bench.jsonl). A reply is right only when it *is* the answer
letter (exact string). Accuracy per question type and overall.
"""

from __future__ import annotations

import json
from pathlib import Path

from polyfocus.data.prompts import MC_ANSWER
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, field_of, percent, read_json

CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


class SEEDBench(Benchmark):
    name = "seed_bench"

    def __init__(self, data, annotation_file: str = "SEED-Bench.json", image_folder: str = "SEED-Bench-image"):
        super().__init__(data)
        self.annotation_file, self.image_folder = annotation_file, image_folder

    def load(self) -> list[Row]:
        path = self.require(self.annotation_file, "SEED-Bench annotation file")
        data = read_json(path)
        questions = field_of(data, "questions", str(path), list)
        type_names = {v: k for k, v in (data.get("question_type") or {}).items()}
        rows = []
        for i, q in enumerate(questions):
            where = f"{path}:questions[{i}]"
            if field_of(q, "data_type", where, str) != "image":
                continue
            question = field_of(q, "question", where, str)
            options = "".join(f"\n{letter}. {field_of(q, key, where, str)}" for letter, key in zip("ABCD", CHOICES))
            type_id = q.get("question_type_id")
            rows.append(Row(question_id=field_of(q, "question_id", where, (str, int)),
                            prompt=question + options + MC_ANSWER,
                            images=[self.path(self.image_folder) / field_of(q, "data_id", where, str)],
                            question=question, reference=field_of(q, "answer", where, str), where=where,
                            meta={"type": type_names.get(type_id, str(type_id))}))
        if not rows:
            raise EvalDataError(f"{path}: no image questions (data_type 'image')")
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        return {"score": float(answer == row.reference)}

    def aggregate(self, rows, judged) -> dict:
        groups: dict[str, list[float]] = {}
        for row, j in zip(rows, judged):
            groups.setdefault(row.meta["type"], []).append(j["score"])
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "per_question_type": {k: percent(v) for k, v in groups.items()}}

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "seed_bench_predictions.jsonl"
        path.write_text("".join(json.dumps({"question_id": r.question_id, "prediction": a}) + "\n"
                                for r, a in zip(rows, answers)))
        return [path]
