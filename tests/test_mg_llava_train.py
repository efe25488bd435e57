"""MG-LLaVA training (spec mg_llava.md §8): the recipes (configs/mg_llava: Vicuna-7B's two stages, synthworld's
variants), both stages run on tiny models (what trains, at which rate, the frozen towers), the demo switch, and the
synthworld ConvNeXt pretraining.
"""

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_mg_llava import TINY_HIRES, convnext_to_open_clip
from train_helpers import changed as changed_tensors
from train_helpers import train_recording, write_tiny_backbones

from polyfocus.train.args import parse_args
from polyfocus.train.freeze import trainable_parts

REPO = Path(__file__).resolve().parents[1]
MG = REPO / "configs" / "mg_llava"
HARDWARE = ["--tf32", "false", "--use_cpu", "true", "--deepspeed", ""]
NUM_GPUS = 8


def raw(path):
    return yaml.safe_load(path.read_text())


def test_every_recipe_is_here():
    assert sorted(p.name for p in MG.glob("*.yaml")) == sorted([
        "vicuna-7b-pretrain.yaml", "vicuna-7b-finetune.yaml", "synthworld_hires_pretrain.yaml",
        "synthworld_hires_finetune.yaml", "synthworld_objects_pretrain.yaml", "synthworld_objects_finetune.yaml"])


def test_vicuna_7b_recipes_are_the_references():
    """Stage 1: Conv-Gate + projector + object projector at 1e-3, LLM and towers frozen, global batch 256; stage 2:
    + the LLM at 2e-5, batch 256; both: one epoch, wd 0, clip 1.0, 3 % warm-up + cosine, seed 2024, padded images,
    boxes from MG-LLaVA's box JSON (per category, 100, IoU 0.2), 56x56 RoI bins."""
    model_args, data_args, args = parse_args(str(MG / "vicuna-7b-pretrain.yaml"), HARDWARE)
    assert (model_args.fusion, model_args.object_tokens, model_args.box_feat_size) == ("convgate", True, 56)
    assert (model_args.box_iou_threshold, model_args.box_limit_mode, model_args.box_limit_num) == \
        (0.2, "per_category", 100)
    assert model_args.hires_tower.endswith("CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup")
    assert (model_args.mm_vision_select_layer, model_args.mm_vision_select_feature, model_args.mm_projector_type) == \
        (-2, "patch", "mlp2x_gelu")
    assert trainable_parts(model_args.tune_mm_mlp_adapter, model_args.freeze_backbone,
                           model_args.freeze_mm_mlp_adapter) - {"visual_words"} == {"projector", "fusion"}
    assert not model_args.tune_hires_tower and model_args.unfreeze_vision_layers == 0
    assert (args.learning_rate, args.mm_fusion_lr, args.mm_projector_lr) == (1e-3, None, None)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * NUM_GPUS == 256
    stage1 = (data_args, args)

    model_args, data_args, args = parse_args(str(MG / "vicuna-7b-finetune.yaml"), HARDWARE)
    assert model_args.model_name_or_path == raw(MG / "vicuna-7b-pretrain.yaml")["output_dir"]
    assert model_args.fusion is None and model_args.object_tokens is None  # the checkpoint carries them
    assert trainable_parts(model_args.tune_mm_mlp_adapter, model_args.freeze_backbone,
                           model_args.freeze_mm_mlp_adapter) - {"visual_words"} == {"projector", "fusion",
                                                                                      "language_model"}
    assert args.learning_rate == 2e-5 and args.group_by_modality_length
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * NUM_GPUS == 256
    for data_args, args in (stage1, (data_args, args)):
        assert (args.num_train_epochs, args.weight_decay, args.max_grad_norm, args.seed) == (1, 0.0, 1.0, 2024)
        assert (args.warmup_steps, args.lr_scheduler_type.value, args.adam_beta1, args.adam_beta2) == \
            (0.03, "cosine", 0.9, 0.999)
        assert (data_args.image_aspect_ratio, len(data_args.box_json_path)) == ("pad", 1)
        assert args.gradient_checkpointing and args.bf16


@pytest.mark.parametrize("variant,extra", [
    ("hires", {"fusion": "convgate", "hires_tower": "polyfocus_demo/hires_tower"}),
    ("objects", {"fusion": "convgate", "hires_tower": "polyfocus_demo/hires_tower", "object_tokens": True,
                 "box_detector": "synthworld"}),
])
def test_synthworld_recipes_are_the_demos_plus_the_branch(variant, extra):
    """Same data, steps, batch and rates as `polyfocus demo`'s recipes (the plain baseline); only the branch's keys
    (stage 1, which builds the model) and the output directories differ."""
    from polyfocus.demo import default_recipe, run

    defaults = inspect.signature(run).parameters
    demo = default_recipe(Path("polyfocus_demo"), defaults["steps"].default, defaults["batch_size"].default)
    assert raw(MG / f"synthworld_{variant}_pretrain.yaml") == {
        **demo["stage1"], "output_dir": f"polyfocus_demo/mg_{variant}_stage1", **extra}
    assert raw(MG / f"synthworld_{variant}_finetune.yaml") == {
        **demo["stage2"], "model_name_or_path": f"polyfocus_demo/mg_{variant}_stage1",
        "output_dir": f"polyfocus_demo/mg_{variant}_stage2"}
    for stage in ("pretrain", "finetune"):
        parse_args(str(MG / f"synthworld_{variant}_{stage}.yaml"))


