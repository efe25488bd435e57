"""What every benchmark shares: a `Row` per question, the `Benchmark` interface, and readers of the
benchmark files that name the file and the row when something is wrong with them.

A benchmark is a small class:

    bench = SomeBenchmark(data_dir, **options)   # options: file names, splits, ... (defaults: LLaVA's layout)
    rows = bench.load()                          # one Row per question, in the benchmark's own order
    judged = bench.score_one(row, answer_text)   # per question: {"score": float in [0, 1], ...}
    scores = bench.aggregate(rows, judgeds)      # the published metrics, percentages like the papers print them
    bench.write_submission(rows, answers, dir)   # the upload file, where the benchmark has one

The runner (polyfocus/eval/runner.py) does everything else: batching, sharding, resume, output files.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from polyfocus.data import files

ImageRef = str | Path | Callable[[], Image.Image]  # a file, or something that decodes one (base64 in a TSV)


class EvalDataError(ValueError):
    """A benchmark file is missing or malformed, or an image is missing. The message names the file and row."""


@dataclass
class Row:
    question_id: Any
    prompt: str                      # the user message; "<image>\n" per image is prepended unless it holds "<image>"
    images: list[ImageRef] = field(default_factory=list)
    question: str = ""               # the question as the benchmark file has it (for the samples file)
    reference: Any = None            # what the answer is scored against (JSON-serialisable)
    meta: dict = field(default_factory=dict)
    where: str = ""                  # "file:line" of the row, for error messages


class Benchmark:
    name = ""
    max_new_tokens = 128             # LLaVA's model_vqa_loader default; model_vqa / mmbench / science use 1024
    main_metric = "accuracy"         # the number the summary table shows
    scoring_options: tuple[str, ...] = ()  # options that change the scoring only: a rerun may rescore with others

    def __init__(self, data: str | os.PathLike):
        self.data = Path(data)
        self.files: list[Path] = []  # every annotation/question file read: hashed into results.json

    def path(self, name: str | os.PathLike) -> Path:
        """A file named by an option: absolute, or relative to the data directory."""
        return Path(name) if Path(name).is_absolute() else self.data / name

    def require(self, name: str | os.PathLike, what: str) -> Path:
        path = self.path(name)
        if not path.exists():
            raise EvalDataError(f"{self.name}: {what} not found: {path}")
        if path.is_file():
            self.files.append(path)
        return path

    def load(self) -> list[Row]:
        raise NotImplementedError

    def score_one(self, row: Row, answer: str) -> dict:
        raise NotImplementedError

    def aggregate(self, rows: list[Row], judged: list[dict]) -> dict:
        return {"n": len(rows), "accuracy": percent(j["score"] for j in judged)}

    def write_submission(self, rows: list[Row], answers: list[str], out_dir: Path) -> list[Path]:
        return []


# ----------------------------------------------------------------------------- readers


def read_json(path: Path) -> Any:
    return files.read_json(path, EvalDataError)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a bad line is an error naming file and line."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"file not found: {path}") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def field_of(record: dict, key: str, where: str, types: type | tuple = object) -> Any:
    """record[key], or an error naming the row and the missing / mistyped field."""
    if key not in record:
        raise EvalDataError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, types):
        raise EvalDataError(f"{where}: field {key!r} is {type(value).__name__}, expected "
                            f"{getattr(types, '__name__', types)}")
    return value


def base64_image(data: str, where: str) -> Callable[[], Image.Image]:
    """A loader for a base64-encoded image (MMBench's TSV), decoded when the row is run."""
    def load() -> Image.Image:
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as img:
                img.load()
                return img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure is the same data error
            raise EvalDataError(f"{where}: the image column is not a decodable base64 image ({e})") from None
    return load


# ----------------------------------------------------------------------------- prompts and numbers


def with_suffix(text: str, suffix: str) -> str:
    """LLaVA's question files already end with the answer-format instruction; add it where a file lacks it."""
    return text if text.endswith(suffix) else text + suffix


def without_suffix(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def grouped_percent(rows: list[Row], judged: list[dict], key: Callable[[Row], Any]) -> dict:
    """{group: accuracy %} over the rows, grouped by key(row), in first-seen order."""
    groups: dict[Any, list[float]] = {}
    for row, j in zip(rows, judged):
        groups.setdefault(key(row), []).append(j["score"])
    return {str(k): percent(v) for k, v in groups.items()}
