"""Run a benchmark on a model: batched greedy generation, data-parallel shards, resume, and the output files.

    from polyfocus.eval import evaluate
    results = evaluate("runs/stage2", "pope", "playground/data/eval/pope", out="eval", batch_size=8)

Outputs, in `<out>/<benchmark>/`:
- `answers.jsonl`: one LLaVA-style answer line per question (`question_id`, `prompt`, `text`, `model_id`,
  `metadata`), in the benchmark's order.
- `samples.jsonl`: per question: id, question, the prompt as sent, answer, reference and the scorer's verdict.
- `results.json`: the scores and what reproduces them (model, template, decoding, image processing, package
  versions, the benchmark files' sha256, the command line).
- `submission/`: the benchmark's upload file, where it has one (EvalAI JSON, MMBench xlsx, ...).
- `run.json`: the settings that the answers depend on; a resumed run must match them.

Data-parallel: under torchrun / accelerate (RANK and WORLD_SIZE in the environment) or with LLaVA's
`num_chunks` / `chunk_idx`, the questions are cut into contiguous chunks (LLaVA's `get_chunk`); each process
writes `answers.chunk<k>of<n>.jsonl`. Under a launcher, rank 0 waits for the other shards, merges them and
scores; with explicit chunks, whichever process finds every shard complete does.

Resume: answers are appended per batch and flushed to disk. A rerun reads the answers file, drops a torn last
line (a write cut short), skips the questions already answered and appends the rest; the model is not even
loaded when nothing is left to answer (rescoring, e.g. after a judge failure, is just a rerun).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from polyfocus.data.files import require_local, sha256_file, write_atomic
from polyfocus.eval.benchmarks import Benchmark, EvalDataError, Row, get_benchmark

IMAGE_TOKEN = "<image>"
ANSWERS = "answers.jsonl"
POLL_SECONDS = 5.0
SETTING_DEFAULTS = {"strategy": "plain"}  # settings added later: what a run.json without them was made with


class EvalRunError(RuntimeError):
    """The output directory holds a run made with other settings (or similar misuse)."""


# ----------------------------------------------------------------------------- entry point


def evaluate(model, benchmark: str, data: str | os.PathLike, out: str | os.PathLike | None = None,
             batch_size: int = 8, limit: int | None = None, max_new_tokens: int | None = None,
             template: str | None = None, device: str | None = None, dtype: str | None = None,
             num_chunks: int | None = None, chunk_idx: int | None = None, options: dict | None = None,
             judge=None, wait_timeout: float = 7 * 24 * 3600.0, quiet: bool = False,
             strategy: str = "plain") -> dict | None:
    """Run `benchmark` over the files in `data` with `model` (a checkpoint directory or a ready Pipeline).

    strategy: how each answer is produced, "plain" or "dualfocus" (polyfocus/infer/strategies.py; DualFocus's
    per-question details go into the answers' `metadata`).

    Returns the results dict (also written to <out>/<benchmark>/results.json), or None for a shard that leaves
    the merging to another process.
    """
    from polyfocus.infer.strategies import get_strategy

    answering = get_strategy(strategy)  # an unknown name: refused before anything runs
    bench = get_benchmark(benchmark, data, **(options or {}))
    rows = bench.load()[:limit] if limit else bench.load()
    check_rows(bench, rows)
    if isinstance(model, (str, os.PathLike)):  # a missing model directory: said now, never looked up on a hub
        require_local(model, "model")
    rank, world, launched = shard_of(num_chunks, chunk_idx)
    out_dir = Path(out if out is not None else default_out(model)) / bench.name
    max_new_tokens = max_new_tokens or bench.max_new_tokens
    options = json.loads(json.dumps(options or {}, default=str))  # paths as strings: run.json is JSON
    answering_options = {k: v for k, v in options.items() if k not in bench.scoring_options}  # the answers' settings
    settings = {"benchmark": bench.name, "data": str(Path(data).resolve()), "options": answering_options,
                "model": model_path(model), "template": template or "auto", "max_new_tokens": max_new_tokens,
                "temperature": 0.0, "num_beams": 1, "world_size": world, "strategy": strategy}
    check_settings(out_dir, settings)
    silent = quiet or (launched and rank != 0)  # under a launcher, rank 0 speaks for all
    say = (lambda *a: None) if silent else (lambda *a: print(*a, file=sys.stderr, flush=True))

    mine = get_chunk(rows, world, rank)
    shard = out_dir / shard_name(rank, world)
    done = read_answers(shard)
    todo = [r for r in mine if r.question_id not in done]
    timing = {}
    if todo:
        say(f"[{bench.name}] {len(mine) - len(todo)} of {len(mine)} already answered; answering {len(todo)}")
        pipe = load_pipeline(model, template, device, dtype, launched)
        if rank == 0:
            record_generation(out_dir, pipe)
        start = time.perf_counter()
        generate_answers(pipe, bench, todo, shard, batch_size, max_new_tokens, progress=not silent,
                         strategy=answering)
        elapsed = time.perf_counter() - start
        timing = {"generate_s": round(elapsed, 3), "answered": len(todo),
                  "samples_per_s": round(len(todo) / elapsed, 3) if elapsed > 0 else None}

    if world > 1 and not ready_to_merge(rows, out_dir, world, rank, launched, wait_timeout):
        say(f"[{bench.name}] chunk {rank} of {world} done; the last chunk to finish merges and scores")
        return None
    answers = merge_answers(rows, out_dir, world)
    bench.judge = make_judge(bench, judge, out_dir)
    return score_and_write(bench, rows, answers, out_dir, settings, batch_size, timing, say)


# ----------------------------------------------------------------------------- rows, shards, settings


def check_rows(bench: Benchmark, rows: list[Row]) -> None:
    """Unique question ids, and every image file present, before any model time is spent."""
    seen: dict[Any, str] = {}
    for row in rows:
        if row.question_id in seen:
            raise EvalDataError(f"{bench.name}: question id {row.question_id!r} appears twice ({seen[row.question_id]} "
                                f"and {row.where})")
        seen[row.question_id] = row.where
    missing = [(row, ref) for row in rows for ref in row.images
               if isinstance(ref, (str, os.PathLike)) and not os.path.isfile(ref)]
    if missing:
        row, ref = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvalDataError(f"{bench.name}: image not found: {ref} (question {row.question_id!r}, {row.where}){more}")


def shard_of(num_chunks: int | None, chunk_idx: int | None) -> tuple[int, int, bool]:
    """(rank, world size, started by a launcher): explicit chunks win over RANK / WORLD_SIZE."""
    if num_chunks is not None:
        chunk_idx = chunk_idx or 0
        if not 0 <= chunk_idx < num_chunks:
            raise ValueError(f"chunk_idx {chunk_idx} is not in [0, {num_chunks})")
        return chunk_idx, num_chunks, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, world > 1


def get_chunk(rows: list, n: int, k: int) -> list:
    """LLaVA's get_chunk: n contiguous chunks of ceil(len/n) (the last ones may be short or empty)."""
    size = math.ceil(len(rows) / n) if rows else 0
    return rows[k * size:(k + 1) * size] if size else []


def shard_name(rank: int, world: int) -> str:
    return ANSWERS if world == 1 else f"answers.chunk{rank}of{world}.jsonl"


def model_path(model) -> str:
    """The checkpoint a model comes from: the directory, or a pipeline's model.name_or_path."""
    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve())
    return str(getattr(getattr(model, "model", model), "name_or_path", "") or type(model).__name__)


