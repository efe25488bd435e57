"""How fast synthworld makes data, on one CPU core.

scenes_per_s: scene generation + rendering (the target is >= 100 at 384 px; no PNG encoding).
export_scenes_per_s: the whole export() -- rendering, every task family, PNG files, JSON.

    python bench/synth_speed.py [--n 500] [--size 384] [--export-n 100]

Prints one JSON line.
"""

import argparse
import json
import os
import tempfile
import time

from polyfocus.synthworld.scenes import export, make_scene, render

TARGET_SCENES_PER_S = 100


def pin_to_one_core():
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def scenes_per_second(n: int, size: int) -> float:
    for i in range(10):  # warm up: font cache, first allocations
        render(make_scene(i, image_size=size))
    start = time.perf_counter()
    for i in range(n):
        render(make_scene(i, image_size=size))
    return n / (time.perf_counter() - start)


def export_scenes_per_second(n: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        export(out_dir, n=n, seed=0, image_size=size)
        return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--export-n", type=int, default=100)
    args = parser.parse_args()

    pin_to_one_core()
    rate = scenes_per_second(args.n, args.size)
    export_rate = export_scenes_per_second(args.export_n, args.size)
    print(json.dumps({
        "bench": "synth_speed", "image_size": args.size, "n": args.n,
        "scenes_per_s": round(rate, 1), "export_n": args.export_n,
        "export_scenes_per_s": round(export_rate, 1),
        "target_scenes_per_s": TARGET_SCENES_PER_S, "ok": rate >= TARGET_SCENES_PER_S,
    }))


if __name__ == "__main__":
    main()
