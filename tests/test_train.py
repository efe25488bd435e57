"""Training stack (polyfocus.train): what trains per stage, exact resume after SIGKILL, atomic checkpoints,
DDP equals one process, argument parsing, the output directory as a loadable model, and packed runs (equal to
unpacked ones, with LoRA and gradient accumulation, over DDP, resumed after SIGKILL).

All runs use a tiny random model (LM hidden 32, 28 px images: 4 image tokens) on a few synthworld samples plus
hand-written text-only ones, on the CPU. The uninterrupted finetune run is shared (module fixture): it is the
reference of the resume, atomic-checkpoint and DDP tests and the output directory checked by the last tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from polyfocus.checkpoints import load_model
from polyfocus.data.formats import DataError
from polyfocus.data.templates import get_template
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.synthworld.scenes import export
from polyfocus.train import run
from polyfocus.train.args import parse_args
from polyfocus.train.trainer import STAGING

from train_helpers import trainer_with  # noqa: E402

HELPER = Path(__file__).parent / "train_helpers.py"
REPO = Path(__file__).resolve().parents[1]
# Subprocesses: one thread per process, as in this process (see `ws`), so that numerics match bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

# Text-only records of clearly different lengths (the DDP test needs ranks with different token counts).
TEXT_ONLY = [
    ("Say hello.", "Hello."),
    ("Name a colour.", "Red."),
    ("What is a square?", "A shape with four equal sides and four right angles."),
    ("Count to five.", "One, two, three, four, five."),
    ("Describe a circle in one long sentence.",
     "A circle is the round shape made of all the points that lie at the same distance from its centre, "
     "like a wheel or a coin seen from above."),
    ("Is the sky blue?", "Yes, on a clear day the sky looks blue."),
    ("What is two plus two?", "Four."),
    ("Write a short list of shapes.", "Square, circle, triangle, star, hexagon and a small diamond."),
]

COMMON = {
    "tokenizer_name_or_path": "tok",
    "model_config": {"hidden_size": 32, "image_size": 28},
    "report_to": "none",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    "plot_loss": False,
    "seed": 7,
}


def write_yaml(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump({**COMMON, **values}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Working directory: tokenizer `tok`, images.json (16 image samples), mixed.json (+8 text-only, different
    lengths). Paths in the configs are relative to it, so the tests chdir there."""
    root = tmp_path_factory.mktemp("train")
    build_tokenizer(save_dir=root / "tok")
    export(str(root / "data"), 10, seed=3, image_size=56, families=["colour", "shape"])
    records = json.loads((root / "data" / "train.json").read_text())
    keep = ("id", "image", "conversations")
    images = [{k: r[k] for k in keep} for r in records][:16]
    assert len(images) == 16
    text = [{"id": f"text_{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(TEXT_ONLY)]
    (root / "data" / "images.json").write_text(json.dumps(images))
    (root / "data" / "mixed.json").write_text(json.dumps(images[:8] + text + images[8:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to busy neighbours (subprocesses: ENV)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        yield root
    torch.set_num_threads(threads)


def finetune_yaml(ws: Path) -> Path:
    """Mixed modalities, group_by_modality_length (the finetune preset), 24 samples = 6 steps of 4: one epoch."""
    return write_yaml(ws / "ft.yaml", stage="finetune", data_path="data/mixed.json", per_device_train_batch_size=4,
                      max_steps=6, save_steps=2, learning_rate=1.0e-3)


def pretrain_yaml(ws: Path) -> Path:
    """Projector only (trainable-only checkpoints), default random sampler, 16 samples = 4 steps per epoch:
    the run crosses an epoch boundary at the checkpoint it resumes from."""
    return write_yaml(ws / "pt.yaml", stage="pretrain", data_path="data/images.json", per_device_train_batch_size=4,
                      max_steps=6, save_steps=2)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if atol == 0.0:
            assert torch.equal(got[key], want[key]), f"{key}: max diff {(got[key] - want[key]).abs().max()}"
        else:
            torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def train_recording(monkeypatch, config, overrides):
    """run.train with a trainer that remembers the model's state dict from before training (`.initial`)."""

    def remember(trainer):
        trainer.initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    monkeypatch.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, on_init=remember))
    return run.train(str(config), overrides)


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def train_counting(monkeypatch, config, overrides) -> tuple:
    """run.train, and the optimizer steps this call ran itself (a resumed run starts after its checkpoint)."""
    counter = StepCounter()
    with monkeypatch.context() as m:
        m.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, [counter]))
        return run.train(str(config), overrides), counter.steps


def run_killed(jobs: list[dict]) -> None:
    """Each job trains in a forked child of one helper process and SIGKILLs itself at `kill_at_step`."""
    proc = subprocess.run([sys.executable, str(HELPER), json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [-9] * len(jobs), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(ws):
    """The uninterrupted finetune run (6 steps, checkpoints every 2), with loss.png: (trainer, output dir)."""
    trainer = run.train(str(finetune_yaml(ws)), ["--output_dir", "ref_ft", "--plot_loss", "true"])
    return trainer, ws / "ref_ft"


# ---- 1. what trains ---------------------------------------------------------------------------------------------


def changed_parts(trainer) -> tuple[set[str], set[str]]:
    """(names of the tensors that changed in training, names of those that did not)."""
    state = trainer.model.state_dict()
    changed = {k for k, v in state.items() if not torch.equal(v, trainer.initial[k])}
    return changed, set(state) - changed


FREEZE_CASES = {
    "pretrain": (["--stage", "pretrain"], lambda k: k.startswith("mm_projector.")),
    "finetune": (["--stage", "finetune"], lambda k: k.startswith(("mm_projector.", "language_model."))),
    # The tower's top layer is used only when the features come from the last layer (LLaVA-1.5 takes -2).
    "top_vision_layer": (
        ["--stage", "finetune", "--unfreeze_vision_layers", "1", "--mm_vision_select_layer", "-1"],
        lambda k: k.startswith(("mm_projector.", "language_model.", "vision_tower.encoder.layers.2.")),
    ),
    "freeze_lm_head": (
        ["--stage", "finetune", "--freeze_modules", "lm_head"],
        lambda k: k.startswith(("mm_projector.", "language_model.")) and "lm_head" not in k,
    ),
}


@pytest.mark.parametrize("case", FREEZE_CASES)
def test_what_trains_per_stage(ws, monkeypatch, case):
    overrides, trains = FREEZE_CASES[case]
    config = write_yaml(ws / "freeze.yaml", data_path="data/images.json", per_device_train_batch_size=4,
                        max_steps=1, warmup_ratio=0, save_strategy="no", learning_rate=1e-3)
    trainer = train_recording(monkeypatch, config, [*overrides, "--output_dir", f"freeze_{case}"])
    changed, unchanged = changed_parts(trainer)
    expected = {k for k in trainer.initial if trains(k)}
    assert changed == expected, (f"changed but should not: {sorted(changed - expected)[:8]}; "
                                 f"unchanged but should train: {sorted(expected - changed)[:8]}")
    if case == "top_vision_layer":
        vision = {k for k in changed if k.startswith("vision_tower.")}
        assert vision and all(k.startswith("vision_tower.encoder.layers.2.") for k in vision)
    if case == "freeze_lm_head":
        assert "language_model.lm_head.weight" in unchanged


def test_projector_learning_rate_group(ws, monkeypatch):
    """mm_projector_lr: the projector's parameters, and only they, sit in groups with that lr, and one Adam step
    moves them by about that lr (|update| ~= lr on the first step) while the LLM moves by learning_rate."""
    config = write_yaml(ws / "plr.yaml", stage="finetune", data_path="data/images.json",
                        per_device_train_batch_size=4, max_steps=1, warmup_ratio=0, save_strategy="no",
                        learning_rate=1e-3, mm_projector_lr=1e-5)
    trainer = train_recording(monkeypatch, config, ["--output_dir", "plr"])
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(names[id(p)] for p in group["params"])
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert by_lr.keys() == {1e-3, 1e-5}
    assert by_lr[1e-5] == {n for n in trainable if n.startswith("mm_projector.")}
    assert by_lr[1e-3] == {n for n in trainable if n.startswith("language_model.")}
    state = trainer.model.state_dict()
    step = {k: (state[k] - trainer.initial[k]).abs().max().item() for k in state}
    projector = max(v for k, v in step.items() if k.startswith("mm_projector."))
    lm = max(v for k, v in step.items() if k.startswith("language_model."))
    assert projector == pytest.approx(1e-5, rel=0.05) and lm == pytest.approx(1e-3, rel=0.05)


# ---- 2. resume after SIGKILL == uninterrupted -------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(ws, reference, monkeypatch):
    ft, pt = finetune_yaml(ws), pretrain_yaml(ws)
    assert reference[0].args.group_by_modality_length  # the finetune preset: resume must replay that sampler
    pt_ref = run.train(str(pt), ["--output_dir", "ref_pt"])
    # Killed at the end of step 5: checkpoint-4 is the last one written, step 5's update is lost.
    run_killed([{"config": str(ft), "overrides": ["--output_dir", "kill_ft"], "kill_at_step": 5},
                {"config": str(pt), "overrides": ["--output_dir", "kill_pt"], "kill_at_step": 5}])
    for out in ("kill_ft", "kill_pt"):
        assert get_last_checkpoint(out) == os.path.join(out, "checkpoint-4")
        assert not (ws / out / "model.safetensors").exists()
    # Stage-1 checkpoints hold the projector only; the frozen rest is rebuilt from the seed on resume.
    assert all(k.startswith("mm_projector.") for k in weights(ws / "kill_pt" / "checkpoint-4"))

    # The same command again resumes from checkpoint-4 by itself.
    for config, out, ref in ((ft, "kill_ft", reference[1]), (pt, "kill_pt", Path(pt_ref.args.output_dir))):
        trainer, steps = train_counting(monkeypatch, config, ["--output_dir", out])
        assert steps == [5, 6] and trainer.state.global_step == 6
        assert_same_weights(weights(ws / out), weights(ws / ref))
        steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
        assert steps == [1, 2, 3, 4, 5, 6]  # the log history came back from checkpoint-4 too


def test_rerun_of_a_finished_run_trains_no_more_steps(ws, monkeypatch):
    """The same command again after the run saved its checkpoint at max_steps resumes there and trains nothing:
    transformers (5.x) checks max_steps only after a step, so it would train one step too many. 24 samples = 6 steps
    per epoch, so checkpoint-4 lies inside the epoch (the case the library gets wrong)."""
    overrides = ["--output_dir", "rerun_ft", "--max_steps", "4"]
    _, steps = train_counting(monkeypatch, finetune_yaml(ws), overrides)
    assert steps == [1, 2, 3, 4]
    finished = weights(ws / "rerun_ft")
    trainer, steps = train_counting(monkeypatch, finetune_yaml(ws), overrides)
    assert steps == [] and trainer.state.global_step == 4
    assert_same_weights(weights(ws / "rerun_ft"), finished)


# ---- 3. atomic checkpoints --------------------------------------------------------------------------------------


class SimulatedCrash(RuntimeError):
    pass


def test_crash_inside_checkpoint_save_leaves_no_checkpoint(ws, reference, monkeypatch):
    class CrashingSave(run.PolyfocusTrainer):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            if os.path.basename(output_dir or "") == "checkpoint-4":
                raise SimulatedCrash("after writing checkpoint-4's weights")

    out = ws / "crash_ft"
    with monkeypatch.context() as m:
        m.setattr(run, "PolyfocusTrainer", CrashingSave)
        with pytest.raises(SimulatedCrash):
            run.train(str(finetune_yaml(ws)), ["--output_dir", str(out)])
    assert (out / STAGING / "checkpoint-4" / "model.safetensors").is_file()  # the crash came after the weights
    assert not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")

    trainer, steps = train_counting(monkeypatch, finetune_yaml(ws), ["--output_dir", str(out)])
    assert steps == [3, 4, 5, 6]  # resumed from checkpoint-2
    assert not (out / STAGING / "checkpoint-4").exists()
    for n in (4, 6):
        assert (out / f"checkpoint-{n}" / "trainer_state.json").is_file()
    assert_same_weights(weights(out), weights(reference[1]))


def test_checkpoint_files_are_fsynced_before_the_rename(ws, monkeypatch):
    """The rename publishes a checkpoint: every file in it must be on disk first, or a power cut after the rename
    could leave a checkpoint-N whose files are empty (the rename's own directory entry is made durable too)."""
    synced, published = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        if STAGING in str(src):  # what the rename publishes, and whether each piece was synced by then
            for root, _, files in os.walk(os.path.realpath(src)):
                published.extend((os.path.join(root, f), os.path.join(root, f) in synced) for f in files)
                published.append((root, root in synced))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run.train(str(finetune_yaml(ws)), ["--output_dir", str(ws / "fsync_ft"), "--max_steps", "2"])
    assert any(path.endswith("model.safetensors") for path, _ in published)
    assert [path for path, ok in published if not ok] == []


def bad_image_data(ws: Path) -> Path:
    """data/bad.json: 8 image samples, one of them a corrupt file (its header does not read) and one a truncated
    PNG (its header reads, its pixels do not)."""
    import io

    import numpy as np
    from PIL import Image

    data = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 56, 3), dtype=np.uint8)).save(data, "PNG")
    (ws / "data" / "truncated.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (ws / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = json.loads((ws / "data" / "images.json").read_text())[:8]
    records[3] = {**records[3], "id": "corrupt", "image": "corrupt.png"}
    records[6] = {**records[6], "id": "truncated", "image": "truncated.png"}
    (ws / "data" / "bad.json").write_text(json.dumps(records))
    return ws / "data" / "bad.json"


def test_a_corrupt_image_stops_a_strict_run_before_training(ws, monkeypatch):
    bad_image_data(ws)
    began = []

    class Began(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            began.append(True)

    monkeypatch.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, [Began()]))
    config = write_yaml(ws / "bad.yaml", stage="finetune", data_path="data/bad.json", per_device_train_batch_size=2,
                        num_train_epochs=1, save_strategy="no", learning_rate=1.0e-3)
    with pytest.raises(DataError, match=r"sample id 'corrupt': cannot read image .*corrupt\.png"):
        run.train(str(config), ["--output_dir", "bad_strict"])
    assert not began  # found by validate's header check, not hours later by the step that draws it