def default_out(model) -> Path:
    return Path("eval_results") / (Path(model_path(model)).name or "model")


def check_settings(out_dir: Path, settings: dict) -> None:
    """Answers in out_dir are reused only if they were made with the same settings."""
    path = out_dir / "run.json"
    if path.is_file():
        old = {**SETTING_DEFAULTS, **json.loads(path.read_text())}
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise EvalRunError(f"{out_dir} holds answers made with other settings {changed} (old, new); "
                               f"use another --out or delete the directory")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=2))


def record_generation(out_dir: Path, pipe) -> None:
    """What the loaded pipeline resolved (template, image processing, dtype), kept for results.json."""
    path = out_dir / "run.json"
    settings = json.loads(path.read_text())
    model = getattr(pipe, "model", None)
    processor = getattr(pipe, "image_processor", None)
    template = getattr(pipe, "template", None)
    chat_template = getattr(template, "chat_template", None) or getattr(getattr(pipe, "tokenizer", None),
                                                                         "chat_template", None)
    settings["generation"] = {
        "template": getattr(template, "name", None),  # "tokenizer": the tokenizer's own chat_template, hashed below
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()
        if isinstance(chat_template, str) and getattr(template, "name", None) == "tokenizer" else None,
        "stop": getattr(pipe, "stop", None), "do_sample": False,
        "image_processor": processor.to_hf_dict() if hasattr(processor, "to_hf_dict") else None,
        "dtype": str(getattr(model, "dtype", None)), "device": str(getattr(model, "device", None)),
        "num_image_tokens": getattr(getattr(model, "config", None), "num_image_tokens", None),
    }
    write_atomic(path, json.dumps(settings, indent=2))


