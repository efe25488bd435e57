"""ScienceQA-IMG (test), as LLaVA's `model_vqa_science.py --single-pred-prompt` and `eval_science_qa.py`.

Files (LLaVA's `playground/data/eval/scienceqa`): `llava_test_CQM-A.json` (a LLaVA conversation list: `id`,
optional `image`, `conversations[0].value` = "Context: ...\\nQuestion...\\nOptions: ..." with or without
"<image>"), `images/test/<id>/image.png`, and ScienceQA's `problems.json` (the answer index and choices) and
`pid_splits.json`. Without problems.json the reference is the conversation's answer turn.

Prompt: the first turn with "<image>" removed and stripped, + "\\nAnswer with the option's letter from the given
choices directly."; the image (when the item has one) goes first. The reply is read as (1) exactly a letter
A-E, (2) "X. ..." , (3) the regex "The answer is ([A-Z])." matching exactly once; anything else is FAILED. A
letter beyond the item's choices is wrong. Reported: accuracy over all items and IMG-accuracy over the items
with an image (the number LLaVA-1.5 reports).
"""

from __future__ import annotations

import re

from polyfocus.data.prompts import MC_ANSWER
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, field_of, percent, read_json

OPTIONS = ("A", "B", "C", "D", "E")  # a tuple: "" in "ABCDE" would be True
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str) -> str:
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


class ScienceQA(Benchmark):
    name = "scienceqa"
    max_new_tokens = 1024
    main_metric = "img_accuracy"

    def __init__(self, data, question_file: str = "llava_test_CQM-A.json", image_folder: str = "images/test",
                 problems: str = "problems.json", single_pred_prompt: bool = True):
        super().__init__(data)
        self.question_file, self.image_folder, self.problems = question_file, image_folder, problems
        self.single_pred_prompt = single_pred_prompt

    def load(self) -> list[Row]:
        path = self.require(self.question_file, "question file")
        items = read_json(path)
        if not isinstance(items, list):
            raise EvalDataError(f"{path}: expected a JSON list of LLaVA conversations")
        problems = read_json(self.require(self.problems, "problems.json")) if self.path(self.problems).is_file() else {}
        rows = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            qid = str(field_of(item, "id", where, (str, int)))
            turns = field_of(item, "conversations", where, list)
            if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str):
                raise EvalDataError(f"{where}: conversations[0].value (the question) is missing")
            prompt = turns[0]["value"].replace("<image>", "").strip()
            if self.single_pred_prompt:
                prompt += MC_ANSWER
            images = [self.path(self.image_folder) / item["image"]] if "image" in item else []
            # "<image>\n" written out: LLaVA's answer lines carry it, and eval_science_qa.py finds IMG items by it.
            rows.append(Row(question_id=qid, prompt="<image>\n" * len(images) + prompt, images=images,
                            question=prompt, where=where,
                            reference=self.reference(qid, turns, problems, where),
                            meta={"n_choices": len(problems[qid]["choices"]) if qid in problems else len(OPTIONS)}))
        return rows

    def reference(self, qid: str, turns: list, problems: dict, where: str) -> str:
        if qid in problems:
            return OPTIONS[field_of(problems[qid], "answer", f"problems.json[{qid}]", int)]
        answer = turns[1].get("value", "") if len(turns) > 1 and isinstance(turns[1], dict) else ""
        letter = sqa_letter(answer.strip())
        if letter == "FAILED":
            raise EvalDataError(f"{where}: not in problems.json and the answer turn {answer!r} names no option letter")
        return letter

    def score_one(self, row: Row, answer: str) -> dict:
        letter = sqa_letter(answer)
        valid = letter in OPTIONS[: row.meta["n_choices"]]
        return {"score": float(valid and letter == row.reference), "parsed": letter}

    def aggregate(self, rows, judged) -> dict:
        with_image = [j["score"] for r, j in zip(rows, judged) if r.images]
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "n_img": len(with_image), "img_accuracy": percent(with_image)}