def test_bad_images_are_left_out_never_replaced_and_reported(ws, monkeypatch, capsys):
    """strict_data: false. The corrupt image is found before training (out of the index); the truncated one only
    when its batch is made: dropped from that batch. No sample trains twice in the epoch to stand in for one, and
    the skips are printed by reason at the end and written to skipped.json."""
    bad_image_data(ws)
    seen = []

    class Recording(run.DataCollator):
        def __call__(self, features):
            seen.extend(f["id"] for f in features if isinstance(f, dict))
            return super().__call__(features)

    monkeypatch.setattr(run, "DataCollator", Recording)
    config = write_yaml(ws / "bad.yaml", stage="finetune", data_path="data/bad.json", per_device_train_batch_size=2,
                        num_train_epochs=1, save_strategy="no", learning_rate=1.0e-3, strict_data=False)
    trainer, steps = train_counting(monkeypatch, config, ["--output_dir", "bad_lenient"])
    good = [r["id"] for r in json.loads((ws / "data" / "bad.json").read_text())
            if r["id"] not in ("corrupt", "truncated")]
    assert sorted(seen) == sorted(good)  # each good sample once; neither bad one, nor a stand-in for it
    assert steps == [1, 2, 3, 4]  # 7 samples in the index (the corrupt one is out), batches of 2
    report = json.loads((ws / "bad_lenient" / "skipped.json").read_text())
    assert report["total"] == 2 and report["by_reason"] == {"image": 2}
    assert sorted(report["samples"]["data/bad.json"]["image"]) == ["id 'corrupt'", "id 'truncated'"]
    assert "skipped samples: 2 (image 2)" in capsys.readouterr().out