def make_judge(bench: Benchmark, judge, out_dir: Path):
    """For a GPT-judged benchmark: the given Judge, or one built from a dict of Judge's keywords (base_url, model,
    api_key), caching its replies in out_dir; the benchmark's reference judge model unless one is named."""
    if not getattr(bench, "judge_model", ""):
        return None
    from polyfocus.eval.judge import Judge

    if not isinstance(judge, Judge):
        judge = Judge(**{"cache": out_dir / "judge_cache.jsonl", **(judge or {})})
    judge.model = judge.model or bench.judge_model
    return judge


# ----------------------------------------------------------------------------- generation


def load_pipeline(model, template, device, dtype, launched: bool):
    """The model as a Pipeline; under a launcher each process takes the GPU of its LOCAL_RANK."""
    import torch

    from polyfocus.infer.pipeline import Pipeline, load_tokenizer

    if hasattr(model, "generate") and not isinstance(model, (str, os.PathLike)):
        return model  # a Pipeline (or anything with its generate(requests, ...) signature)
    if device is None and launched and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if template is None and not getattr(load_tokenizer(model), "chat_template", None):
        template = "vicuna_v1"  # LLaVA-1.5's eval conv mode, for tokenizers saved without a chat template
    return Pipeline.from_pretrained(model, template=template, device=device, dtype=dtype)


def user_message(row: Row) -> str:
    """The user turn as sent: "<image>\\n" per image first, unless the prompt places its images itself."""
    if IMAGE_TOKEN in row.prompt or not row.images:
        return row.prompt
    return (IMAGE_TOKEN + "\n") * len(row.images) + row.prompt


def load_images(bench: Benchmark, row: Row) -> list[Image.Image]:
    from polyfocus.data.images import ImageLoadError, load_image

    images = []
    for ref in row.images:
        try:
            images.append(load_image(ref) if isinstance(ref, (str, os.PathLike)) else ref())
        except ImageLoadError as e:
            raise EvalDataError(f"{bench.name}: question {row.question_id!r} ({row.where}): {e}") from None
    return images


def generate_answers(pipe, bench: Benchmark, rows: list[Row], shard: Path, batch_size: int, max_new_tokens: int,
                     progress: bool = True, strategy=None) -> None:
    """Answer `rows` in batches (with `strategy`, default plain), appending one line per answer to `shard` and
    syncing after every batch."""
    from polyfocus.infer.strategies import get_strategy

    strategy = strategy or get_strategy("plain")
    model_id = Path(model_path(pipe)).name
    shard.parent.mkdir(parents=True, exist_ok=True)
    with open(shard, "a", encoding="utf-8") as f, tqdm(total=len(rows), desc=bench.name, disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            requests = [(load_images(bench, r), user_message(r)) for r in batch]
            texts, details = strategy.generate(pipe, requests, max_new_tokens=max_new_tokens, temperature=0.0,
                                               batch_size=len(batch))
            f.write("".join(json.dumps({"question_id": r.question_id, "prompt": r.prompt, "text": t,
                                        "model_id": model_id, "metadata": d}, ensure_ascii=False) + "\n"
                            for r, t, d in zip(batch, texts, details)))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))


