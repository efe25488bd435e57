"""The GPT-judged benchmarks: MM-Vet and LLaVA-Bench-in-the-Wild. The questions are asked as they are (LLaVA's
model_vqa.py, no answer-format suffix, up to 1024 new tokens); a judge (polyfocus.eval.judge.Judge, any
OpenAI-compatible endpoint) grades each answer with the reference grader's prompt and protocol.

MM-Vet (its release: `mm-vet.json` = {"v1_0": {"imagename", "capability": [...], "question", "answer"}} and
`images/`): the official grader (`mm-vet_evaluator.py`, default judge gpt-4-0613): its few-shot prompt, then
"question | answer (<AND>/<OR> spaced) | prediction | "; max_tokens 3, temperature 0; the first word of the reply
must be a number in [0, 1]; otherwise ask again with "\\nPredict the correctness of the answer (digit): "
appended and the temperature raised by 0.5 each time, up to 5 tries, then 0. Total = mean x 100, plus the mean
per capability and per capability combination. The submission file is LLaVA's `{"v1_0": answer}` JSON.

LLaVA-Bench-in-the-Wild (`questions.jsonl`, `context.jsonl`, `answers_gpt4.jsonl`, `images/`): LLaVA's
`eval_gpt_review_bench.py` (default judge gpt-4-0314, temperature 0.2, max_tokens 1024) with the
`llava_bench_<category>` rule of `llava/eval/table/rule.json`: GPT-4's reference answer is "Assistant 1", the
model's is "Assistant 2"; the first line of the review must hold the two scores. `summarize_gpt_review.py`: per
category and overall, the relative score mean(s2)/mean(s1)*100 (means rounded to 3 decimals first), plus both
means x 10. A review whose scores cannot be parsed counts as (-1, -1), as in the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, field_of, read_json, read_jsonl
from polyfocus.eval.benchmarks.vqa import write_json

MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MMVET_RETRY = "\nPredict the correctness of the answer (digit): "

LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_BENCH_RULE = (  # rule.json's llava_bench_conv / _detail / _complex: the same text for all three
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the "
    "helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall "
    "score on a scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first output "
    "a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two "
    "scores are separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented "
    "does not affect your judgment.")
LLAVA_BENCH_CATEGORIES = ("conv", "detail", "complex")


class JudgedBenchmark(Benchmark):
    max_new_tokens = 1024
    judge_model = ""

    def __init__(self, data):
        super().__init__(data)
        self.judge = None  # set by the runner before scoring

    def require_judge(self):
        if self.judge is None:
            raise EvalDataError(f"{self.name} is scored by a GPT judge: pass one (Judge(...) / --judge-base-url)")
        return self.judge


# ----------------------------------------------------------------------------- MM-Vet


def mmvet_score(text: str) -> float | None:
    try:
        score = float(text.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


class MMVet(JudgedBenchmark):
    name = "mmvet"
    main_metric = "total"
    judge_model = "gpt-4-0613"

    def __init__(self, data, metadata: str = "mm-vet.json", image_folder: str = "images"):
        super().__init__(data)
        self.metadata, self.image_folder = metadata, image_folder

    def load(self) -> list[Row]:
        path = self.require(self.metadata, "MM-Vet metadata (mm-vet.json)")
        items = read_json(path)
        if not isinstance(items, dict):
            raise EvalDataError(f"{path}: expected {{question id: {{imagename, capability, question, answer}}}}")
        rows = []
        for qid, item in items.items():
            where = f"{path}[{qid}]"
            question = field_of(item, "question", where, str)
            rows.append(Row(question_id=qid, prompt=question, question=question, where=where,
                            images=[self.path(self.image_folder) / field_of(item, "imagename", where, str)],
                            reference=field_of(item, "answer", where, str),
                            meta={"capability": list(field_of(item, "capability", where, list))}))
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        judge = self.require_judge()
        gt = row.reference.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
        query = MMVET_PROMPT + "\n" + " | ".join([row.question, gt, answer, ""])
        content = judge.chat([{"role": "user", "content": query}], temperature=0.0, max_tokens=3)
        score, temperature, tries = mmvet_score(content), 0.0, 1
        while score is None:  # the official grader's retry loop: the 5th retry's reply is never read
            content = judge.chat([{"role": "user", "content": query + MMVET_RETRY}], temperature=temperature,
                                 max_tokens=3)
            tries, temperature = tries + 1, temperature + 0.5
            score = 0.0 if tries > 5 else mmvet_score(content)
        return {"score": score, "judge": content}

    def aggregate(self, rows, judged) -> dict:
        per_capability: dict[str, list[float]] = {}
        per_combination: dict[str, list[float]] = {}
        for row, j in zip(rows, judged):
            for cap in row.meta["capability"]:
                per_capability.setdefault(cap, []).append(j["score"])
            per_combination.setdefault("_".join(sorted(row.meta["capability"])), []).append(j["score"])

        def mean100(v):
            return 100 * sum(v) / len(v)
        return {"n": len(rows), "total": mean100([j["score"] for j in judged]) if judged else 0.0,
                "per_capability": {k: mean100(v) for k, v in per_capability.items()},
                "per_capability_combination": {k: mean100(v) for k, v in per_combination.items()}}

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        return [write_json(out_dir / "mmvet_results.json", {r.question_id: a for r, a in zip(rows, answers)})]


# ----------------------------------------------------------------------------- LLaVA-Bench-in-the-Wild


def parse_review_scores(review: str) -> list[float]:
    """summarize's parse_score: the first line, commas as spaces, exactly two numbers; else [-1, -1]."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    try:
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1.0, -1.0]
    except ValueError:
        return [-1.0, -1.0]


