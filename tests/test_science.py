"""bench/science.py: runs are reused across comparisons and resumed, and the table is the mean ± std over seeds."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bench_helpers import load_bench_script


@pytest.fixture
def science(monkeypatch):
    module = load_bench_script("science")
    calls = []

    def fake_run(shared, run_dir, variant, seed, args):  # accuracy decided by the variant and seed alone
        calls.append((json.dumps(variant), seed))
        colour = 0.5 + 0.1 * seed + (0.2 if variant else 0.0)
        return {"accuracy": {"colour": colour, "all": colour / 2}, "train_s": 100 + seed + (50 if variant else 0),
                "tokens": 1_000_000 * (1 + seed), "flos": 2e15 * (2 if variant else 1)}

    monkeypatch.setattr(module, "shared_backbones", lambda shared, args: None)
    monkeypatch.setattr(module, "run_one", fake_run)
    monkeypatch.setattr(module, "majority_baseline", lambda data: {"colour": 0.25, "all": 0.5})
    return module, calls


def test_table_is_mean_and_std_over_seeds(science, tmp_path, capsys):
    module, calls = science
    module.main(["--name", "m", "--out", str(tmp_path), "--seeds", "0", "1", "2",
                 "--variant", "baseline={}", "--variant", 'new={"stage1": {"fusion": "mmfuser"}}'])
    assert len(calls) == 6
    table = (tmp_path / "m.md").read_text()
    # baseline colour: 50, 60, 70 → 60.0 ± 10.0; new: 70, 80, 90 → 80.0 ± 10.0
    assert "| colour | 25.0 | 60.0 ± 10.0 | 80.0 ± 10.0 |" in table
    assert "| training wall, s (min–max) | | 100–102 | 150–152 |" in table
    assert "| tokens read, millions | | 2.00 | 2.00 |" in table  # 1, 2, 3 M over the seeds
    assert "| FLOPs (Trainer's estimate), 10^15 | | 2.00 | 4.00 |" in table
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["all_mean"] == pytest.approx({"baseline": 0.3, "new": 0.4})


def test_finished_runs_are_reused_by_later_comparisons_and_resumes(science, tmp_path):
    module, calls = science
    module.main(["--name", "a", "--out", str(tmp_path), "--seeds", "0", "1", "--variant", "baseline={}"])
    module.main(["--name", "b", "--out", str(tmp_path), "--seeds", "0", "1", "2", "--variant", "plain={}",
                 "--variant", 'vw={"visual_words": true}'])
    # the baseline of seeds 0 and 1 (under another name) is reused; only seed 2 and the new variant run
    assert calls == [("{}", 0), ("{}", 1), ('{"visual_words": true}', 0), ('{"visual_words": true}', 1),
                     ("{}", 2), ('{"visual_words": true}', 2)]
    module.main(["--name", "a", "--out", str(tmp_path), "--seeds", "0", "1", "--variant", "baseline={}",
                 "--finetune-steps", "7"])  # other settings: not the same runs
    assert calls[-2:] == [("{}", 0), ("{}", 1)]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8


def test_report_tables_the_finished_runs_and_trains_nothing(science, tmp_path):
    module, calls = science
    module.main(["--name", "a", "--out", str(tmp_path), "--seeds", "0", "1", "--variant", "baseline={}"])
    module.main(["--name", "a", "--out", str(tmp_path), "--seeds", "0", "1", "2", "--variant", "baseline={}",
                 "--variant", 'new={"visual_words": true}', "--report"])
    assert len(calls) == 2  # nothing more trained
    table = (tmp_path / "a.md").read_text()
    assert "| colour | 25.0 | 55.0 ± 7.1 | – |" in table and "| seeds | | 0, 1 | – |" in table
    module.main(["--name", "b", "--out", str(tmp_path), "--seeds", "0", "--variant", "baseline={}", "--report"])
    assert "| colour | 25.0 | 50.0 |" in (tmp_path / "b.md").read_text()  # one run: no "± 0.0"


def test_strategy_is_how_the_variant_answers_not_a_recipe_key(tmp_path, monkeypatch):
    module = load_bench_script("science")
    trained, scored = [], []
    monkeypatch.setattr(module.demo, "make_llm", lambda *a: None)
    monkeypatch.setattr(module, "train", lambda config, feature_cache: trained.append(Path(config).read_text())
                        or SimpleNamespace(model=SimpleNamespace(vision_feature_cache=None)))
    monkeypatch.setattr(module, "compute_of", lambda run_dir: {})  # no trainer_state.json without training
    monkeypatch.setattr(module.demo, "evaluate_model",
                        lambda model, data, strategy: scored.append(strategy) or ("", {"all": {"accuracy": 1}}, {}))
    args = module.argparse.Namespace(pretrain_steps=1, finetune_steps=1, batch_size=2, image_size=112, tower="scratch")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "backbones.json").write_text(json.dumps({"pretrained": False}))
    variant = {"strategy": "dualfocus", "stage2": {"data_path": ["/d/train.json", "/d/dualfocus_train.json"]}}
    module.run_one(tmp_path / "shared", tmp_path / "run", variant, 0, args)
    assert scored == ["dualfocus"]
    assert not any(yaml.safe_load(text).get("strategy") for text in trained)
    assert "/d/dualfocus_train.json" in trained[1] and "/d/dualfocus_train.json" not in trained[0]
    module.run_one(tmp_path / "shared", tmp_path / "run", {}, 0, args)
    assert scored == ["dualfocus", "plain"]


def test_shared_directory_names_its_settings_and_fills_variants(science, tmp_path):
    module, calls = science
    module.main(["--name", "mg", "--out", str(tmp_path), "--seeds", "0", "--render-size", "512",
                 "--hires-tower-steps", "1500", "--variant", "baseline={}",
                 "--variant", 'hires={"stage1": {"hires_tower": "{shared}/hires_tower"}}'])
    shared = tmp_path / "shared" / "112r512-dinov2-s-2000-100-3-medium,large-s1train"
    assert calls == [("{}", 0), (json.dumps({"stage1": {"hires_tower": f"{shared}/hires_tower"}}), 0)]
    baseline, hires = map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())
    assert hires["spec"] == {"stage1": {"hires_tower": "{shared}/hires_tower"}}  # the key stays free of the path
    assert hires["settings"]["render_size"] == 512
    assert (hires["settings"]["hires_tower_steps"], hires["settings"]["hires_stages"]) == (1500, 5)
    assert "hires_tower_steps" not in baseline["settings"]  # the ConvNeXt is not part of the plain model's run
    module.main(["--name", "plain", "--out", str(tmp_path), "--seeds", "0", "--render-size", "512",
                 "--variant", "baseline={}"])
    assert len(calls) == 2  # the same world without the ConvNeXt: the baseline run is reused
    module.main(["--name", "plain", "--out", str(tmp_path), "--seeds", "0", "--variant", "baseline={}"])
    assert "render_size" not in json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[2])["settings"]
    with pytest.raises(SystemExit, match="give --hires-tower-steps"):
        module.main(["--name", "mg", "--out", str(tmp_path), "--seeds", "0", "--render-size", "512",
                     "--variant", 'hires={"stage1": {"hires_tower": "{shared}/hires_tower"}}'])


def test_a_shared_convnext_of_other_settings_is_refused(tmp_path, monkeypatch):
    """The ConvNeXt is added to a finished shared directory once; asking for another one there is an error, not a
    silent reuse."""
    module = load_bench_script("science")
    made = []
    monkeypatch.setattr(module.demo, "make_hires_tower", lambda out, config, steps, *a, **k: made.append(
        (steps, config["hires_config"]["hidden_sizes"])) or {"shape": 0.9})
    (tmp_path / "backbones.json").write_text(json.dumps({"pretrained": True}))
    args = module.argparse.Namespace(image_size=112, hires_tower_steps=1500, hires_stages=4, batch_size=16,
                                     max_objects=1)
    module.shared_backbones(tmp_path, args)
    module.shared_backbones(tmp_path, args)
    assert made == [(1500, [16, 32, 64, 128])]  # made once, with the first 4 stages of the demo's ConvNeXt
    assert json.loads((tmp_path / "hires_tower.json").read_text()) == {"steps": 1500, "stages": 4,
                                                                         "accuracy": {"shape": 0.9}}
    args.hires_stages = 5
    with pytest.raises(SystemExit, match="trained with .*'stages': 4"):
        module.shared_backbones(tmp_path, args)


@pytest.mark.parametrize("pretrained", [True, False])
def test_recipe_follows_the_tower_the_shared_directory_got(tmp_path, pretrained):
    """As the demo's: DINOv2 frozen, cut after layer 6, standardised and cached; where it could not be had (the
    from-scratch fallback), the tower tuned in stage 2 and read at its config's layer."""
    module = load_bench_script("science")
    (tmp_path / "backbones.json").write_text(json.dumps({"pretrained": pretrained}))
    args = module.argparse.Namespace(pretrain_steps=5, finetune_steps=7, batch_size=2, tower="dinov2-s")
    recipe = module.recipe_for(tmp_path, tmp_path / "run", {}, 3, args)
    stage1, stage2 = recipe["stage1"], recipe["stage2"]
    assert (stage1["max_steps"], stage2["max_steps"], stage1["seed"], stage2["seed"]) == (5, 7, 3, 3)
    assert stage1["vision_tower"] == str(tmp_path / "tower")
    if pretrained:
        assert stage1["mm_vision_select_layer"] == 6 and stage1["truncate_vision_tower"]
        assert stage1["mm_standardize_features"] and stage2["cache_vision_features"]
        assert "unfreeze_vision_layers" not in stage2
    else:
        assert "mm_vision_select_layer" not in stage1 and "truncate_vision_tower" not in stage1
        assert stage2["unfreeze_vision_layers"] == -1


def test_compute_is_both_stages_trainer_counts(tmp_path):
    module = load_bench_script("science")
    for stage, tokens, flos in (("stage1", 750, 5.0e13), ("stage2", 3236, 2.0e14)):
        (tmp_path / stage).mkdir()
        state = {"global_step": 2, "num_input_tokens_seen": tokens, "total_flos": flos, "log_history": []}
        (tmp_path / stage / "trainer_state.json").write_text(json.dumps(state))
    assert module.compute_of(tmp_path) == {"tokens": 3986, "flos": 2.5e14}
    (tmp_path / "stage2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    assert module.compute_of(tmp_path) == {}  # not recorded: no row value, and the run is not lost
