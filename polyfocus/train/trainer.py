"""transformers' Trainer, subclassed only where LLaVA-style training needs it:

- optimizer parameter groups per model part (projector / fusion / vision tower / LLM learning rates),
  each split into decay and no-decay, as LLaVATrainer.create_optimizer does;
- the modality-length grouped sampler (`group_by_modality_length`);
- checkpoints written atomically: into `<output_dir>/.staging/checkpoint-N`, fsynced, renamed to `checkpoint-N` only
  once every rank has finished, so a crash mid-save (or a power cut after it) never leaves a `checkpoint-N` that
  loads half-written;
- checkpoints that hold only the trainable weights (`save_trainable_only`; LLaVA stage 1 saves only the
  projector) — resume loads them over the frozen weights, which the run rebuilds from its starting model;
- VW-LMM's visual-word loss logged on its own (`vw_loss`) and averaged over micro-batches as the reference does;
- samples that failed to load (`strict_data: false`) dropped from their batch and collected for the run's report;

Everything else (DDP/FSDP/DeepSpeed, resume of optimizer/scheduler/RNG/data position, logging, report_to)
is the library's.
"""

from __future__ import annotations

import os
import shutil

import torch
from transformers import Trainer

from polyfocus.config import MODEL_PARTS
from polyfocus.data.formats import DataError
from polyfocus.data.sampler import LengthGroupedSampler
from polyfocus.train.freeze import part_of

STAGING = ".staging"


class PolyfocusTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropped: set[tuple[str, str, str]] = set()  # (file, reason, sample) dropped from batches on this rank

    def part_learning_rates(self) -> dict[str, float]:
        """The parts given a learning rate of their own (mm_projector_lr, mm_fusion_lr, ...: config.MODEL_PARTS)."""
        lrs = {part: getattr(self.args, flag) for part, flag in MODEL_PARTS.values() if flag}
        return {part: lr for part, lr in lrs.items() if lr is not None}

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        lrs = self.part_learning_rates()
        groups: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                part = part_of(name) if "lora_" not in name else "language_model"
                groups.setdefault((part if part in lrs else "", name in decay), []).append(param)
        param_groups = []
        for (part, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if part:
                group["lr"] = lrs[part]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- the loss: the LM head at answer positions only; VW-LMM's visual-word loss ------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:  # the LM head only where an answer token is predicted: the same loss (model.forward)
            inputs = {**inputs, "supervised_logits_only": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        vw_loss = getattr(outputs, "vw_loss", None)
        if vw_loss is not None:
            weight = self.accelerator.unwrap_model(model).config.vw_loss_weight
            loss = loss + self._visual_word_rescale(num_items_in_batch) * weight * vw_loss
            if model.training:
                self._vw_losses = getattr(self, "_vw_losses", []) + [vw_loss.detach()]
        return (loss, outputs) if return_outputs else loss

    def _visual_word_rescale(self, num_items_in_batch) -> float:
        """The model's loss is text CE + weight * vw_loss, each a mean over this micro-batch. When the text CE is
        normalised by the token count of the whole accumulated, all-rank batch (transformers' loss kwargs), the
        Trainer multiplies the loss by the number of processes (DDP averages gradients) and no longer divides it by
        the accumulation steps; for the visual-word part, which stays a per-micro-batch mean as in the reference
        (DeepSpeed averages its micro-batches), that is undone here: the factor turns scale * vw into vw / steps."""
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if not scaled:
            return 0.0  # the Trainer divides the whole loss by the accumulation steps itself
        world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return 1.0 / self.current_gradient_accumulation_steps - world

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        vw_losses = getattr(self, "_vw_losses", [])
        if "loss" in logs and vw_losses:  # mean since the last log, over micro-batches and ranks
            logs["vw_loss"] = self.accelerator.reduce(torch.stack(vw_losses).mean(), "mean").item()
            self._vw_losses = []
        super().log(logs, start_time)

    def _run_epoch(self, *args, **kwargs):
        # transformers (5.x) checks max_steps only after an optimizer step: a run resumed from a checkpoint already at
        # max_steps (the same command run again) would train one step more. Nothing is left to train: stop here.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # ---- samples that failed to load (strict_data: false) ------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The collator lists what it dropped: DataLoader workers hold their own copies of the dataset's counts.
        self.dropped.update(inputs.pop("skipped", ()))
        if inputs["input_ids"].shape[0] == 0:  # every sample of this micro-batch failed to load
            if self.args.world_size > 1:  # the other ranks would wait for this one's gradients forever
                raise DataError("every sample of a batch failed to load on this rank, and a multi-process run cannot "
                                "skip a whole batch on one rank: find them before training with validate_data: true "
                                "and validate_images: decode", "empty")
            return torch.zeros((), device=self.args.device)  # no gradient: the step uses the other micro-batches'
        return super().training_step(model, inputs, num_items_in_batch)

    def skipped_samples(self) -> list[tuple[str, str, str]]:
        """Every sample left out of training, over all ranks: (file, reason, sample), sorted. Those found before
        training (the datasets' `skipped`: not in the index) and those dropped from a batch."""
        from accelerate.utils import gather_object

        found = set(self.dropped)
        for part in getattr(self.train_dataset, "datasets", [self.train_dataset]):
            found |= {(part.data_path, reason, name) for reason, names in getattr(part, "skipped", {}).items()
                      for name in names}
        return sorted(set(gather_object(sorted(found))))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        # One megabatch = one optimizer step over all ranks (LLaVA passes world_size x grad_accum).
        world = self.args.world_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(dataset.modality_lengths, self.args.train_batch_size, world, seed=self.args.seed)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):  # left over by a crash: never half-reuse it
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staged)  # the data on disk before the rename publishes it: never a checkpoint of empty files
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)  # atomic on one filesystem
            _fsync_dir(run_dir)
            self._rotate_checkpoints_in(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints_in(self, run_dir: str) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    def _save(self, output_dir=None, state_dict=None):
        # Inside a checkpoint of a partly frozen model, write the trainable weights only.
        # (A peft model already saves only its adapters and modules_to_save.)
        partial = getattr(self, "_staging", False) and self.args.save_trainable_only and state_dict is None
        if partial and not hasattr(self.model, "peft_config"):
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if len(trainable) < sum(1 for _ in self.model.parameters()):
                state_dict = {k: v for k, v in self.model.state_dict().items() if k in trainable}
        super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result):
        # A trainable-only checkpoint misses the frozen weights by design; anything else missing is an error.
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        missing = [k for k in load_result.missing_keys if k not in frozen]
        if missing or load_result.unexpected_keys:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {list(load_result.unexpected_keys)[:5]}")


def _fsync_tree(path: str) -> None:
    """fsync every file under `path`, then every directory (their entries), deepest first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