class LLaVABench(JudgedBenchmark):
    name = "llava_bench"
    main_metric = "relative_score"
    judge_model = "gpt-4-0314"

    def __init__(self, data, question_file: str = "questions.jsonl", context_file: str = "context.jsonl",
                 reference_answers: str = "answers_gpt4.jsonl", image_folder: str = "images"):
        super().__init__(data)
        self.question_file, self.context_file = question_file, context_file
        self.reference_answers, self.image_folder = reference_answers, image_folder

    def load(self) -> list[Row]:
        questions = self.require(self.question_file, "question file")
        context_path = self.require(self.context_file, "context file")
        contexts = {field_of(line, "image", f"{context_path}:{n}", str): line for n, line in read_jsonl(context_path)}
        answers_path = self.require(self.reference_answers, "GPT-4 answers file")
        references = {field_of(line, "question_id", f"{answers_path}:{n}"):
                      field_of(line, "text", f"{answers_path}:{n}", str) for n, line in read_jsonl(answers_path)}
        rows = []
        for number, line in read_jsonl(questions):
            where = f"{questions}:{number}"
            qid, image = field_of(line, "question_id", where), field_of(line, "image", where, str)
            category = field_of(line, "category", where, str)
            if category not in LLAVA_BENCH_CATEGORIES:
                raise EvalDataError(f"{where}: category {category!r} is not one of {LLAVA_BENCH_CATEGORIES}")
            if image not in contexts:
                raise EvalDataError(f"{where}: image {image!r} has no caption in {self.path(self.context_file)}")
            if qid not in references:
                raise EvalDataError(f"{where}: question {qid!r} has no answer in {self.path(self.reference_answers)}")
            caption = contexts[image].get("caption", "")
            rows.append(Row(question_id=qid, prompt=field_of(line, "text", where, str), question=line["text"],
                            images=[self.path(self.image_folder) / image], reference=references[qid], where=where,
                            meta={"category": category,
                                  "caption": "\n".join(caption) if isinstance(caption, list) else caption}))
        return rows

    def review_prompt(self, row: Row, answer: str) -> str:
        role = "Assistant"
        return (f"[Context]\n{row.meta['caption']}\n\n"
                f"[Question]\n{row.question}\n\n"
                f"[{role} 1]\n{row.reference}\n\n[End of {role} 1]\n\n"
                f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
                f"[System]\n{LLAVA_BENCH_RULE}\n\n")

    def score_one(self, row: Row, answer: str) -> dict:
        review = self.require_judge().chat(
            [{"role": "system", "content": LLAVA_BENCH_SYSTEM},
             {"role": "user", "content": self.review_prompt(row, answer)}], temperature=0.2, max_tokens=1024)
        pair = parse_review_scores(review)
        return {"score": pair[1] / 10, "scores": pair, "review": review}

    def aggregate(self, rows, judged) -> dict:
        groups: dict[str, list[list[float]]] = {}
        for row, j in zip(rows, judged):
            groups.setdefault(row.meta["category"], []).append(j["scores"])
            groups.setdefault("all", []).append(j["scores"])

        def summary(pairs):
            reference = round(sum(p[0] for p in pairs) / len(pairs), 3)
            model = round(sum(p[1] for p in pairs) / len(pairs), 3)
            relative = round(model / reference * 100, 1) if reference else 0.0
            return {"relative_score": relative, "reference_score": round(reference * 10, 1),
                    "model_score": round(model * 10, 1), "n": len(pairs)}
        per_category = {k: summary(v) for k, v in sorted(groups.items())}
        overall = per_category.pop("all", {"relative_score": 0.0})
        return {"n": len(rows), **overall, "n_unparsed": sum(j["scores"] == [-1.0, -1.0] for j in judged),
                "per_category": per_category}

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "llava_bench_answers.jsonl"  # model_vqa.py's answer lines, for eval_gpt_review_bench.py
        path.write_text("".join(json.dumps({"question_id": r.question_id, "prompt": r.prompt, "text": a,
                                            "answer_id": str(r.question_id), "metadata": {}}) + "\n"
                                for r, a in zip(rows, answers)))
        return [path]
