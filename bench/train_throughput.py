"""Training throughput of `polyfocus train` (PolyfocusTrainer on the demo model) vs a plain transformers `Trainer`
over `LlavaForConditionalGeneration` with the same weights, data, collator and TrainingArguments.

Short runs alternate (ours, reference, ours, ...) so machine noise hits both alike; the ratio is of the median
non-padding tokens per second. Two polyfocus rows: with the plain random sampler (the very same batches as the
reference) and with the finetune preset's modality-length grouped sampler (batches of similar lengths, so less
padding is computed per real token).

Prints one JSON line: {"bench": "train_throughput", "ratio_same_sampler": ..., "ratio_grouped": ..., ...}.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit
from transformers import Trainer

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import to_llava_hf
from polyfocus.data.dataset import DataCollator, SupervisedDataset
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import default_tokenizer
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import export
from polyfocus.train.args import TrainingArguments
from polyfocus.train.trainer import PolyfocusTrainer

STEPS, BATCH = 12, 16


def make_dataset(root: Path, tokenizer, image_token_id: int, num_image_tokens: int):
    # VQA families plus dense captions: the mix of short and long samples the demo trains on.
    export(str(root), 200, seed=0, image_size=112, families=["colour", "shape", "count", "dense_caption"])
    return SupervisedDataset(root / "train.json", root, tokenizer, "vicuna_v1", ImageProcessor(image_size=56),
                             image_token_id, num_image_tokens, model_max_length=512)


def run(trainer_cls, model, dataset, collator, out: str, grouped: bool) -> float:
    """Non-padding tokens per second over STEPS optimizer steps (after one warm-up step)."""
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=STEPS + 1, learning_rate=1e-4,
                     save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                     dataloader_pin_memory=False, seed=0, group_by_modality_length=grouped, logging_strategy="no")
    tokens, start = [0], [0.0]

    def count(module, args_, kwargs):
        if start[0] == 0.0:  # first step is warm-up
            start[0] = time.perf_counter()
        else:
            tokens[0] += int(kwargs["attention_mask"].sum())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    hook.remove()
    return tokens[0] / (time.perf_counter() - start[0])


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    tokenizer = default_tokenizer()
    config = tiny_config(hidden_size=128, image_size=56, vocab_size=len(tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    ours = PolyfocusForConditionalGeneration(config)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp) / "data", tokenizer, config.image_token_id, config.num_image_tokens)
        collator = DataCollator(tokenizer.pad_token_id)
        rates = {"ours_grouped": [], "ours": [], "reference": []}
        for _ in range(repeats):
            for name in rates:
                ours.load_state_dict(state)  # every run starts from the same weights
                model = to_llava_hf(ours) if name == "reference" else ours
                trainer_cls = Trainer if name == "reference" else PolyfocusTrainer
                rates[name].append(run(trainer_cls, model, dataset, collator, tmp, grouped=name == "ours_grouped"))
    med = {k: statistics.median(v) for k, v in rates.items()}
    emit({"bench": "train_throughput", "steps": STEPS, "batch": BATCH, "repeats": repeats,
          "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
          "ratio_same_sampler": round(med["ours"] / med["reference"], 3),
          "ratio_grouped": round(med["ours_grouped"] / med["reference"], 3),
          "device": "cuda" if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