def read_answers(path: Path) -> dict[Any, dict]:
    """{question_id: answer line} of an answers file. A torn last line (the process died mid-write: no newline
    after it) is cut off the file; a bad line anywhere else is an error naming it."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete, newline, tail = data.rpartition(b"\n")
    answers = {}
    for number, line in enumerate(complete.split(b"\n") if newline else [], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers[record["question_id"]] = record
        except (ValueError, KeyError, TypeError) as e:
            raise EvalDataError(f"{path}:{number}: not an answer line ({e}); fix or delete the file") from None
    if tail:
        print(f"{path}: dropping a torn last line ({len(tail)} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(len(complete) + len(newline))
    return answers


def answered_ids(path: Path) -> set:
    """The question ids in a shard that another process may be writing right now (partial lines are skipped)."""
    ids = set()
    if path.is_file():
        for line in path.read_bytes().split(b"\n"):
            try:
                ids.add(json.loads(line)["question_id"])
            except (ValueError, KeyError, TypeError):
                continue
    return ids


def all_answered(rows: list[Row], shards: list[Path]) -> bool:
    answered = set().union(*(answered_ids(s) for s in shards))
    return all(r.question_id in answered for r in rows)


def ready_to_merge(rows: list[Row], out_dir: Path, world: int, rank: int, launched: bool, timeout: float) -> bool:
    """Whether this process merges: under a launcher rank 0 does, once every shard is complete (it waits for them);
    with explicit chunks, any process that finds every shard complete does."""
    if launched and rank != 0:
        return False
    shards = [out_dir / shard_name(k, world) for k in range(world)]
    while not all_answered(rows, shards):
        if not launched:
            return False
        timeout -= POLL_SECONDS
        if timeout < 0:
            raise EvalRunError(f"{out_dir}: gave up waiting for the other shards")
        time.sleep(POLL_SECONDS)
    return True


def merge_answers(rows: list[Row], out_dir: Path, world: int) -> dict[Any, dict]:
    """Every shard's answers, written as one answers.jsonl in the benchmark's order."""
    answers: dict[Any, dict] = {}
    for k in range(world):
        answers.update(read_answers(out_dir / shard_name(k, world)))
    missing = [r.question_id for r in rows if r.question_id not in answers]
    if missing:
        raise EvalRunError(f"{out_dir}: {len(missing)} questions have no answer (first: {missing[0]!r})")
    write_atomic(out_dir / ANSWERS, "".join(json.dumps(answers[r.question_id], ensure_ascii=False) + "\n"
                                             for r in rows))
    return answers


# ----------------------------------------------------------------------------- scoring and outputs


def score_and_write(bench: Benchmark, rows: list[Row], answers: dict, out_dir: Path, settings: dict,
                    batch_size: int, timing: dict, say) -> dict:
    texts = [answers[r.question_id]["text"] for r in rows]
    judged = [bench.score_one(r, t) for r, t in zip(rows, texts)]
    scores = bench.aggregate(rows, judged)
    write_atomic(out_dir / "samples.jsonl", "".join(
        json.dumps({"question_id": r.question_id, "question": r.question, "prompt": user_message(r), "answer": t,
                    "reference": r.reference, **j}, ensure_ascii=False) + "\n"
        for r, t, j in zip(rows, texts, judged)))
    run = json.loads((out_dir / "run.json").read_text())
    results = {
        "benchmark": bench.name, "main_metric": bench.main_metric, "main": scores.get(bench.main_metric),
        "scores": scores, "n": len(rows), "model": settings["model"],
        "decoding": {"do_sample": False, "temperature": 0.0, "num_beams": 1,
                     "max_new_tokens": settings["max_new_tokens"], "batch_size": batch_size},
        "settings": run, "files_sha256": hash_files(bench.files), "environment": environment(),
        "timing": timing, "command": sys.argv, "judge": bench.judge.describe() if bench.judge else None,
    }
    try:
        results["submission"] = [str(p) for p in bench.write_submission(rows, texts, out_dir / "submission")]
    except ImportError as e:  # openpyxl missing: the scores stand, the upload file is not made
        results["submission_error"] = f"{e} (pip install 'polyfocus[eval]')"
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    say(f"[{bench.name}] {bench.main_metric} = {format_value(results['main'])} over {len(rows)} questions; "
        f"results in {out_dir / 'results.json'}")
    return results


def hash_files(files: list[Path]) -> dict[str, str]:
    """sha256 of each benchmark file; many small files (MME's) are summarised as one digest per folder."""
    digests = {str(p): sha256_file(p) for p in dict.fromkeys(files)}
    if len(digests) <= 32:
        return digests
    folders: dict[str, Any] = {}
    for path, digest in sorted(digests.items()):
        folder = str(Path(path).parent.parent)
        folders.setdefault(folder, hashlib.sha256()).update(f"{Path(path).name}:{digest}\n".encode())
    return {f"{folder}/ (combined)": h.hexdigest() for folder, h in folders.items()}



def environment() -> dict:
    versions = {}
    for package in ("polyfocus", "torch", "transformers", "tokenizers", "pillow", "numpy", "openpyxl"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions}


# ----------------------------------------------------------------------------- summary across benchmarks


def format_value(value) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


def summary_table(root: str | os.PathLike) -> str:
    """A markdown table of every results.json under `root`: one row per model, one column per benchmark (its main
    metric, as the papers print it)."""
    results = [json.loads(p.read_text()) for p in sorted(Path(root).rglob("results.json"))]
    if not results:
        raise FileNotFoundError(f"no results.json under {root}")
    from polyfocus.eval.benchmarks import BENCHMARKS

    order = list(BENCHMARKS)
    columns = sorted({(r["benchmark"], r["main_metric"]) for r in results},
                     key=lambda c: (order.index(c[0]) if c[0] in order else len(order), c))
    models: dict[str, dict] = {}
    for r in results:
        models.setdefault(Path(r["model"]).name or r["model"], {})[(r["benchmark"], r["main_metric"])] = r
    header = ["model"] + [f"{b} ({metric})" for b, metric in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for model, by_column in models.items():
        cells = [format_value(by_column[c]["main"]) if c in by_column else "" for c in columns]
        lines.append("| " + " | ".join([model] + cells) + " |")
    return "\n".join(lines)
