"""Science on synthworld: does a method beat the plain model at equal data and steps? One JSON line per comparison.

Every variant trains the demo's two stages (polyfocus/demo.py) from the same backbones and data, once per seed,
and is scored per task family on the same held-out scenes. The backbones and data are made once and shared, as
a CLIP checkpoint and a dataset are shared by the runs of a paper's ablation; a seed sets the LLM's and the new
modules' initialisation and the data order. The tower and its recipe are the demo's (`--tower`, default the frozen
DINOv2); the world is set by `--max-objects` and `--sizes` (docs/results.md's instrument: one object per scene).

    python bench/science.py --name mmfuser --variant baseline='{}' \
        --variant mmfuser='{"stage1": {"fusion": "mmfuser"}}' --seeds 0 1 2

A variant is a JSON mapping of recipe keys (any `polyfocus train` flag) added to both stages, or per stage under
"stage1" / "stage2"; its "strategy" key (default "plain") is how the model answers at evaluation, e.g. "dualfocus".
"{shared}" in a variant stands for the shared directory (data, tokenizer, towers), e.g. MG-LLaVA's ConvNeXt:

    python bench/science.py --name mg_llava --render-size 512 --hires-tower-steps 1500 --variant baseline='{}' \
        --variant hires='{"stage1": {"fusion": "convgate", "hires_tower": "{shared}/hires_tower"}}'

Every finished run is a line of <out>/runs.jsonl, and a run with the same recipe keys, seed and settings is never
repeated: rerun the same command to resume, and comparisons under one --out share their baseline runs; --report
tables the runs finished so far and trains nothing. The table (mean ± std over seeds, accuracy %, each column's
seeds, training wall, tokens and FLOPs) goes to stdout and <out>/<name>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from polyfocus import demo
from polyfocus.train.run import train

SCIENCE_LLM = "llama"  # the LLM every run of docs/results.md was trained with (the demo's was Llama then)
SCIENCE_PRETRAIN_STEPS = 500  # the stage 1 of every run of docs/results.md (the demo's was 500 steps then)


def model_config(args) -> dict:
    """The demo's model keywords at the instrument's image size, with the instrument's LLM."""
    return demo.demo_model_config(args.image_size, {"text": SCIENCE_LLM})


def shared_backbones(out: Path, args) -> None:
    """Data, tokenizer and the towers, made once for every run under `out`; backbones.json records which vision tower
    was used (DINOv2 falls back to the from-scratch one where it cannot be had), which decides the recipe. MG-LLaVA's
    ConvNeXt is added to the same directory when first asked for (hires_tower.json: its steps, stages, accuracy),
    so its comparisons share the world and the baseline runs of the others."""
    if not (out / "backbones.json").is_file():
        demo.make_data(out, args.train_scenes, args.test_scenes, args.image_size, args.max_objects,
                       demo.VQA_FAMILIES, seed=0, render_size=args.render_size, sizes=tuple(args.sizes.split(",")))
        used = demo.make_backbones(out, model_config(args), args.tower_steps, args.batch_size, args.max_objects, seed=0,
                                   tower=args.tower)
        (out / "backbones.json").write_text(json.dumps(used))  # last: it marks the directory as complete
    if not args.hires_tower_steps:
        return
    wanted = {"steps": args.hires_tower_steps, "stages": args.hires_stages}
    marker = out / "hires_tower.json"
    if marker.is_file():
        had = json.loads(marker.read_text())
        if {k: had[k] for k in wanted} != wanted:
            raise SystemExit(f"{out}/hires_tower was trained with {({k: had[k] for k in wanted})}, not {wanted}: "
                             "use another --out")
        return
    accuracy = demo.make_hires_tower(out, {**model_config(args), "hires_config": hires_config(args.hires_stages)},
                                     args.hires_tower_steps, args.batch_size, args.max_objects, seed=0)
    marker.write_text(json.dumps({**wanted, "accuracy": accuracy}))


def hires_config(stages: int) -> dict:
    """The demo's ConvNeXt with its first `stages` stages: its total stride, hence the high-resolution side, halves
    with each stage dropped (5: 512 px, 4: 256 px for the 112 px tower's 8 x 8 grid)."""
    return {"num_stages": stages, "depths": demo.DEMO_HIRES["depths"][:stages],
            "hidden_sizes": demo.DEMO_HIRES["hidden_sizes"][:stages]}


