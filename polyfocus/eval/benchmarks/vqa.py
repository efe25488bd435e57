"""Open-ended VQA scored with the VQA soft accuracy: VQAv2 (test-dev), VizWiz, TextVQA (with and without OCR
tokens). Question files are LLaVA's (`playground/data/eval/<bench>/*.jsonl`): one
`{"question_id", "image", "text"[, "category"]}` per line, `text` already ending with the answer-format
instruction (added when a line lacks it).

VQAv2 and VizWiz test answers are scored by EvalAI: `write_submission` makes the upload file exactly as
LLaVA's converters do (`EvalAIAnswerProcessor` on every answer). With an `annotation_file` (a val split),
they are also scored here with the official evaluator as it is today (vqa_eval.VQA_RULES, recorded in the scores'
`rules`), applied to the processed answer as EvalAI would. (VizWiz's own server runs a derivative of it.)
TextVQA is scored here as LLaVA's `eval_textvqa.py` does (m4c evaluator, joined on (image id, question)); as
LLaVA's file repeats an image's id for each of its questions, rows take TextVQA's own question id.
"""

from __future__ import annotations

import json
from pathlib import Path

from polyfocus.data.prompts import SHORT_ANSWER
from polyfocus.eval.benchmarks.base import (
    Benchmark, EvalDataError, Row, field_of, percent, read_json, read_jsonl, with_suffix, without_suffix,
)
from polyfocus.eval.vqa_eval import VQA_RULES, normalize_answer, official_vqa_accuracy, textvqa_accuracy

VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
OCR_PREFIX = "Reference OCR token:"


def llava_question_rows(bench: Benchmark, question_file: str, image_folder: str, suffix: str) -> list[Row]:
    """Rows of a LLaVA question file: the prompt is `text` (+ the suffix when missing), one image each."""
    path = bench.require(question_file, "question file")
    images = bench.path(image_folder)
    rows = []
    for number, line in read_jsonl(path):
        where = f"{path}:{number}"
        text = field_of(line, "text", where, str)
        rows.append(Row(question_id=field_of(line, "question_id", where, (int, str)), prompt=with_suffix(text, suffix),
                        images=[images / field_of(line, "image", where, str)],
                        question=without_suffix(text, suffix), where=where,
                        meta={"image": line["image"], "category": line.get("category")}))
    return rows


def human_answers(annotation: dict, where: str) -> list[str]:
    """The human answers of a VQA-style annotation ({"answers": [{"answer": ...}, ...]})."""
    answers = field_of(annotation, "answers", where, list)
    if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise EvalDataError(f"{where}: 'answers' must be a non-empty list of {{\"answer\": text}}")
    return [a["answer"] for a in answers]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


class VQAv2(Benchmark):
    name = "vqav2"

    def __init__(self, data, question_file: str = "llava_vqav2_mscoco_test-dev2015.jsonl",
                 image_folder: str = "test2015", all_questions_file: str = "llava_vqav2_mscoco_test2015.jsonl",
                 annotation_file: str | None = None):
        super().__init__(data)
        self.question_file, self.image_folder = question_file, image_folder
        self.all_questions_file, self.annotation_file = all_questions_file, annotation_file

    def load(self) -> list[Row]:
        rows = llava_question_rows(self, self.question_file, self.image_folder, SHORT_ANSWER)
        if self.annotation_file:  # official annotations: {"annotations": [{"question_id", "answers": [...]}]}
            path = self.require(self.annotation_file, "annotation file")
            by_id = {field_of(a, "question_id", f"{path}: annotations[{i}]"): a
                     for i, a in enumerate(field_of(read_json(path), "annotations", str(path), list))}
            for row in rows:
                if row.question_id not in by_id:
                    raise EvalDataError(f"{row.where}: question {row.question_id} has no annotation in {path}")
                annotation = by_id[row.question_id]
                row.reference = human_answers(annotation, f"{path}: question {row.question_id}")
                row.meta["answer_type"] = annotation.get("answer_type")
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        uploaded = normalize_answer(answer)
        if row.reference is None:
            return {"score": None, "submitted": uploaded}
        return {"score": official_vqa_accuracy(uploaded, row.reference), "submitted": uploaded}

    def aggregate(self, rows, judged) -> dict:
        if any(j["score"] is None for j in judged):
            return {"n": len(rows), "accuracy": None,
                    "note": "no annotation_file: upload submission/*.json to EvalAI for the score"}
        by_type: dict[str, list[float]] = {}
        for row, j in zip(rows, judged):
            by_type.setdefault(str(row.meta.get("answer_type")), []).append(j["score"])
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "per_answer_type": {k: percent(v) for k, v in by_type.items()}, "rules": VQA_RULES}

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        """LLaVA's convert_vqav2_for_submission.py: every test2015 question, answered ones processed, others ""."""
        answered = {row.question_id: normalize_answer(a) for row, a in zip(rows, answers)}
        all_path = self.path(self.all_questions_file)
        if all_path.is_file():
            ids = [field_of(line, "question_id", f"{all_path}:{n}") for n, line in read_jsonl(all_path)]
        else:
            ids = [row.question_id for row in rows]
        upload = [{"question_id": int(q), "answer": answered.get(q, "")} for q in ids]
        return [write_json(out_dir / f"{Path(self.question_file).stem}_upload.json", upload)]


