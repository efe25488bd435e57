"""MMBench and MMBench-CN: TSV with base64 images, single-pass and circular evaluation, the upload xlsx.

Files: OpenCompass's TSV (`mmbench_dev_20230712.tsv`, `mmbench_dev_cn_20231003.tsv`, or any other with the
columns index, question, hint, A-D, answer, category, image, ...; the only .tsv in --data is taken when the
default name is absent). In VLMEvalKit's TSVs a circular copy of question i has index i + k*1e6 and an image
column holding just the index of the row with the image; both are understood here.

Prompt (LLaVA's model_vqa_mmbench.py --single-pred-prompt): [hint + "\\n"] + question + "\\nA. opt" ... over
the options up to the first missing one, + "\\nAnswer with the option's letter from the given choices
directly." (CN: "\\n请直接回答选项字母。"). An option is missing when empty or one of pandas' default NA strings
(LLaVA reads the TSV with pandas, so "None", "NA", "N/A", "nan" are missing there too).

Scoring (no LLM): VLMEvalKit's exact-matching extraction `can_infer` (vlmeval/utils/matching_util.py), the fallback
VLMEvalKit itself uses without a judge, in one of two versions (the option `extraction`, recorded in the results'
`scores["rules"]`):

- "current" (default; VLMEvalKit 2cf2a36, 2026-06): an option letter counts when it is the reply's only one and
  stands among its last 4 words (changed 2025-08); otherwise "answer is X" / "correct answer is **X**" anywhere
  (case-insensitive, A-D: so "the answer is a cat" reads as A, as there; added 2026-06); otherwise the one option
  whose text the reply contains, unless the reply is over twice as long as the options' texts together
  (changed 2025-08).
- "early2025" (VLMEvalKit aca64db, 2025-04): the reply's only option letter anywhere, else the one option whose
  text it contains: what this project (and LLaVA-era numbers) used before.

Upload the xlsx to OpenCompass for its own extraction (it adds a ChatGPT fallback).

- circular unset (default): as LLaVA's v1.5 script, every row of the TSV is run; when the TSV carries circular
  copies (OpenCompass's dev TSVs do) the main number is the circular accuracy the evaluation server reports,
  otherwise the single-pass accuracy. The upload xlsx then holds every row, as the server expects.
- circular=False: the original questions (index < 1e6) only, accuracy per category.
- circular=True: every circular variant must be right. The TSV's own copies are used when it has them;
  otherwise the variants are made as LLaVA's --all-rounds does (the option texts rotate under fixed letters),
  with question id index + round*1e6.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from polyfocus.data.prompts import MC_ANSWER, MC_ANSWER_CN
from polyfocus.eval.benchmarks.base import Benchmark, EvalDataError, Row, base64_image, percent

LETTERS = ("A", "B", "C", "D")  # a tuple: substrings such as "" must not count as letters
ROUND = 1_000_000
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


# The versions of VLMEvalKit's extraction (vlmeval/utils/matching_util.py) that `can_infer` follows, by option value.
EXTRACTIONS = {"current": "VLMEvalKit matching_util@2cf2a36 (2026-06-25)",
               "early2025": "VLMEvalKit matching_util@aca64db (2025-04-08)"}
LAST_WORDS = 4  # "current": a lone option letter counts only among the reply's last 4 words
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")  # "current": "answer is **B**"


def is_missing(value) -> bool:
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


# ----------------------------------------------------------------------------- answer extraction (VLMEvalKit)
# Written from VLMEvalKit's rules (open-compass/VLMEvalKit, vlmeval/utils/matching_util.py), not copied.


def can_infer_option(answer: str, choices: dict[str, str], extraction: str = "current") -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    words = answer
    for c in ".()[],:;!*#{}":
        words = words.replace(c, " ")
    words = words.split()
    hits = [letter for letter in choices if letter in words]
    if len(hits) == 1 and (extraction != "current" or words.index(hits[0]) >= len(words) - LAST_WORDS):
        return hits[0]
    if not hits and "Z" in words:
        return "Z"
    if extraction == "current":  # several letters, or one too early: a stated answer decides
        stated = VERBOSE_ANSWER.search(answer)
        if stated and stated.group(1).upper() in choices:
            return stated.group(1).upper()
    return None


def can_infer_text(answer: str, choices: dict[str, str], extraction: str = "current") -> str | None:
    answer = answer.lower()
    if extraction == "current" and len(answer) > 2 * sum(len(str(text)) for text in choices.values()):
        return None  # a long reply mentions options it does not choose
    hits = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: dict[str, str], extraction: str = "current") -> str | None:
    """The option letter a reply picks, or None (or "Z" for a refusal), by VLMEvalKit's rules of `extraction`
    (EXTRACTIONS)."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {sorted(EXTRACTIONS)}, got {extraction!r}")
    return can_infer_option(answer, choices, extraction) or can_infer_text(answer, choices, extraction)