# ---- both stages on tiny models ------------------------------------------------------------------------------------

CPU = ["--tf32", "false", "--bf16", "false", "--deepspeed", "", "--report_to", "none", "--dataloader_num_workers", "0",
       "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "no", "--warmup_ratio", "0",
       "--plot_loss", "false", "--gradient_checkpointing", "false"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tiny "Vicuna", "CLIP" (56 px, 4x4 patches) and open_clip "ConvNeXt" weights; synthworld rendered at 128 px (the
    ConvNeXt's size) with MG-LLaVA box JSONs from the scenes' exact boxes."""
    from transformers import ConvNextConfig, ConvNextModel

    from polyfocus.cli import main
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("mg_train")
    write_tiny_backbones(root, 56)
    (root / "convnext").mkdir()
    torch.save(convnext_to_open_clip(ConvNextModel(ConvNextConfig(**TINY_HIRES))),
               root / "convnext" / "open_clip_pytorch_model.bin")
    export(str(root / "data"), 6, image_size=128, families=["dense_caption"], split="pretrain")
    export(str(root / "data"), 6, image_size=128, families=["colour", "count"])
    for split in ("pretrain", "train"):
        main(["boxes", str(root / "data" / f"{split}.json"), "--scenes", str(root / "data" / "scenes.jsonl"),
              "--out", str(root / "data" / f"{split}_boxes.json")])
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        yield root


def changed(trainer) -> set[str]:
    """The top-level modules a `train_recording` run moved."""
    return {k.split(".")[0] for k in changed_tensors(trainer)}


def lrs(trainer) -> set[float]:
    return {g["initial_lr"] for g in trainer.optimizer.param_groups}


def test_vicuna_recipes_train_the_right_parts_at_the_right_rates(backbones, monkeypatch):
    """configs/mg_llava/vicuna-7b-*.yaml on tiny models, only paths, sizes and hardware overridden: stage 1 builds
    the model from the three backbone directories, with boxes from the box JSON, and moves only the Conv-Gate and the
    two projectors (at 1e-3); stage 2 adds the LLM (2e-5); CLIP and the ConvNeXt never move. Then the model answers
    through the pipeline, its images' boxes from its detector."""
    from polyfocus.infer.pipeline import Pipeline

    stage1 = train_recording(monkeypatch, MG / "vicuna-7b-pretrain.yaml", CPU + [
        "--model_name_or_path", "vicuna", "--vision_tower", "clip", "--hires_tower", "convnext",
        "--data_path", "data/pretrain.json", "--box_json_path", "data/pretrain_boxes.json", "--image_folder", "data",
        "--output_dir", "stage1"])
    config = stage1.model.config
    assert (config.fusion, config.object_tokens, config.hires_image_size, config.hires_config.hidden_sizes) == \
        ("convgate", True, 128, [8, 16, 24, 32])
    assert changed(stage1) == {"mm_fusion", "mm_projector", "mm_object_projector"} and lrs(stage1) == {1e-3}
    assert not stage1.initial["mm_fusion.slow_proj.weight"].any()  # starts as the plain model

    stage2 = train_recording(monkeypatch, MG / "vicuna-7b-finetune.yaml", CPU + [
        "--model_name_or_path", "stage1", "--data_path", "data/train.json", "--box_json_path",
        "data/train_boxes.json", "--image_folder", "data", "--output_dir", "stage2", "--box_detector", "synthworld"])
    assert changed(stage2) == {"mm_fusion", "mm_projector", "mm_object_projector", "language_model"}
    assert lrs(stage2) == {2e-5}

    pipe = Pipeline.from_pretrained("stage2", template="v1")
    assert (pipe.image_processor.image_size, pipe.model.config.box_detector) == (128, "synthworld")
    answer = pipe.generate([(["data/images/train_000000.png"], "What colour is it?")], max_new_tokens=3)
    assert isinstance(answer[0], str)


def test_box_settings_and_the_tower_need_the_branch(backbones, tmp_path):
    from polyfocus.train import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "vicuna", "vision_tower": "clip", "box_limit_num": 3,
                                      "tokenizer_name_or_path": "vicuna", "output_dir": str(tmp_path / "o")}))
    model_args, data_args, training_args = parse_args(str(recipe), ["--use_cpu", "true"])
    with pytest.raises(ValueError, match="box_limit_num set, but the model has no object tokens"):
        run.build_model(model_args, data_args, training_args, run.load_tokenizer(model_args))
    model_args, data_args, training_args = parse_args(str(recipe), ["--use_cpu", "true", "--box_limit_num", "100",
                                                                    "--hires_tower", "convnext"])
    with pytest.raises(ValueError, match="nothing uses it"):
        run.build_model(model_args, data_args, training_args, run.load_tokenizer(model_args))


