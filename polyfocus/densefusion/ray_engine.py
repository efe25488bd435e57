"""The engine on Ray Data (`polyfocus densefusion run --engine ray`): the same shards, spread over a Ray cluster.

One dataset row per pending shard; `map_batches` runs them on `workers` actors, each holding its own experts and
captioner (loaded once per actor, as a model server would), writing its shard files itself. The shard is the unit
of exactly-once, as in the local engine, so kill-and-resume works the same; the output directory must be storage
every node sees (NFS, a mounted bucket).

    ray start --head                  # or an existing cluster: --ray-address auto | ray://host:10001
    polyfocus densefusion run ... --engine ray --workers 16 [--ray-address auto] [--ray-gpus-per-worker 1]

Without an address a local Ray instance is started for the run (and stopped after it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from polyfocus.densefusion.engine import EngineSpec, ShardWorker, shard_items, write_shard
from polyfocus.experts import Item


class RayShardWorker:
    """A Ray Data actor: one ShardWorker; each row is a shard to process and write."""

    def __init__(self, spec: dict, image_root: str, out: str, batch_size: int):
        self.worker = ShardWorker(EngineSpec(**spec), image_root, batch_size)
        self.out = Path(out)

    def __call__(self, batch: dict) -> dict:
        stats = []
        for shard, sources in zip(batch["shard"], batch["items"]):
            records, shard_stats = self.worker.process([Item(**s) for s in json.loads(sources)])
            write_shard(self.out, int(shard), records, shard_stats)
            stats.append(json.dumps(shard_stats))
        return {"stats": stats}


def run_shards_on_ray(items: list[Item], pending: list[int], image_root: str, out: Path, spec: EngineSpec,
                      workers: int, batch_size: int, address: str | None = None,
                      gpus_per_worker: float = 0) -> Iterator[dict]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("--engine ray needs Ray Data: pip install 'polyfocus[ray]'") from e
    if not pending:
        return
    from dataclasses import asdict

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the engine draws its own
        rows = [{"shard": shard, "items": json.dumps([i.source() for i in shard_items(items, shard, spec.shard_size)])}
                for shard in pending]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            RayShardWorker, batch_size=1, concurrency=max(1, workers), num_gpus=gpus_per_worker,
            fn_constructor_kwargs={"spec": asdict(spec), "image_root": image_root, "out": str(out),
                                   "batch_size": batch_size})
        for row in dataset.iter_rows():
            yield json.loads(row["stats"])
    finally:
        if started_here:
            ray.shutdown()