# ---- 4. DDP (2 processes, gloo) == 1 process, same global batch -------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_equal_one(ws, reference):
    """With mixed modalities and text-only samples of different lengths the ranks hold different token counts:
    equality needs the loss normalised by the global token count (average_tokens_across_devices), the sampler's
    megabatch = the global batch, and real DDP (on a machine without GPU, accelerate wraps the model in DDP only
    with use_cpu, which parse_args now sets for multi-process launches)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "polyfocus.cli", "train", str(finetune_yaml(ws)), "--output_dir", "ddp_ft",
           "--per_device_train_batch_size", "2", "--ddp_backend", "gloo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp = json.loads((ws / "ddp_ft" / "trainer_state.json").read_text())
    assert ddp["global_step"] == 6
    assert (ws / "ddp_ft" / "checkpoint-6").is_dir() and not any((ws / "ddp_ft" / STAGING).iterdir())
    # Both runs saw the same samples at every step (the modality-grouped sampler's megabatch is the global batch).
    ref_tokens = [h["num_input_tokens_seen"] for h in reference[0].state.log_history if "loss" in h]
    # (num_input_tokens_seen is summed over ranks: only half of each step's tokens if the ranks trained alone.)
    assert [h["num_input_tokens_seen"] for h in ddp["log_history"] if "loss" in h] == ref_tokens
    ref_losses = [h["loss"] for h in reference[0].state.log_history if "loss" in h]
    assert [h["loss"] for h in ddp["log_history"] if "loss" in h] == pytest.approx(ref_losses, rel=1e-5)
    assert_same_weights(weights(ws / "ddp_ft"), weights(reference[1]), atol=1e-5)


# ---- 5. arguments -----------------------------------------------------------------------------------------------


def test_precedence_cli_over_yaml_over_preset_over_defaults(ws):
    config = write_yaml(ws / "prec.yaml", stage="pretrain", learning_rate=3e-4, save_steps=7, version="v1",
                        output_dir="o", data_path="data/images.json")
    model_args, data_args, args = parse_args(str(config), ["--learning_rate", "5e-4", "--group_by_modality_length",
                                                          "true", "--tune_mm_mlp_adapter", "false"])
    assert args.learning_rate == 5e-4  # CLI over YAML (and over the preset's 1e-3)
    assert args.group_by_modality_length is True and model_args.tune_mm_mlp_adapter is False  # CLI over preset
    assert args.save_steps == 7 and model_args.version == "v1"  # YAML over the default / the preset's "plain"
    assert data_args.image_aspect_ratio == "square"  # the pretrain preset over the default "pad"
    assert args.lr_scheduler_type.value == "cosine" and args.weight_decay == 0.0
    assert data_args.data_path == ["data/images.json"]

    _, data_args, args = parse_args(str(config), ["--stage", "finetune"])  # the stage itself from the CLI
    assert args.stage == "finetune" and data_args.image_aspect_ratio == "pad"
    assert args.group_by_modality_length is True and args.learning_rate == 3e-4

    model_args, _, args = parse_args(None, ["--output_dir", "o"])  # no YAML, no stage: the dataclass defaults
    assert args.learning_rate == 5e-5 and model_args.version == "v1" and args.group_by_modality_length is False


def test_warmup_ratio_alias(ws):
    config = write_yaml(ws / "warm.yaml", output_dir="o", warmup_ratio=0.1)
    assert parse_args(str(config))[2].get_warmup_steps(100) == 10
    assert parse_args(str(config), ["--warmup_ratio", "0.2"])[2].get_warmup_steps(100) == 20
    assert parse_args(str(config), ["--warmup_steps", "3"])[2].get_warmup_steps(100) == 3


def test_unknown_yaml_key_names_file_and_close_match(ws):
    config = write_yaml(ws / "typo.yaml", output_dir="o", learning_rat=1e-3)
    with pytest.raises(ValueError, match=r"typo\.yaml.*'learning_rat'.*did you mean 'learning_rate'"):
        parse_args(str(config))


def test_model_config_json_on_cli(ws, monkeypatch):
    config = write_yaml(ws / "mc.yaml", output_dir="o")
    model_args = parse_args(str(config), ["--model_config", '{"hidden_size": 48, "text": "qwen2"}'])[0]
    assert model_args.model_config == {"hidden_size": 48, "text": "qwen2"}
    assert parse_args(str(config))[0].model_config == COMMON["model_config"]  # the YAML mapping
    # `polyfocus train` hands everything after the YAML to the training parser as overrides.
    seen = []
    monkeypatch.setattr(run, "train", lambda config, overrides: seen.append((config, overrides)))
    from polyfocus.cli import main

    main(["train", str(config), "--model_config", '{"hidden_size": 48}', "--max_steps", "3"])
    assert seen == [(str(config), ["--model_config", '{"hidden_size": 48}', "--max_steps", "3"])]


# ---- 6. the output directory ------------------------------------------------------------------------------------


def test_output_dir_is_a_loadable_model(ws, reference):
    trainer, out = reference
    loaded = load_model(out)
    state = trainer.model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == get_template("v1").to_jinja()

    # train_args.yaml repeats the run: it parses back to the same arguments, the output directory aside.
    saved = yaml.safe_load((out / "train_args.yaml").read_text())
    assert saved["max_steps"] == 6 and saved["model_config"] == COMMON["model_config"]
    assert "<HUB_TOKEN>" not in (out / "train_args.yaml").read_text()  # a masked secret would come back as one
    again = parse_args(str(out / "train_args.yaml"), ["--output_dir", "other"])
    original = parse_args(str(finetune_yaml(ws)), ["--output_dir", "ref_ft", "--plot_loss", "true"])
    assert again[2].output_dir == "other"
    for got, want in zip(again, original):
        names = [f.name for f in dataclasses.fields(want) if f.init and f.name not in ("output_dir", "logging_dir")]
        diff = {k: (getattr(got, k), getattr(want, k)) for k in names if getattr(got, k) != getattr(want, k)}
        assert not diff
    rerun = run.train(str(out / "train_args.yaml"), ["--output_dir", "other", "--max_steps", "1",
                                                     "--save_strategy", "no", "--plot_loss", "false"])  # and it runs
    assert rerun.state.global_step == 1 and (ws / "other" / "model.safetensors").is_file()


def test_stage1_output_uses_the_training_template(ws):
    """The tokenizer saved by a run carries the template it trained with (here plain, not the tokenizer's vicuna)."""
    config = write_yaml(ws / "pt1.yaml", stage="pretrain", data_path="data/images.json",
                        per_device_train_batch_size=4, max_steps=1, save_strategy="no", output_dir="pt1")
    run.train(str(config))
    tokenizer = AutoTokenizer.from_pretrained(ws / "pt1")
    assert tokenizer.chat_template == get_template("plain").to_jinja() != get_template("v1").to_jinja()
    assert not (ws / "pt1" / "loss.png").exists()  # plot_loss false


# ---- 7. packing (polyfocus/data/packing.py) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_reference(ws):
    """The finetune run of `reference`, packed: (trainer, output dir)."""
    trainer = run.train(str(finetune_yaml(ws)), ["--output_dir", "packed_ft", "--packing", "true"])
    return trainer, ws / "packed_ft"


def logged(trainer_or_state, key: str) -> list:
    history = trainer_or_state.state.log_history if hasattr(trainer_or_state, "state") else trainer_or_state
    return [h[key] for h in history if "loss" in h]


def test_packed_run_equals_unpacked_run(reference, packed_reference):
    """The same samples per step (the finetune preset's modality-grouped sampler), fewer rows: every step's loss
    (normalised by the step's supervised-token count, num_items_in_batch) and the final weights are the unpacked
    run's, to fp32 rounding (measured: 4e-9 on the weights after 6 Adam steps at lr 1e-3)."""
    trainer, out = packed_reference
    assert trainer.args.packing and trainer.args.group_by_modality_length
    assert logged(trainer, "num_input_tokens_seen") == logged(reference[0], "num_input_tokens_seen")
    assert logged(trainer, "loss") == pytest.approx(logged(reference[0], "loss"), rel=1e-6)
    assert_same_weights(weights(out), weights(reference[1]), atol=1e-6)


def test_scoring_only_the_answers_trains_as_scoring_every_position(ws, reference, monkeypatch):
    """PolyfocusTrainer's forward computes the LM head only where an answer token is predicted; the same run with
    every position scored logs the same losses and ends on the same weights."""
    from polyfocus import PolyfocusForConditionalGeneration

    forward, flags = PolyfocusForConditionalGeneration.forward, []

    def every_position(self, *args, supervised_logits_only=False, **kwargs):
        flags.append(supervised_logits_only)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PolyfocusForConditionalGeneration, "forward", every_position)
    trainer = run.train(str(finetune_yaml(ws)), ["--output_dir", "every_position"])
    assert flags and all(flags)  # the trainer asked for the answers only at every step
    assert logged(trainer, "loss") == pytest.approx(logged(reference[0], "loss"), rel=1e-6)
    assert_same_weights(weights(ws / "every_position"), weights(reference[1]), atol=1e-6)


