"""Training on a CUDA device, bf16, through each launcher the docs promise (docs/training.md):

- `polyfocus train` in one process (plain Trainer, bf16);
- `accelerate launch --config_file <fsdp.yaml, 1 process> -m polyfocus.cli train` (FSDP2);
- DeepSpeed ZeRO-2 / ZeRO-3 with the shipped JSONs: `torchrun ... --deepspeed configs/deepspeed/zeroN.json`,
  `accelerate launch --config_file <deepspeed_zero3.yaml, 1 process>` and the `deepspeed` launcher itself.

Every run trains a tiny model (the README's tiny recipe: LM hidden 64, 56 px images) from a saved checkpoint, as the
stage-2 recipes do, in a subprocess exactly as a user would launch it, and checks: the loss goes down, every saved
weight is finite and has the dtype that engine keeps, and the output directory loads back.

Marked `gpu`: tests/conftest.py skips them where CUDA is missing. The DeepSpeed tests also skip, saying why, where
the deepspeed package does not import.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
TIMEOUT = 900  # seconds per training subprocess (model build + 30 steps + saves: well under a minute on a GPU)


def deepspeed_or_skip():
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a build/CUDA mismatch raised while importing
        pytest.skip(f"deepspeed does not import ({type(e).__name__}: {e}); pip install 'polyfocus[gpu]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tokenizer, 40 synthworld samples, a tiny saved polyfocus checkpoint and the recipe that trains it."""
    from polyfocus.data.images import ImageProcessor
    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.model.modeling import PolyfocusForConditionalGeneration
    from polyfocus.model.presets import tiny_config
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("gpu_train")
    tok = build_tokenizer(save_dir=root / "base")
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(hidden_size=64, image_size=56, vocab_size=len(tok),
                                                          image_token_id=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(root / "base")  # fp32 on disk; bf16 runs load it as bf16
    ImageProcessor(image_size=56).save_pretrained(root / "base")
    export(str(root / "data"), 40, image_size=112, families=["colour", "shape"])
    recipe = {
        "stage": "finetune",  # projector + LLM train, CLIP frozen
        "model_name_or_path": str(root / "base"),
        "data_path": str(root / "data" / "train.json"),
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "save_steps": 10,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "bf16": True,
        "tf32": True,
        "gradient_checkpointing": True,
        "dataloader_num_workers": 2,
        "report_to": "none",
        "seed": 0,
    }
    (root / "ft.yaml").write_text(yaml.safe_dump(recipe))
    return root


def launch(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                                    f"\n--- stderr\n{result.stderr[-8000:]}")


def train_cmd(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "polyfocus.cli", "train", str(ws / "ft.yaml"), "--output_dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, f"{out}: no weights written"
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def check_run(out: Path, trainable_dtype: torch.dtype | tuple[torch.dtype, ...], frozen_dtype: torch.dtype) -> None:
    """Loss down, weights finite, dtypes as the engine keeps them, output directory loadable."""
    from polyfocus.checkpoints import load_model

    curve = losses(out)
    assert len(curve) == STEPS, f"logged {len(curve)} losses for {STEPS} steps"
    assert all(torch.isfinite(torch.tensor(curve))), curve
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.9 * first, f"loss did not go down: first 5 steps {first:.3f}, last 5 {last:.3f} ({curve})"

    state = saved_weights(out)
    trainable_dtypes = trainable_dtype if isinstance(trainable_dtype, tuple) else (trainable_dtype,)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        assert torch.isfinite(tensor.float()).all(), f"{name}: non-finite values"
        if name.startswith("vision_tower."):  # frozen in the finetune stage
            assert tensor.dtype == frozen_dtype, f"{name}: {tensor.dtype}, expected {frozen_dtype}"
        else:
            assert tensor.dtype in trainable_dtypes, f"{name}: {tensor.dtype}, expected one of {trainable_dtypes}"
    # all trainable weights of one run share one dtype
    assert len({t.dtype for n, t in state.items() if t.is_floating_point() and not n.startswith("vision_tower.")}) == 1
    for step in range(10, STEPS + 1, 10):  # save_steps 10, no save_total_limit: every checkpoint kept
        assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file(), f"{out}: no checkpoint-{step}"
    model = load_model(out)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


# ---- one process, plain Trainer ----------------------------------------------------------------------------------


def test_single_gpu_bf16(ws, tmp_path):
    """`polyfocus train` on one GPU: the checkpoint is loaded in bf16 and trained in bf16 (LLaVA's setting)."""
    out = tmp_path / "out"
    launch([sys.executable, *train_cmd(ws, out)], cwd=tmp_path)
    check_run(out, torch.bfloat16, torch.bfloat16)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert (out / "train_args.yaml").is_file() and (out / "loss.png").is_file()


def test_single_gpu_bf16_from_model_config(ws, tmp_path):
    """The README's tiny recipe as written: a fresh model from `model_config`, bf16 autocast."""
    out = tmp_path / "out"
    overrides = ["--model_name_or_path", "", "--tokenizer_name_or_path", str(ws / "base"),
                 "--model_config", json.dumps({"hidden_size": 64, "image_size": 56})]
    launch([sys.executable, *train_cmd(ws, out, *overrides)], cwd=tmp_path)
    # a fresh model is built in fp32 and trained under bf16 autocast; a loaded one (above) is bf16 throughout
    check_run(out, (torch.float32, torch.bfloat16), torch.float32)


# ---- FSDP2 through accelerate ------------------------------------------------------------------------------------


def test_fsdp2_accelerate_launch(ws, tmp_path):
    """configs/accelerate/fsdp.yaml reduced to one process. accelerate keeps the trainable parameters as fp32 master
    weights under FSDP2 mixed precision (the frozen CLIP tower stays bf16), so the saved trainable weights are fp32."""
    config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    config.update(num_processes=1, main_process_port=free_port())
    config_file = tmp_path / "fsdp_1proc.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            *train_cmd(ws, out, "--deepspeed", "")], cwd=tmp_path)
    check_run(out, (torch.float32, torch.bfloat16), torch.bfloat16)


# ---- DeepSpeed ZeRO ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_torchrun(ws, tmp_path, stage):
    """LLaVA's way: the DeepSpeed JSON named by `--deepspeed`, any launcher (here torchrun, one process).
    DeepSpeed bf16 keeps the module's weights in bf16 (fp32 master copies live in the optimizer); ZeRO-3's final
    save gathers the 16-bit weights (stage3_gather_16bit_weights_on_model_save)."""
    deepspeed_or_skip()
    out = tmp_path / "out"
    ds_json = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
            *train_cmd(ws, out, "--deepspeed", str(ds_json))], cwd=tmp_path)
    check_run(out, torch.bfloat16, torch.bfloat16)