class VizWiz(Benchmark):
    name = "vizwiz"

    def __init__(self, data, question_file: str = "llava_test.jsonl", image_folder: str = "test",
                 annotation_file: str | None = None):
        super().__init__(data)
        self.question_file, self.image_folder, self.annotation_file = question_file, image_folder, annotation_file

    def load(self) -> list[Row]:
        rows = llava_question_rows(self, self.question_file, self.image_folder, VIZWIZ_SUFFIX)
        if self.annotation_file:  # VizWiz's val.json: [{"image", "question", "answers": [{"answer", ...}]}]
            path = self.require(self.annotation_file, "annotation file")
            annotations = read_json(path)
            if not isinstance(annotations, list):
                raise EvalDataError(f"{path}: expected a JSON list of {{image, question, answers}}")
            by_image = {field_of(a, "image", f"{path}[{i}]"): a for i, a in enumerate(annotations)}
            for row in rows:
                if row.meta["image"] not in by_image:
                    raise EvalDataError(f"{row.where}: image {row.meta['image']} has no annotation in {path}")
                row.reference = human_answers(by_image[row.meta["image"]], f"{path}: image {row.meta['image']}")
        return rows

    score_one = VQAv2.score_one

    def aggregate(self, rows, judged) -> dict:
        if any(j["score"] is None for j in judged):
            return {"n": len(rows), "accuracy": None,
                    "note": "no annotation_file: upload submission/*.json to EvalAI for the score"}
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged), "rules": VQA_RULES}

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        """LLaVA's convert_vizwiz_for_submission.py: [{"image", "answer": EvalAIAnswerProcessor(text)}]."""
        upload = [{"image": row.meta["image"], "answer": normalize_answer(a)} for row, a in zip(rows, answers)]
        return [write_json(out_dir / "vizwiz_test_upload.json", upload)]


class TextVQA(Benchmark):
    """TextVQA val. With ocr=False (benchmark "textvqa_no_ocr") the "Reference OCR token: ..." line is removed."""

    name = "textvqa"

    def __init__(self, data, question_file: str = "llava_textvqa_val_v051_ocr.jsonl",
                 image_folder: str = "train_images", annotation_file: str = "TextVQA_0.5.1_val.json", ocr: bool = True):
        super().__init__(data)
        self.question_file, self.image_folder, self.annotation_file = question_file, image_folder, annotation_file
        self.ocr = ocr

    def load(self) -> list[Row]:
        rows = llava_question_rows(self, self.question_file, self.image_folder, SHORT_ANSWER)
        path = self.require(self.annotation_file, "annotation file")
        data = field_of(read_json(path), "data", str(path), list)
        # eval_textvqa.py's join: (image_id, question.lower()); in LLaVA's file question_id *is* the image id.
        # An image may carry the same question twice: the reference's dict keeps the last annotation's answers for
        # both, while each row takes its own annotation's question id (in order) so that ids stay unique.
        by_key: dict[tuple, list[dict]] = {}
        for i, a in enumerate(data):
            where = f"{path}: data[{i}]"
            key = (field_of(a, "image_id", where), field_of(a, "question", where, str).lower())
            field_of(a, "answers", where, list)
            by_key.setdefault(key, []).append(a)
        seen: dict[tuple, int] = {}
        for row in rows:
            question = textvqa_question(row.prompt)
            key = (row.question_id, question.lower())
            if key not in by_key:
                raise EvalDataError(f"{row.where}: no annotation in {path} for image {row.question_id!r} and "
                                    f"question {question!r}")
            k = seen[key] = seen.get(key, -1) + 1
            annotations = by_key[key]
            row.reference = list(annotations[-1]["answers"])
            row.question = question
            # LLaVA's question_id is the image id, shared by an image's questions: use TextVQA's own id instead.
            own = annotations[min(k, len(annotations) - 1)]
            row.meta["image_id"], row.question_id = row.question_id, own.get("question_id", row.question_id)
            if not self.ocr:
                row.prompt = "\n".join(l for l in row.prompt.split("\n") if not l.startswith(OCR_PREFIX))
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        return {"score": textvqa_accuracy(answer, row.reference)}


class TextVQANoOCR(TextVQA):
    name = "textvqa_no_ocr"

    def __init__(self, data, **options):
        super().__init__(data, **{"ocr": False, **options})


def textvqa_question(prompt: str) -> str:
    """The bare question of a TextVQA prompt, as eval_textvqa.py's prompt_processor finds it."""
    lines = prompt.split("\n")
    return lines[1] if lines[0].startswith(OCR_PREFIX) and len(lines) > 1 else lines[0]