def recipe_for(shared: Path, run_dir: Path, variant: dict, seed: int, args) -> dict:
    backbones = json.loads((shared / "backbones.json").read_text())
    recipe = demo.default_recipe(run_dir, (args.pretrain_steps, args.finetune_steps), args.batch_size,
                                 frozen_tower=backbones["pretrained"], select_layer=demo.select_layer(args.tower))
    common = {k: v for k, v in variant.items() if k not in ("stage1", "stage2", "strategy")}
    for stage, stage_args in recipe.items():
        stage_args.update(tokenizer_name_or_path=str(shared / "tokenizer"), seed=seed, disable_tqdm=True,
                          data_path=[str(shared / "data" / Path(p).name) for p in stage_args["data_path"]])
        stage_args.update(common)
        stage_args.update(variant.get(stage, {}))
    recipe["stage1"].update(model_name_or_path=str(run_dir / "llm"), vision_tower=str(shared / "tower"))
    return recipe


def settings_of(args) -> dict:
    """What besides the variant and seed decides a run's result (the render size only when set; MG-LLaVA's ConvNeXt
    only for the variants that read it: `run_settings`)."""
    settings = {k: getattr(args, k) for k in ("tower", "pretrain_steps", "finetune_steps", "tower_steps",
                                              "train_scenes", "test_scenes", "image_size", "max_objects", "sizes",
                                              "batch_size")}
    # Since 2026-12-06 stage 1 captions stage 2's scenes (demo.make_data): runs made before, with stage 1 on scenes of
    # its own, lack the key and are neither reused nor tabled with these.
    settings["stage1_scenes"] = "train"
    return {**settings, **({"render_size": args.render_size} if args.render_size else {})}


def run_settings(settings: dict, variant: dict, args) -> dict:
    """A variant's settings: the ConvNeXt's steps and stages join them when the variant reads {shared}/hires_tower."""
    if "{shared}/hires_tower" not in json.dumps(variant):
        return settings
    if not args.hires_tower_steps:
        raise SystemExit("a variant reads {shared}/hires_tower: give --hires-tower-steps (e.g. 1500)")
    return {**settings, "hires_tower_steps": args.hires_tower_steps, "hires_stages": args.hires_stages}


def shared_dir(out: Path, settings: dict) -> Path:
    """e.g. shared/112-dinov2-s-2000-100-3-medium,large-s1train, or shared/112r512-scratch3000-2000-100-3-... with 512
    px scenes and the from-scratch tower (s1train: stage 1 on the training scenes, `settings_of`)."""
    size = f"{settings['image_size']}" + (f"r{settings['render_size']}" if "render_size" in settings else "")
    tower = Path(settings["tower"]).name + (f"{settings['tower_steps']}" if settings["tower"] == "scratch" else "")
    return out / "shared" / "-".join([size, tower, *(f"{settings[k]}" for k in ("train_scenes", "test_scenes",
                                                                                 "max_objects", "sizes")), "s1train"])


def with_shared(variant: dict, shared: Path) -> dict:
    """The variant with "{shared}" replaced by the shared directory."""
    return json.loads(json.dumps(variant).replace("{shared}", str(shared)))


def run_one(shared: Path, run_dir: Path, variant: dict, seed: int, args) -> dict:
    """Both stages of one variant and seed, then per-family accuracy on the held-out scenes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    demo.make_llm(run_dir, shared / "tokenizer", model_config(args), seed)
    t0 = time.perf_counter()
    feature_cache = None  # stage 1's, handed to stage 2 as the demo does (the same frozen tower, the same images)
    for stage, stage_args in recipe_for(shared, run_dir, variant, seed, args).items():
        config_file = run_dir / f"{stage}.yaml"
        config_file.write_text(yaml.safe_dump(stage_args, sort_keys=False))
        with contextlib.redirect_stdout(io.StringIO()):
            feature_cache = train(str(config_file), feature_cache=feature_cache).model.vision_feature_cache
    del feature_cache
    strategy = variant.get("strategy", "plain")
    _, results, _ = demo.evaluate_model(run_dir / "stage2", shared / "data", strategy=strategy)
    return {"accuracy": {f: r["accuracy"] for f, r in results.items()}, "train_s": round(time.perf_counter() - t0),
            **compute_of(run_dir)}


def compute_of(run_dir: Path) -> dict:
    """Both stages' training compute as transformers' Trainer counted it (its state, trainer_state.json): the
    non-padding tokens the model read, image tokens included, and the Trainer's FLOPs estimate (6 × the non-embedding
    parameters, frozen towers' included, × the input ids, padding included). {} where a stage did not record them:
    the run's accuracy is kept all the same."""
    states = [json.loads((run_dir / stage / "trainer_state.json").read_text()) for stage in ("stage1", "stage2")]
    if not all(s.get("num_input_tokens_seen") and s.get("total_flos") for s in states):
        return {}
    return {"tokens": sum(s["num_input_tokens_seen"] for s in states), "flos": sum(s["total_flos"] for s in states)}


