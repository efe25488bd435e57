"""`polyfocus demo` end to end at toy scale: every stage's output is where the next one and the user expect it."""

import json

import torch
import yaml
from transformers import AutoModel

from polyfocus.cli import main
from polyfocus.data.formats import load_samples
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scorer import ALL, evaluate
from polyfocus.train.args import parse_args


def test_demo_runs_both_stages_and_reports_what_it_measured(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--train-scenes", "8", "--test-scenes", "4", "--pretrain-steps", "2",
          "--finetune-steps", "2", "--tower-steps", "2", "--image-size", "56", "--families", "colour,shape,count", "--batch-size", "4", "--model-config", '{"hidden_size": 32}'])
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())

    # The recipes are real `polyfocus train` configs: stage 1 starts from the two backbone directories (LLaVA's
    # LLM + tower start), stage 2 from stage 1's output.
    stage1, stage2 = (yaml.safe_load((out / f"stage{i}.yaml").read_text()) for i in (1, 2))
    assert (stage1["model_name_or_path"], stage1["vision_tower"]) == (str(out / "llm"), str(out / "tower"))
    assert stage2["model_name_or_path"] == stage1["output_dir"] == str(out / "stage1")
    model_args, _, training_args = parse_args(str(out / "stage1.yaml"))
    assert training_args.max_steps == 2
    assert model_args.version == "plain" and parse_args(str(out / "stage2.yaml"))[0].version == "v1"
    assert json.loads((out / "stage2" / "trainer_state.json").read_text())["global_step"] == 2

    # The table's numbers are the scorer's on the saved model's answers.
    test = load_samples(out / "data" / "test.json")
    assert {s.extra["family"] for s in test} <= {"colour", "shape", "count"}
    pipe = Pipeline.from_pretrained(out / "stage2", device="cpu")
    # The pretrained tower is frozen in stage 1, as LLaVA's CLIP is, and tuned at its own rate in stage 2.
    tower = AutoModel.from_pretrained(out / "tower").state_dict()
    stage1_tower = Pipeline.from_pretrained(out / "stage1", device="cpu").model.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in stage1_tower.items())
    assert any(not torch.equal(v, tower[k]) for k, v in pipe.model.vision_tower.state_dict().items())
    assert parse_args(str(out / "stage2.yaml"))[2].mm_vision_tower_lr == 1e-4
    assert set(summary["tower_object_accuracy"]) == {"colour", "shape"}
    answers = pipe.generate([([str(out / "data" / p) for p in s.images], s.messages[:-1]) for s in test],
                            max_new_tokens=8)
    assert summary["accuracy"] == {f: r["accuracy"] for f, r in evaluate(test, answers).items()}
    assert set(summary["majority_baseline"]) == set(summary["accuracy"]) and ALL in summary["accuracy"]
    assert "majority baseline" in printed and "a fresh image" in printed and (out / "fresh.png").is_file()
    assert summary["timings_s"]["total_s"] > 0 and summary["peak_rss_mb"] > 0
