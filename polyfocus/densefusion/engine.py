"""The DenseFusion data engine (`polyfocus densefusion run`): images -> vision experts -> fusion prompt -> captioner
-> dense captions, in DenseFusion's jsonl format (spec densefusion.md §1, §6).

Output directory:

    run.json              what decides the output (experts and options, captioner, prompt, shard size, the images)
    items.jsonl           the images, in order (image_id, image_path, url, alt_text)
    shards/00000.jsonl    one record per image of shard 0 (items 0..shard_size-1), in input order:
                          {"image_id", "url"?, "caption", "image_path", "hints"} or, when it failed,
                          {"image_id", "url"?, "error", "image_path", "hints"}
    shards/00000.json     the shard's timings (seconds per stage: load, each expert, captioner)
    captions.jsonl        every captioned record, in input order: the training data (`data_path` takes it as is)
    failed.jsonl          every failed record with its error (rerun them with --images failed.jsonl)
    timings.json          seconds and seconds-per-image of each stage, images/s

Exactly once: image i belongs to shard i // shard_size; a shard file is written whole to a temporary name and then
renamed (atomic), and a shard whose file exists is never redone. A run killed at any moment leaves finished shards
and at worst a temporary file; the rerun (same command) redoes only the unfinished shards, so every image ends up
in exactly one record. A rerun over different images or settings is refused (run.json).

Engines: "local" (this process, or `workers` processes each holding its own experts and captioner) and "ray"
(polyfocus/densefusion/ray_engine.py: Ray Data over a cluster; the output directory must be shared storage).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from polyfocus.data.files import write_atomic
from polyfocus.data.images import load_image
from polyfocus.densefusion.prompts import fusion_prompt
from polyfocus.experts import Item, build_experts

SHARDS = "shards"


@dataclass
class EngineSpec:
    """Everything that decides the engine's output."""
    experts: list[str]
    captioner: str  # local:DIR | openai:URL | file:PATH
    expert_options: dict[str, dict] = field(default_factory=dict)
    captioner_options: dict = field(default_factory=dict)
    prompt: str = "engine"  # engine | meta (polyfocus/densefusion/prompts.py)
    shard_size: int = 256


# ---- one shard ----------------------------------------------------------------------------------------------------


class ShardWorker:
    """The experts and the captioner, built once; `process` turns one shard's items into its records."""

    def __init__(self, spec: EngineSpec, image_root: str, batch_size: int = 8):
        from polyfocus.densefusion.captioners import build_captioner

        self.spec, self.image_root, self.batch_size = spec, image_root, batch_size
        self.experts = build_experts(spec.experts, spec.expert_options)
        self.captioner = build_captioner(spec.captioner, spec.captioner_options)

    def process(self, items: list[Item]) -> tuple[list[dict], dict]:
        """(one record per item, in order; the shard's timings)."""
        records: dict[str, dict] = {}
        seconds: dict[str, float] = defaultdict(float)
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            batch = self._stage("load", self._load, batch, records, seconds)
            for expert in self.experts:
                batch = self._stage(expert.name, expert, batch, records, seconds)
            t = time.perf_counter()
            prompts = [fusion_prompt(item.hints, self.spec.prompt) for item in batch]
            captions = self.captioner(batch, prompts)
            seconds["captioner"] += time.perf_counter() - t
            for item, caption in zip(batch, captions):
                records[item.image_id] = record(item, caption.text, None if caption.error is None
                                                else f"captioner: {caption.error}")
            for item in items[start:start + self.batch_size]:
                item.image = None  # free the pixels
        stats = {"images": len(items), "failed": sum("error" in r for r in records.values()),
                 "seconds": dict(seconds)}
        return [records[item.image_id] for item in items], stats

    def _load(self, batch: list[Item]) -> None:
        for item in batch:
            item.image = load_image(os.path.join(self.image_root, item.image_path))

    @staticmethod
    def _stage(name: str, fn, batch: list[Item], records: dict, seconds: dict) -> list[Item]:
        """Run one stage on the batch; if it raises, on each item alone (from the hints it had before the stage:
        a half-done batch call must not leave findings twice): the items that still fail get a failure record
        (naming the stage) and leave the batch."""
        t = time.perf_counter()
        before = [copy.deepcopy(item.hints) for item in batch]
        try:
            fn(batch)
            ok = batch
        except Exception:  # noqa: BLE001 - isolate the bad item(s) below
            ok = []
            for item, hints in zip(batch, before):
                item.hints = copy.deepcopy(hints)
                try:
                    fn([item])
                    ok.append(item)
                except Exception as e:  # noqa: BLE001 - recorded for this image (ImageLoadError included)
                    item.hints = hints
                    records[item.image_id] = record(item, None, f"{name}: {type(e).__name__}: {e}")
        seconds[name] += time.perf_counter() - t
        return ok


def record(item: Item, caption: str | None, error: str | None) -> dict:
    """A DenseFusion-1M record (image_id, url, caption, image_path) plus the hints; `error` in place of the caption
    for an image that failed."""
    out = {"image_id": item.image_id}
    if item.url:
        out["url"] = item.url
    if error is None:
        out["caption"] = caption
    else:
        out["error"] = error
    out["image_path"] = item.image_path
    out["hints"] = item.hints.to_dict()
    return out


# ---- the run ------------------------------------------------------------------------------------------------------


def shard_path(out: Path, shard: int) -> Path:
    return out / SHARDS / f"{shard:05d}.jsonl"


