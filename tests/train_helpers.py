"""Helpers for the training tests (tests/test_train.py and each method's recipe tests).

As a script: `python tests/train_helpers.py JOBS_JSON` runs training jobs (`polyfocus.train.run.train`), each in
a forked child that SIGKILLs itself at the end of a given optimizer step, and prints the children's exit codes
(-9 each when all went as planned) as a JSON list. JOBS_JSON is a list of
{"config": YAML path, "overrides": [...], "kill_at_step": N}. The heavy imports happen once, in the parent, before
any torch computation (so forking is safe); each child then trains exactly as `polyfocus train` would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from transformers import TrainerCallback


class KillAtStep(TrainerCallback):
    """SIGKILL this process at the end of optimizer step `step` (before that step's checkpoint, if any)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def trainer_with(base, callbacks=(), on_init=None):
    """A subclass of the trainer class `base` that adds `callbacks` and calls `on_init(trainer)` after __init__."""

    class Patched(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for callback in callbacks:
                self.add_callback(callback)
            if on_init is not None:
                on_init(self)

    return Patched


def train_recording(monkeypatch, config, overrides):
    """`polyfocus train CONFIG OVERRIDES`, keeping the weights it started from in `trainer.initial`."""
    from polyfocus.train import run

    def remember(trainer):
        trainer.initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    monkeypatch.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, on_init=remember))
    return run.train(str(config), overrides)


def write_tiny_backbones(root, clip_size: int) -> None:
    """root/vicuna (a 2-layer Llama with the project's tokenizer) and root/clip (a 3-layer CLIP tower of clip_size px,
    14 px patches): LLaVA's stage-1 starting point, tiny and seeded."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from polyfocus.data.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(save_dir=root / "vicuna")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "vicuna")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=clip_size, patch_size=14)).save_pretrained(root / "clip")


def changed(trainer) -> set[str]:
    """Names of the tensors a `train_recording` run moved."""
    import torch

    return {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, trainer.initial[k])}


def main(argv: list[str]) -> int:
    jobs = json.loads(argv[0])
    from polyfocus.train import run  # every heavy import, once, before forking

    codes = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:  # child: train until the callback kills it
            code = 3  # reaching the end means the kill never happened
            try:
                run.PolyfocusTrainer = trainer_with(run.PolyfocusTrainer, [KillAtStep(job["kill_at_step"])])
                run.train(job["config"], job["overrides"])
            except BaseException:
                traceback.print_exc()
                code = 4
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    print(json.dumps(codes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
