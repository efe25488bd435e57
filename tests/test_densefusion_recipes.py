"""DenseFusion's recipes (configs/densefusion) and training with dense captions: the three stages against the
reference's scripts, S2's as the same plus the fusion, the synthworld recipes as the demo's stages plus the engine's
captions, DenseFusion's jsonl as training data, the stages chained on tiny models, and the documented synthworld
chain (engine data -> caption engine -> captions -> stage 1) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from polyfocus.config import PolyfocusConfig
from polyfocus.train.args import parse_args
from polyfocus.train.freeze import _vision_filter, trainable_parts

from train_helpers import changed, train_recording, write_tiny_backbones  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "densefusion"
HARDWARE = ["--tf32", "false", "--use_cpu", "true", "--deepspeed", ""]
GPUS = 16  # the reference trains on 2 nodes x 8 A100

# scripts/densefusion/{prealign,pretrain,finetune}.sh (spec §7)
STAGES = {
    "prealign": {"lr": 1e-3, "global_batch": 256, "max_length": 2000, "version": "plain", "aspect": "square",
                 "parts": {"projector", "fusion"}, "vision_layers": 0, "grouped": False,
                 "start": "./checkpoints/vicuna-7b-v1.5", "data": "DenseFusion-1M.jsonl"},
    "pretrain": {"lr": 2e-5, "global_batch": 256, "max_length": 2100, "version": "plain", "aspect": "square",
                 "parts": {"projector", "fusion", "language_model"}, "vision_layers": 11, "grouped": False,
                 "start": "prealign", "data": "DenseFusion-1M.jsonl"},
    "finetune": {"lr": 2e-5, "global_batch": 128, "max_length": 2048, "version": "v1", "aspect": "pad",
                 "parts": {"projector", "fusion", "language_model"}, "vision_layers": 0, "grouped": True,
                 "start": "pretrain", "data": "llava_v1_5_mix665k.json"},
}
SYNTHWORLD = ("synthworld_engine.yaml", "synthworld_pretrain.yaml", "synthworld_finetune.yaml")


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_recipe_has_expectations():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert names == sorted([f"llava-{v}-7b-{s}.yaml" for v in ("1.5", "s2") for s in STAGES] + list(SYNTHWORLD))


@pytest.mark.parametrize("variant", ["1.5", "s2"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_recipe_matches_the_reference_script(variant, stage):
    want = STAGES[stage]
    model_args, data_args, args = parse_args(str(RECIPES / f"llava-{variant}-7b-{stage}.yaml"), HARDWARE)
    assert args.learning_rate == want["lr"] and args.model_max_length == want["max_length"]
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * GPUS == want["global_batch"]
    assert (model_args.version, data_args.image_aspect_ratio) == (want["version"], want["aspect"])
    assert args.group_by_modality_length is want["grouped"]
    assert trainable_parts(model_args.tune_mm_mlp_adapter, model_args.freeze_backbone,
                           model_args.freeze_mm_mlp_adapter) - {"visual_words"} == want["parts"]
    assert model_args.unfreeze_vision_layers == want["vision_layers"]
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay, args.num_train_epochs) == \
        ("cosine", 0.03, 0.0, 1)
    assert args.mm_vision_tower_lr is None and args.mm_projector_lr is None  # one rate for everything
    assert data_args.data_path[0].endswith(want["data"])
    values = raw(RECIPES / f"llava-{variant}-7b-{stage}.yaml")
    assert (values["bf16"], values["tf32"], values["deepspeed"]) == (True, True, "configs/deepspeed/zero3.json")
    start = want["start"]
    if start in STAGES:  # each stage starts from the previous one's output
        assert model_args.model_name_or_path == raw(RECIPES / f"llava-{variant}-7b-{start}.yaml")["output_dir"]
    else:
        assert model_args.model_name_or_path == start
    fusion = ("s2", [336, 672, 1008]) if variant == "s2" and stage == "prealign" else (None, None)
    assert (model_args.fusion, model_args.s2_scales) == fusion  # later stages inherit it from the checkpoint


def test_stage_2_trains_clip_layers_12_to_22():
    """The reference unlocks encoder layers 12-23 of CLIP-L; layer 23 gets no gradient (the feature is layer -2), so
    `unfreeze_vision_layers: 11` trains the same weights: layers 12-22, no embeddings, no pre-LN."""
    trains = _vision_filter(PolyfocusConfig(), 11)
    layers = [i for i in range(24) if trains(f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight")]
    assert layers == list(range(12, 23))
    assert not trains("vision_tower.vision_model.embeddings.patch_embedding.weight")
    assert not trains("vision_tower.vision_model.pre_layrnorm.weight")


def test_s2_recipes_are_the_low_res_ones_plus_s2():
    for stage in STAGES:
        ours, theirs = raw(RECIPES / f"llava-s2-7b-{stage}.yaml"), raw(RECIPES / f"llava-1.5-7b-{stage}.yaml")
        differing = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        extra = {"fusion", "s2_scales"} if stage == "prealign" else {"model_name_or_path"}
        assert differing == extra | {"output_dir", "run_name"}
        assert "llava-s2" in ours["output_dir"]
    config = PolyfocusConfig(fusion="s2", s2_scales=[336, 672, 1008])  # CLIP-L/336
    assert (config.image_input_size, config.mm_hidden_size, config.num_image_tokens) == (1008, 3072, 576)


def test_synthworld_recipes_are_the_demos_stages_on_the_engines_captions():
    import inspect

    from polyfocus.demo import default_recipe, run

    defaults = inspect.signature(run).parameters
    demo = default_recipe(Path("polyfocus_demo"), defaults["steps"].default, defaults["batch_size"].default)
    stage1 = {**demo["stage1"], "data_path": ["polyfocus_demo/densefusion/captions/captions.jsonl"],
              "image_folder": "polyfocus_demo/data", "output_dir": "polyfocus_demo/densefusion_stage1"}
    stage2 = {**demo["stage2"], "model_name_or_path": "polyfocus_demo/densefusion_stage1",
              "output_dir": "polyfocus_demo/densefusion_stage2"}
    assert raw(RECIPES / "synthworld_pretrain.yaml") == stage1
    assert raw(RECIPES / "synthworld_finetune.yaml") == stage2
    engine = raw(RECIPES / "synthworld_engine.yaml")
    assert (engine["model_name_or_path"], engine["vision_tower"]) == ("polyfocus_demo/llm", "polyfocus_demo/tower")
    assert engine["stage"] == "finetune" and engine["output_dir"] == "polyfocus_demo/densefusion/engine"
    for name in SYNTHWORLD:
        parse_args(str(RECIPES / name))


# ---- training on tiny models ------------------------------------------------------------------------------------

CPU = HARDWARE + ["--bf16", "false", "--report_to", "none", "--dataloader_num_workers", "0",
                  "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
                  "--save_strategy", "no", "--warmup_ratio", "0", "--plot_loss", "false",
                  "--gradient_checkpointing", "false"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny "Vicuna" and "CLIP" (28 px, 3 layers), DenseFusion-1M-style jsonl over synthworld images, and a
    LLaVA instruction file."""
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("df_train")
    write_tiny_backbones(root, 28)
    export(str(root / "images"), 6, image_size=84, families=["dense_caption"], split="pretrain")
    samples = json.loads((root / "images" / "pretrain.json").read_text())
    release = [{"image_id": s["id"], "url": f"https://example.com/{i}.png", "caption": s["conversations"][1]["value"],
                "image_path": s["image"]} for i, s in enumerate(samples)]
    (root / "DenseFusion-1M.jsonl").write_text("".join(json.dumps(r) + "\n" for r in release))
    export(str(root / "instruct"), 6, image_size=84, families=["colour", "shape"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["1.5", "s2"])
def test_three_stages_chained_on_tiny_models(backbones, tmp_path, monkeypatch, variant):
    """prealign (projector) -> pretrain (projector, LLM, the tower's top layer) -> finetune (projector, LLM), the
    first two reading DenseFusion-1M's jsonl as released, each stage from the previous one's output."""
    root = backbones
    s2 = ["--s2_scales", "28", "56"] if variant == "s2" else []  # the tiny tower's 28 px, and twice that
    data = ["--data_path", str(root / "DenseFusion-1M.jsonl"), "--image_folder", str(root / "images")]
    stage1 = train_recording(monkeypatch, RECIPES / f"llava-{variant}-7b-prealign.yaml", CPU + data + s2 + [
        "--model_name_or_path", str(root / "vicuna"), "--vision_tower", str(root / "clip"),
        "--output_dir", str(tmp_path / "stage1")])
    assert {k.split(".")[0] for k in changed(stage1)} == {"mm_projector"}
    assert len(stage1.train_dataset) == 6 and stage1.model.config.fusion == ("s2" if s2 else None)
    assert stage1.train_dataset.image_processor.image_size == (56 if s2 else 28)

    stage2 = train_recording(monkeypatch, RECIPES / f"llava-{variant}-7b-pretrain.yaml", CPU + data + [
        "--model_name_or_path", str(tmp_path / "stage1"), "--output_dir", str(tmp_path / "stage2"),
        "--unfreeze_vision_layers", "1"])  # the tiny tower's upper half: layer 1 of the 2 that feed layer -2
    moved = changed(stage2)
    assert {k.split(".")[0] for k in moved} == {"mm_projector", "language_model", "vision_tower"}
    tower = {k for k in moved if k.startswith("vision_tower.")}
    assert tower and all(".encoder.layers.1." in k for k in tower)

    stage3 = train_recording(monkeypatch, RECIPES / f"llava-{variant}-7b-finetune.yaml", CPU + [
        "--model_name_or_path", str(tmp_path / "stage2"), "--data_path", str(root / "instruct" / "train.json"),
        "--image_folder", str(root / "instruct"), "--output_dir", str(tmp_path / "stage3")])
    assert {k.split(".")[0] for k in changed(stage3)} == {"mm_projector", "language_model"}
    for key in tower:  # stage 3 starts from stage 2's tower
        assert torch.equal(stage3.initial[key], stage2.model.state_dict()[key])


@pytest.mark.slow
def test_documented_synthworld_chain_end_to_end(tmp_path, monkeypatch):
    """docs/densefusion.md's synthworld commands, through the CLI, on a few scenes and steps: engine training data,
    the caption engine, its captions of every image, stage 1 on them."""
    from polyfocus import demo
    from polyfocus.checkpoints import load_model
    from polyfocus.cli import main
    from polyfocus.data.formats import load_samples

    monkeypatch.chdir(tmp_path)
    out = Path("polyfocus_demo")
    demo.make_data(out, 12, 2, 56, 3, ["colour"], seed=0)
    demo.make_backbones(out, demo.demo_model_config(56, {"hidden_size": 32}), 0, 4, 3, seed=0)
    steps = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--bf16", "false", "--disable_tqdm", "true",
             "--mm_vision_select_layer", "-2"]  # the recipes read DINOv2's layer 6; this tiny tower has 3 layers

    main(["densefusion", "synthworld", "--data", "polyfocus_demo/data", "--out", "polyfocus_demo/densefusion"])
    shared = ["--images", "polyfocus_demo/densefusion/images.jsonl", "--image-root", "polyfocus_demo/data",
              "--experts", "synthworld,alt_text", "--no-progress"]
    main(["densefusion", "run", *shared, "--limit", "6", "--out", "polyfocus_demo/densefusion/meta",
          "--captioner", "file:polyfocus_demo/data/pretrain.json"])
    main(["densefusion", "export", "polyfocus_demo/densefusion/meta", "--format", "engine-sft",
          "--out", "polyfocus_demo/densefusion/engine_sft.json"])
    sft = load_samples("polyfocus_demo/densefusion/engine_sft.json")
    assert len(sft) == 6 and "[Detection Box]:\n- " in sft[0].messages[0]["content"]
    truth = {s.images[0]: s.messages[1]["content"] for s in load_samples("polyfocus_demo/data/pretrain.json")}
    assert all(s.messages[1]["content"] == truth[s.images[0]] for s in sft)  # the true captions as answers

    main(["train", str(RECIPES / "synthworld_engine.yaml"), *steps])
    main(["densefusion", "run", *shared, "--out", "polyfocus_demo/densefusion/captions",
          "--captioner", "local:polyfocus_demo/densefusion/engine", "--captioner-option", "max_new_tokens=8"])
    captions = [json.loads(line) for line in Path("polyfocus_demo/densefusion/captions/captions.jsonl").open()]
    failed = Path("polyfocus_demo/densefusion/captions/failed.jsonl").read_text().splitlines()
    assert len(captions) + len(failed) == 12  # an untrained engine may write nothing for an image: recorded

    main(["train", str(RECIPES / "synthworld_pretrain.yaml"), *steps])
    assert load_model("polyfocus_demo/densefusion_stage1").config.fusion is None
    assert json.loads(Path("polyfocus_demo/densefusion_stage1/trainer_state.json").read_text())["global_step"] == 2