def write_shard(out: Path, shard: int, records: list[dict], stats: dict) -> None:
    """Timings first, then the records: the record file's appearance (an atomic rename) marks the shard done."""
    write_atomic(out / SHARDS / f"{shard:05d}.json", json.dumps(stats))
    write_atomic(shard_path(out, shard), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def prepare(items: list[Item], image_root: str, out: Path, spec: EngineSpec) -> list[int]:
    """Check the items, write or check run.json and items.jsonl; the shards still to do."""
    remote = [item.image_id for item in items if not item.image_path]
    if remote:
        raise ValueError(f"{len(remote)} image(s) have a URL but no local file (e.g. {remote[0]!r}): download them "
                         "first (polyfocus densefusion download) and run on its manifest")
    if not items:
        raise ValueError("no images to caption")
    sources = [item.source() for item in items]
    run = {"spec": asdict(spec), "n_images": len(items), "image_root": os.path.abspath(image_root),
           "images_sha256": hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()}
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists():
        before = json.loads(run_file.read_text())
        changed = [k for k in run if before.get(k) != run[k]]
        if changed:
            raise ValueError(f"{out} holds a run with other {changed}: finish it with the same images and settings, "
                             "or use a new --out")
    else:
        write_atomic(out / "items.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sources))
        write_atomic(run_file, json.dumps(run, indent=1))
    for stale in (out / SHARDS).glob("*.tmp*"):  # a write cut short by a kill
        stale.unlink()
    n_shards = -(-len(items) // spec.shard_size)
    return [s for s in range(n_shards) if not shard_path(out, s).exists()]


def shard_items(items: list[Item], shard: int, size: int) -> list[Item]:
    return items[shard * size:(shard + 1) * size]


def run_engine(items: list[Item], image_root: str, out: str | os.PathLike, spec: EngineSpec, workers: int = 1,
               batch_size: int = 8, engine: str = "local", ray_address: str | None = None,
               ray_gpus_per_worker: float = 0, progress: bool = True) -> dict:
    """Caption every item not yet captioned under `out`, then merge the shards; returns the timings summary."""
    from tqdm.auto import tqdm

    out = Path(out)
    pending = prepare(items, image_root, out, spec)
    todo = sum(len(shard_items(items, s, spec.shard_size)) for s in pending)
    start = time.perf_counter()
    with tqdm(total=len(items), initial=len(items) - todo, unit="img", desc="densefusion", disable=not progress) as bar:
        if engine == "ray":
            from polyfocus.densefusion.ray_engine import run_shards_on_ray

            finished = run_shards_on_ray(items, pending, image_root, out, spec, workers, batch_size, ray_address,
                                         ray_gpus_per_worker)
        elif engine == "local":
            finished = run_shards_locally(items, pending, image_root, out, spec, workers, batch_size)
        else:
            raise ValueError(f"engine must be local or ray, got {engine!r}")
        for stats in finished:
            bar.update(stats["images"])
    wall = time.perf_counter() - start
    summary = merge(out, len(items), spec.shard_size)
    return {**summary, "this_run": {"images": todo, "wall_seconds": round(wall, 3),
                                    "images_per_second": round(todo / wall, 3) if todo else None}}


def run_shards_locally(items, pending, image_root, out, spec, workers, batch_size) -> Iterator[dict]:
    if not pending:  # nothing to do: load no model
        return
    if workers <= 1:
        worker = ShardWorker(spec, image_root, batch_size)
        for shard in pending:
            records, stats = worker.process(shard_items(items, shard, spec.shard_size))
            write_shard(out, shard, records, stats)
            yield stats
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # fresh processes: no forked torch or tokenizer threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(spec, image_root, batch_size, workers)) as pool:
        futures = [pool.submit(_process_shard, shard, [i.source() for i in shard_items(items, shard, spec.shard_size)],
                               str(out)) for shard in pending]
        for future in as_completed(futures):
            yield future.result()


_WORKER: ShardWorker | None = None


def _init_worker(spec: EngineSpec, image_root: str, batch_size: int, workers: int) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    _WORKER = ShardWorker(spec, image_root, batch_size)


def _process_shard(shard: int, sources: list[dict], out: str) -> dict:
    records, stats = _WORKER.process([Item(**s) for s in sources])
    write_shard(Path(out), shard, records, stats)
    return stats


def merge(out: Path, n_images: int, shard_size: int) -> dict:
    """captions.jsonl, failed.jsonl and timings.json from the shards (every shard must be done)."""
    captions, failed, seconds, images = [], [], defaultdict(float), 0
    for shard in range(-(-n_images // shard_size)):
        # split("\n"), not splitlines(): json.dumps(ensure_ascii=False) leaves U+2028 / U+0085 raw inside strings
        for line in shard_path(out, shard).read_text(encoding="utf-8").split("\n")[:-1]:
            (failed if "error" in json.loads(line) else captions).append(line + "\n")
        stats = json.loads((out / SHARDS / f"{shard:05d}.json").read_text())
        images += stats["images"]
        for stage, s in stats["seconds"].items():
            seconds[stage] += s
    write_atomic(out / "captions.jsonl", "".join(captions))
    write_atomic(out / "failed.jsonl", "".join(failed))
    total = sum(seconds.values())
    summary = {"images": images, "captioned": len(captions), "failed": len(failed),
               "seconds": {k: round(v, 3) for k, v in seconds.items()},
               "seconds_per_image": {k: round(v / max(images, 1), 5) for k, v in seconds.items()},
               "images_per_second_per_worker": round(images / total, 3) if total else None}
    write_atomic(out / "timings.json", json.dumps(summary, indent=1))
    return summary