def test_packed_lora_with_gradient_accumulation_equals_unpacked(ws):
    """LoRA (adapters on the LLM, projector in full; dropout 0 so both runs draw nothing) with 2 micro-batches of 2
    per step: the loss of a step sums both micro-batches' token losses over the step's token count, packed or not."""
    adapters = {}
    for packing in ("false", "true"):
        out = f"lora_accum_{packing}"
        trainer = run.train(str(finetune_yaml(ws)), ["--output_dir", out, "--packing", packing, "--max_steps", "3",
                                                     "--per_device_train_batch_size", "2",
                                                     "--gradient_accumulation_steps", "2", "--lora_enable", "true",
                                                     "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"])
        adapters[packing] = (logged(trainer, "loss"), load_file(str(ws / out / "adapter_model.safetensors")))
    assert adapters["true"][0] == pytest.approx(adapters["false"][0], rel=1e-6)
    assert_same_weights(adapters["true"][1], adapters["false"][1], atol=1e-6)


@pytest.mark.slow
def test_packed_resume_after_sigkill_is_exact(ws, packed_reference, monkeypatch):
    """Packing is a function of the batch alone, and the batches replay after a resume: the resumed packed run is
    the uninterrupted one, bit for bit."""
    ft = finetune_yaml(ws)
    run_killed([{"config": str(ft), "overrides": ["--output_dir", "kill_packed", "--packing", "true"],
                 "kill_at_step": 5}])
    assert get_last_checkpoint("kill_packed") == os.path.join("kill_packed", "checkpoint-4")
    trainer, steps = train_counting(monkeypatch, ft, ["--output_dir", "kill_packed", "--packing", "true"])
    assert steps == [5, 6]
    assert_same_weights(weights(ws / "kill_packed"), weights(packed_reference[1]))
    assert logged(trainer, "loss") == logged(packed_reference[0], "loss")