def test_object_tokens_without_boxes_are_refused(backbones, tmp_path):
    with pytest.raises(ValueError, match="give boxes .*box_json_path.* or a detector"):
        from polyfocus.train.run import train

        train(str(MG / "vicuna-7b-pretrain.yaml"), CPU + [
            "--model_name_or_path", "vicuna", "--vision_tower", "clip", "--hires_tower", "convnext",
            "--data_path", "data/pretrain.json", "--box_json_path", "", "--image_folder", "data",
            "--output_dir", str(tmp_path / "o")])


def test_tune_hires_tower_trains_the_convnext_at_its_own_rate(backbones, monkeypatch, tmp_path):
    stage = train_recording(monkeypatch, MG / "synthworld_objects_pretrain.yaml", CPU + [
        "--model_name_or_path", "vicuna", "--tokenizer_name_or_path", "vicuna", "--vision_tower", "clip",
        "--hires_tower", "convnext", "--data_path", "data/pretrain.json", "--image_folder", "data",
        "--output_dir", str(tmp_path / "s1"), "--tune_hires_tower", "true", "--mm_hires_tower_lr", "1e-4",
        "--mm_vision_select_layer", "-2", "--cache_vision_features", "false"])  # a 3-layer CLIP, not DINOv2
    assert "hires_tower" in changed(stage) and lrs(stage) == {2e-3, 1e-4}
    assert stage.model.config.box_detector == "synthworld"


def test_demo_switches_the_branch_on(tmp_path, monkeypatch):
    """`polyfocus demo --model-config '{"fusion": "convgate", "object_tokens": true}' --render-size 112`: the data is
    rendered at that size, a ConvNeXt is made for the model's resolution, and stage 1's recipe names it, with the
    object tokens and synthworld's detector (training and evaluation stubbed out)."""
    from polyfocus import demo
    from polyfocus.train import run

    seen = []
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[], global_step=1),  # what the stage line reads
                              model=SimpleNamespace(vision_feature_cache=None))  # and what the next stage is handed
    monkeypatch.setattr(run, "train", lambda config, overrides=(), feature_cache=None: seen.append(config) or trainer)
    monkeypatch.setattr(demo, "evaluate_model", lambda *a, **k: ("", {}, {}))
    monkeypatch.setattr(demo, "ask_fresh_image", lambda *a, **k: "")
    demo.run(str(tmp_path / "demo"), train_scenes=2, test_scenes=1, steps=(1, 1), image_size=56, batch_size=2,
             model_config={"hidden_size": 32, "fusion": "convgate", "object_tokens": True}, tower_steps=0,
             hires_tower_steps=0, render_size=112, tower="scratch")
    stage1 = yaml.safe_load((tmp_path / "demo" / "stage1.yaml").read_text())
    assert (stage1["fusion"], stage1["object_tokens"], stage1["box_detector"]) == ("convgate", True, "synthworld")
    assert stage1["hires_tower"] == str(tmp_path / "demo" / "hires_tower")
    from PIL import Image

    assert Image.open(next((tmp_path / "demo" / "data" / "images").glob("*.png"))).size == (112, 112)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "demo" / "hires_tower").hidden_sizes == [16, 32, 64, 128, 256]


def test_hires_tower_pretraining_saves_a_loadable_convnext(tmp_path):
    """A few steps of polyfocus/synthworld/hires_tower.py: the saved tower loads as MG-LLaVA's; accuracies per head."""
    from transformers import ConvNextConfig

    from polyfocus.checkpoints.convnext import load_hires_tower
    from polyfocus.synthworld.hires_tower import SceneBoxes, pretrain_hires_tower

    item = SceneBoxes(1, 64)[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["boxes"].shape[1] == 4
    accuracy = pretrain_hires_tower(ConvNextConfig(**TINY_HIRES), tmp_path / "t", 64, steps=2, batch_size=2,
                                    test_scenes=4)
    assert {"colour", "shape"} <= set(accuracy) <= {"colour", "shape", "char"}
    assert load_hires_tower(tmp_path / "t").config.hidden_sizes == TINY_HIRES["hidden_sizes"]