# ----------------------------------------------------------------------------- the benchmark


class MMBench(Benchmark):
    name = "mmbench"
    lang = "en"
    default_tsv = "mmbench_dev_20230712.tsv"
    max_new_tokens = 1024
    scoring_options = ("extraction",)

    def __init__(self, data, tsv: str | None = None, circular: bool | None = None, extraction: str = "current"):
        super().__init__(data)
        if extraction not in EXTRACTIONS:
            raise EvalDataError(f"{self.name}: extraction must be one of {sorted(EXTRACTIONS)}, got {extraction!r}")
        self.tsv, self.circular = tsv, circular  # None: circular exactly when the TSV carries circular copies
        self.extraction = extraction
        self.main_metric = "circular_accuracy" if circular else "accuracy"

    def tsv_path(self) -> Path:
        if self.tsv:
            return self.require(self.tsv, "MMBench TSV")
        if not self.path(self.default_tsv).is_file():
            found = sorted(self.data.glob("*.tsv")) if self.data.is_dir() else []
            if len(found) == 1:
                return self.require(found[0], "MMBench TSV")
        return self.require(self.default_tsv, "MMBench TSV (or pass the option tsv=FILE)")

    def read_table(self, path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = reader.fieldnames or []
            missing = [c for c in ("index", "question", "image", "A", "B") if c not in header]
            if missing:
                raise EvalDataError(f"{path}: missing column(s) {missing} (columns: {header})")
            table = []
            for number, record in enumerate(reader, start=2):  # line 1 is the header
                if None in record or any(v is None for v in record.values()):
                    raise EvalDataError(f"{path}:{number}: expected {len(header)} tab-separated fields")
                try:
                    record["index"] = int(float(record["index"]))
                except ValueError:
                    raise EvalDataError(f"{path}:{number}: index {record['index']!r} is not a number") from None
                table.append((number, record))
        return header, table

    def load(self) -> list[Row]:
        path = self.tsv_path()
        self.header, table = self.read_table(path)
        self.table = {record["index"]: record for _, record in table}
        has_copies = any(r["index"] >= ROUND for _, r in table)
        if self.circular is None:  # LLaVA runs every TSV row; the server then scores the copies circularly
            self.circular = has_copies
            self.main_metric = "circular_accuracy" if has_copies else "accuracy"
        rows = []
        for number, record in table:
            if record["index"] >= ROUND and not self.circular:
                continue
            where = f"{path}:{number}"
            rounds = len(self.options_of(record, where)) if self.circular and not has_copies else 1
            rows += [self.row(record, k, where) for k in range(rounds)]
        return rows

    def options_of(self, record: dict, where: str) -> list[str]:
        options = []
        for letter in LETTERS:
            if is_missing(record.get(letter)):
                break
            options.append(record[letter])
        if len(options) < 2:
            raise EvalDataError(f"{where}: fewer than two options in columns A-D")
        return options

    def image_of(self, record: dict, where: str):
        data = record["image"]
        if len(data) < 16:  # VLMEvalKit: a short value is the index of the row holding the image
            try:
                source = self.table.get(int(float(data)))
            except ValueError:
                source = None
            if source is None or len(source["image"]) < 16:
                raise EvalDataError(f"{where}: image column {data!r} is neither base64 nor the index of a row with one")
            data = source["image"]
        return base64_image(data, where)

    def row(self, record: dict, round_id: int, where: str) -> Row:
        """Question `record` with its options rotated `round_id` places (LLaVA's --all-rounds: the option texts
        move, the letters stay)."""
        original = self.options_of(record, where)
        options = original[round_id:] + original[:round_id]
        question = record["question"]
        if not is_missing(record.get("hint")):
            question = record["hint"] + "\n" + question
        for letter, option in zip(LETTERS, options):
            question += "\n" + letter + ". " + option
        answer, reference = record.get("answer"), None
        if not is_missing(answer):
            if answer not in LETTERS[: len(original)]:
                raise EvalDataError(f"{where}: answer {answer!r} is not one of the options {LETTERS[:len(original)]}")
            reference = LETTERS[(LETTERS.index(answer) - round_id) % len(original)]
        return Row(question_id=record["index"] + round_id * ROUND, question=record["question"], where=where,
                   prompt=question + (MC_ANSWER_CN if self.lang == "cn" else MC_ANSWER),
                   images=[self.image_of(record, where)], reference=reference,
                   meta={"index": record["index"], "round_id": round_id, "options": options,
                         "category": record.get("category"), "l2_category": record.get("l2-category")})

    def score_one(self, row: Row, answer: str) -> dict:
        choices = dict(zip(LETTERS, row.meta["options"]))
        letter = can_infer(answer, choices, self.extraction)
        return {"score": float(letter is not None and letter == row.reference), "parsed": letter}

    def aggregate(self, rows, judged) -> dict:
        rules = {"extraction": self.extraction, "rules": EXTRACTIONS[self.extraction]}
        if any(r.reference is None for r in rows):
            return {"n": len(rows), "accuracy": None, "note": "no answer column: upload submission/*.xlsx", **rules}
        single = [(r, j["score"]) for r, j in zip(rows, judged) if r.question_id < ROUND]
        scores = {"n": len(single), "accuracy": percent(s for _, s in single),
                  "per_category": per_category([(r.meta["category"], s) for r, s in single]), **rules}
        if self.circular:
            groups: dict[int, list] = {}
            for r, j in zip(rows, judged):
                groups.setdefault(r.question_id % ROUND, []).append((r, j["score"]))
            outcome = [(g[0][0].meta["category"], float(all(s == 1.0 for _, s in g))) for g in groups.values()]
            scores.update(n_circular=len(groups), circular_accuracy=percent(s for _, s in outcome),
                          per_category_circular=per_category(outcome))
        return scores

    def write_submission(self, rows, answers, out_dir) -> list[Path]:
        """convert_mmbench_for_submission.py: the TSV minus hint/category/source/image/comment/l2-category, with a
        `prediction` column inserted at position 6, one line per TSV row that was run."""
        from openpyxl import Workbook  # the [eval] extra

        predictions = {row.question_id: a for row, a in zip(rows, answers)}
        columns = [c for c in self.header if c not in DROPPED_COLUMNS]
        columns.insert(min(6, len(columns)), "prediction")
        book = Workbook()
        sheet = book.active
        sheet.append(columns)
        for index, record in self.table.items():
            if index in predictions:
                sheet.append([predictions[index] if c == "prediction" else record.get(c) for c in columns])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}_submission.xlsx"
        book.save(path)
        return [path]


class MMBenchCN(MMBench):
    name = "mmbench_cn"
    lang = "cn"
    default_tsv = "mmbench_dev_cn_20231003.tsv"


def per_category(pairs) -> dict:
    groups: dict[str, list[float]] = {}
    for category, score in pairs:
        groups.setdefault(str(category), []).append(score)
    return {k: percent(v) for k, v in sorted(groups.items())}

