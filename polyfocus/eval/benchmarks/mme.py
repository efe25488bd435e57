"""MME, read from its release folder and scored as its official `calculation.py`.

Layout (`MME_Benchmark_release_version/`, found in --data or as --data itself): one folder per subtask. Either
the images and their question files side by side (`existence/000000006040.jpg` + `000000006040.txt`), or in
`images/` and `questions_answer_YN/` (artwork, celebrity, landmark, posters, scene). A question file holds one
`question<TAB>Yes|No` line per question, two per image.

Prompt (spec llava_base.md §4, LLaVA's llava_mme.jsonl): the question with its trailing "Please answer yes or
no." replaced by "\\nAnswer the question using a single word or phrase.". Question ids are
`<subtask>/<image file>/<line index>` (LLaVA uses `<subtask>/<image file>`, which is not unique).

Scoring: the reply is lower-cased; "yes"/"no" as is, else "yes" if its first four characters contain "yes",
else "no" if they contain "no", else "other" (wrong). Per subtask acc = fraction of questions right, acc+ =
fraction of images with every question right, score = 100 * (acc + acc+). Perception = sum over the ten
perception subtasks (max 2000), cognition = sum over the four cognition subtasks (max 800).
"""

from __future__ import annotations

import re

from polyfocus.data.prompts import SHORT_ANSWER
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
RELEASE_DIR = "MME_Benchmark_release_version"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_YES_OR_NO = re.compile(r"\s*Please answer yes or no\.?\s*$")


def mme_yes_no(answer: str) -> str:
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


class MME(Benchmark):
    name = "mme"
    main_metric = "perception"

    def __init__(self, data, release_dir: str = RELEASE_DIR):
        super().__init__(data)
        root = self.path(release_dir)
        self.root = root if root.is_dir() else self.data  # --data may be the release folder itself

    def load(self) -> list[Row]:
        tasks = [d for d in sorted(self.root.iterdir()) if d.is_dir() and d.name in PERCEPTION + COGNITION]
        if not tasks:
            raise EvalDataError(f"{self.name}: no MME subtask folders ({', '.join(PERCEPTION + COGNITION)}) in "
                                f"{self.root}")
        rows = []
        for task in tasks:
            questions_dir = task / "questions_answer_YN" if (task / "questions_answer_YN").is_dir() else task
            images_dir = task / "images" if (task / "images").is_dir() else task
            for txt in sorted(questions_dir.glob("*.txt")):
                rows += self.rows_of(task.name, txt, images_dir)
        return rows

    def rows_of(self, task: str, txt, images_dir) -> list[Row]:
        self.files.append(txt)
        image = next((images_dir / (txt.stem + ext) for ext in IMAGE_EXTENSIONS
                      if (images_dir / (txt.stem + ext)).is_file()), None)
        if image is None:
            raise EvalDataError(f"{txt}: no image {txt.stem}{{{','.join(IMAGE_EXTENSIONS)}}} in {images_dir}")
        rows = []
        lines = [l for l in txt.read_text(encoding="utf-8").splitlines() if l.strip()]
        for k, line in enumerate(lines):
            where = f"{txt}:{k + 1}"
            parts = line.split("\t")
            if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                raise EvalDataError(f"{where}: expected 'question<TAB>Yes|No', got {line!r}")
            question, answer = parts[0].strip(), parts[1].strip().lower()
            rows.append(Row(question_id=f"{task}/{image.name}/{k}", prompt=_YES_OR_NO.sub("", question) + SHORT_ANSWER,
                            images=[image], question=question, reference=answer,
                            meta={"task": task, "image": image.name}, where=where))
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        predicted = mme_yes_no(answer)
        return {"score": float(predicted == row.reference), "prediction": predicted}

    def aggregate(self, rows, judged) -> dict:
        per_task: dict[str, dict] = {}
        for row, j in zip(rows, judged):
            task = per_task.setdefault(row.meta["task"], {"questions": [], "images": {}, "other": 0})
            task["questions"].append(j["score"])
            task["images"].setdefault(row.meta["image"], []).append(j["score"])
            task["other"] += j["prediction"] == "other"
        scores = {}
        for name, t in per_task.items():
            acc = sum(t["questions"]) / len(t["questions"])
            acc_plus = sum(all(s == 1.0 for s in v) for v in t["images"].values()) / len(t["images"])
            scores[name] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                            "n": len(t["questions"]), "other": t["other"]}
        return {"n": len(rows),
                "perception": sum(scores[t]["score"] for t in PERCEPTION if t in scores),
                "cognition": sum(scores[t]["score"] for t in COGNITION if t in scores),
                "per_task": scores}