def test_deepspeed_zero3_accelerate_launch(ws, tmp_path):
    """configs/accelerate/deepspeed_zero3.yaml reduced to one process; the recipe names no JSON, so the accelerate
    config's deepspeed_config_file (configs/deepspeed/zero3.json) is the one used."""
    deepspeed_or_skip()
    config = yaml.safe_load((REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml").read_text())
    ds = config["deepspeed_config"]
    ds["deepspeed_config_file"] = str(REPO / ds["deepspeed_config_file"])  # the test runs in tmp_path
    config.update(num_processes=1, main_process_port=free_port())
    config_file = tmp_path / "zero3_1proc.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            *train_cmd(ws, out)], cwd=tmp_path)
    check_run(out, torch.bfloat16, torch.bfloat16)


def test_deepspeed_launcher(ws, tmp_path):
    """The `deepspeed` launcher, as docs/training.md gives it: --no_local_rank (the environment carries LOCAL_RANK)
    and --module polyfocus.cli."""
    deepspeed_or_skip()
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed package imports but its `deepspeed` launcher is not on PATH")
    out = tmp_path / "out"
    ds_json = REPO / "configs" / "deepspeed" / "zero2.json"
    launch([launcher, "--num_gpus", "1", "--master_port", str(free_port()), "--no_local_rank", "--module",
            *train_cmd(ws, out, "--deepspeed", str(ds_json))[1:]], cwd=tmp_path)
    check_run(out, torch.bfloat16, torch.bfloat16)