@pytest.mark.slow
def test_packed_ddp_equals_one_process_unpacked(ws, reference):
    """2 processes (gloo), each packing its own half of the global batch, against one unpacked process: the loss is
    normalised by the supervised tokens of the whole step over both ranks (average_tokens_across_devices), so the
    losses and weights match as in the unpacked DDP test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "polyfocus.cli", "train", str(finetune_yaml(ws)), "--output_dir", "ddp_packed",
           "--per_device_train_batch_size", "2", "--ddp_backend", "gloo", "--packing", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp = json.loads((ws / "ddp_packed" / "trainer_state.json").read_text())["log_history"]
    assert logged(ddp, "num_input_tokens_seen") == logged(reference[0], "num_input_tokens_seen")
    assert logged(ddp, "loss") == pytest.approx(logged(reference[0], "loss"), rel=1e-5)
    assert_same_weights(weights(ws / "ddp_packed"), weights(reference[1]), atol=1e-5)


def test_packing_arguments_are_checked(ws):
    config = write_yaml(ws / "packargs.yaml", output_dir="o")
    _, _, args = parse_args(str(config), ["--packing_max_length", "512"])
    with pytest.raises(ValueError, match="packing_max_length set, but packing is off"):
        run.build_collator(args, None, None)

    class Model:  # what build_collator reads of a model
        def __init__(self, attention):
            self.config = type("C", (), {"text_config": type("T", (), {"_attn_implementation": attention})()})()

    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    _, _, args = parse_args(str(config), ["--packing", "true", "--packing_max_length", "512"])
    assert run.build_collator(args, tokenizer, Model("sdpa")).max_length == 512
    with pytest.raises(ValueError, match="flash_attention_2 each batch is packed into one row"):
        run.build_collator(args, tokenizer, Model("flash_attention_2"))
    _, _, args = parse_args(str(config), ["--packing", "true"])
    assert run.build_collator(args, tokenizer, Model("flash_attention_2")).max_length is None  # one row
    assert run.build_collator(args, tokenizer, Model("eager")).max_length == 2048  # model_max_length
    with pytest.raises(ValueError, match="'flex_attention' packed samples are not known to stay apart"):
        run.build_collator(args, tokenizer, Model("flex_attention"))