def majority_baseline(data: Path) -> dict[str, float]:
    from polyfocus.data.formats import load_samples
    from polyfocus.synthworld.scorer import majority_baseline

    return majority_baseline(load_samples(data / "train.json"), load_samples(data / "test.json"))


def table(runs: list[dict], variants: list[str], baseline: dict[str, float]) -> str:
    """Family rows × variant columns, mean ± std (%) over seeds, next to the majority-answer baseline; then each
    column's seeds and compute."""
    columns = [[r for r in runs if r["variant"] == name] for name in variants]
    families = list(runs[0]["accuracy"])
    lines = ["| family | majority answer | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for family in families:
        cells = [f"{100 * baseline[family]:.1f}"]
        for column in columns:
            values = [100 * r["accuracy"][family] for r in column]
            if len(values) > 1:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
            else:  # one run has no spread: its value alone, not "± 0.0"
                cells.append(f"{values[0]:.1f}" if values else "–")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("| seeds | | " + " | ".join(", ".join(str(r["seed"]) for r in c) or "–" for c in columns) + " |")
    # compute per column; runs side by side on a shared machine: compare within one table
    walls = [[r["train_s"] for r in c] for c in columns]
    lines.append("| training wall, s (min–max) | | "
                 + " | ".join(f"{min(w)}–{max(w)}" if w else "–" for w in walls) + " |")
    for key, row, unit in (("tokens", "tokens read, millions", 1e6),
                           ("flos", "FLOPs (Trainer's estimate), 10^15", 1e15)):
        means = [[r[key] for r in c if key in r] for c in columns]
        lines.append(f"| {row} | | " + " | ".join(f"{statistics.mean(m) / unit:.2f}" if m else "–" for m in means)
                     + " |")
    return "\n".join(lines)


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, spec = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME=JSON, e.g. baseline='{{}}'")
    try:
        return name, json.loads(spec)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant {name}: not JSON ({e})") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the comparison, e.g. mmfuser")
    p.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME=JSON (repeat)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/science")
    p.add_argument("--pretrain-steps", type=int, default=SCIENCE_PRETRAIN_STEPS)
    p.add_argument("--finetune-steps", type=int, default=demo.DEFAULT_STEPS[1])
    p.add_argument("--tower", default=demo.DEFAULT_TOWER,
                   help="the vision tower, as `polyfocus demo --tower`: dinov2-s (default), scratch or a directory")
    p.add_argument("--tower-steps", type=int, default=demo.DEFAULT_TOWER_STEPS, help="the from-scratch tower's")
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--test-scenes", type=int, default=100)
    p.add_argument("--image-size", type=int, default=demo.DEFAULT_IMAGE_SIZE)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--sizes", default=",".join(demo.DEMO_SIZES),
                   help="the objects' size classes, comma-separated (default the demo's: medium,large)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--render-size", type=int, help="render the scenes at this size (default: --image-size)")
    p.add_argument("--hires-tower-steps", type=int, default=0, help="pretrain MG-LLaVA's ConvNeXt, {shared}/hires_tower")
    p.add_argument("--report", action="store_true", help="train nothing: the table of the runs already finished")
    p.add_argument("--hires-stages", type=int, default=len(demo.DEMO_HIRES["depths"]),
                   help="the ConvNeXt's stages (default 5: it sees 512 px; 4: 256 px)")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar per from_pretrained, dozens per run: the runs' lines are enough
    out = Path(args.out)
    settings = settings_of(args)
    shared = shared_dir(out, settings)
    shared_backbones(shared, args)
    log = out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    runs = []
    for seed in args.seeds:
        for name, variant in args.variant:
            key = {"spec": variant, "seed": seed, "settings": run_settings(settings, variant, args)}
            result = next((r for r in done if all(r.get(k) == v for k, v in key.items())), None)
            if result is None and args.report:  # the table of what has run, e.g. while the rest still runs
                continue
            if result is None:
                run_dir = out / "runs" / f"{args.name}-{name}-seed{seed}"
                result = {**key, **run_one(shared, run_dir, with_shared(variant, shared), seed, args)}
                with log.open("a") as f:  # one line per finished run: an interrupted comparison resumes here
                    f.write(json.dumps(result) + "\n")
                done.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
            runs.append({**result, "variant": name})
    names = [name for name, _ in args.variant]
    text = table(runs, names, majority_baseline(shared / "data"))
    (out / f"{args.name}.md").write_text(text + "\n")
    print(text)
    means = {name: statistics.mean(r["accuracy"]["all"] for r in runs if r["variant"] == name)
             for name in names if any(r["variant"] == name for r in runs)}
    print(json.dumps({"bench": "science", "name": args.name, "seeds": args.seeds,
                      "steps": [args.pretrain_steps, args.finetune_steps], "all_mean": means}))


if __name__ == "__main__":
    main()
