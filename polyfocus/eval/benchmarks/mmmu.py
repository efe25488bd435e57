"""MMMU (validation by default), prompted as lmms-eval's `mmmu_val` and scored with MMMU's own answer parsing
(`MMMU/eval/eval_utils.py`: `parse_multi_choice_response`, `parse_open_response`, `eval_open`).

Files, either of:
- the Hugging Face release (`MMMU/<Subject>/<split>-*.parquet`; needs pyarrow), or
- JSON lines `mmmu_<split>.jsonl` (or .json list) with the same fields: `id`, `question`, `options` (a list, or
  its Python repr as in the release), `answer`, `question_type` ("multiple-choice" | "open"),
  `image_1`..`image_7` (file paths relative to --data, or the release's {"bytes": ...}).

Prompt: question + "\\n" + "A. opt\\nB. opt..." + "\\n\\nAnswer with the option's letter from the given choices
directly." (open questions: question + "\\n\\nAnswer the question using a single word or phrase."), with the
images named by `<image i>` in the text (sorted, each once) put first, as LLaVA places them: "<image> <image>\\n"
before the text. MMMU picks a random option when no letter can be parsed; here that choice is seeded by the
question id, so a run's score does not depend on order or sharding.
"""

from __future__ import annotations

import ast
import io
import random
import re

from PIL import Image

from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, field_of, percent, read_json, read_jsonl

MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
_IMAGE_REF = re.compile(r"<image \d+>")


def options_of(value, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        options = ast.literal_eval(value) if isinstance(value, str) else None
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list):
        raise EvalDataError(f"{where}: options must be a list (or its repr), got {value!r}")
    return [str(o) for o in options]


def mmmu_prompt(question: str, options: list[str], multiple_choice: bool) -> str:
    if multiple_choice:
        choices = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
        return f"{question}\n{choices}\n\n{MULTI_CHOICE_PROMPT}"
    return f"{question}\n\n{OPEN_PROMPT}"


# ----------------------------------------------------------------------------- MMMU's answer parsing


def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict, rng: random.Random) -> str:
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # avoid partial matches
    index_ans, ans_with_brack, candidates = True, False, []
    for choice in all_choices:  # (A) (B) ...
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if not candidates:
        for choice in all_choices:  # A B ...
            if f" {choice} " in response:
                candidates.append(choice)
    if not candidates and len(response.split()) > 5:  # a longer reply: look for an option's text
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False
    if not candidates:
        return rng.choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:  # several: the last one mentioned
        pattern = "({})" if ans_with_brack else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list:
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def parse_open_response(response: str) -> list:
    def key_responses(response: str) -> list[str]:
        response = response.strip().strip(".").lower()
        subs = re.split(r"\.\s(?=[A-Z])|\n", response)  # after lower(): in effect only the newlines split
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        found = []
        for i, sub in enumerate(subs):
            if i == len(subs) - 1:
                indicators.append("=")
            shortest = None
            for indicator in indicators:
                if indicator in sub:
                    tail = sub.split(indicator)[-1].strip()
                    if not shortest or len(tail) < len(shortest):  # as MMMU: an empty tail is replaced
                        shortest = tail
            if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
                found.append(shortest)
        return found or [response]

    keys = key_responses(response)
    predictions = list(keys)
    for key in keys:
        predictions += extract_numbers(key)
    normalized = []
    for p in predictions:
        normalized += normalize_str(p)
    return list(dict.fromkeys(normalized))


def eval_open(gold, predictions: list) -> bool:
    golds = []
    for answer in gold if isinstance(gold, list) else [gold]:
        golds += normalize_str(answer)
    for p in predictions:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


# ----------------------------------------------------------------------------- the benchmark


class MMMU(Benchmark):
    name = "mmmu"

    def __init__(self, data, split: str = "validation"):
        super().__init__(data)
        self.split = split

    def records(self) -> list[tuple[str, dict]]:
        for name in (f"mmmu_{self.split}.jsonl", f"mmmu_{self.split}.json"):
            path = self.path(name)
            if path.is_file():
                self.files.append(path)
                if name.endswith(".jsonl"):
                    return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
                return [(f"{path}[{i}]", r) for i, r in enumerate(read_json(path))]
        parquet = sorted(self.data.rglob(f"{self.split}-*.parquet")) if self.data.is_dir() else []
        if not parquet:
            raise EvalDataError(f"{self.name}: neither mmmu_{self.split}.jsonl nor {self.split}-*.parquet in "
                                f"{self.data}")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalDataError(f"{self.name}: reading {parquet[0]} needs pyarrow (pip install pyarrow)") from None
        out = []
        for path in parquet:
            self.files.append(path)
            out += [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        return out

    def image(self, value, where: str):
        if isinstance(value, dict) and value.get("bytes"):
            data = value["bytes"]
            return lambda: Image.open(io.BytesIO(data)).convert("RGB")
        if isinstance(value, str):
            return self.path(value)
        raise EvalDataError(f"{where}: an image field must be a path or {{'bytes': ...}}, got {type(value).__name__}")

    def load(self) -> list[Row]:
        rows = []
        for where, record in self.records():
            question = field_of(record, "question", where, str)
            multiple_choice = field_of(record, "question_type", where, str) == "multiple-choice"
            options = options_of(record.get("options", []), where) if multiple_choice else []
            text = mmmu_prompt(question, options, multiple_choice)
            names = sorted({ref.strip("<>").replace(" ", "_") for ref in _IMAGE_REF.findall(text)})
            missing = [n for n in names if not record.get(n)]
            if missing:
                raise EvalDataError(f"{where}: the text refers to {missing} but the row has no such image")
            answer = field_of(record, "answer", where)
            qid = field_of(record, "id", where, str)
            rows.append(Row(question_id=qid, question=question, where=where,
                            prompt=" ".join(["<image>"] * len(names)) + "\n" + text if names else text,
                            images=[self.image(record[n], where) for n in names],
                            reference=answer, meta={"options": options, "multiple_choice": multiple_choice,
                                                    "subject": "_".join(qid.split("_")[1:-1]) or "unknown"}))
        return rows

    def score_one(self, row: Row, answer: str) -> dict:
        gold = row.reference
        if isinstance(gold, str) and gold.startswith("["):  # open answers may be a list's repr
            try:
                gold = ast.literal_eval(gold)
            except (ValueError, SyntaxError):
                pass
        if row.meta["multiple_choice"]:
            letters = [chr(ord("A") + i) for i in range(len(row.meta["options"]))]
            parsed = parse_multi_choice_response(answer, letters, dict(zip(letters, row.meta["options"])),
                                                 random.Random(str(row.question_id)))
            correct = parsed in gold if isinstance(gold, list) else parsed == gold
            return {"score": float(correct), "parsed": parsed}
        parsed = parse_open_response(answer)
        return {"score": float(eval_open(gold, parsed)), "parsed": [str(p) for p in parsed]}

    def aggregate(self, rows, judged) -> dict:
        groups: dict[str, list[float]] = {}
        for row, j in zip(rows, judged):
            groups.setdefault(row.meta["subject"], []).append(j["score"])
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged),
                "per_subject": {k: percent(v) for k, v in sorted(groups.items())}}

