"""Training throughput with packing: `polyfocus train` with `packing: true` vs transformers' plain `Trainer` over
`LlavaForConditionalGeneration` with LLaVA's padding (each batch padded to its longest sample), same weights, same
data, same batches (both take transformers' seeded random sampler), side by side in one process.

Measured: non-padding tokens per second over STEPS optimizer steps after one warm-up step (from the end of the
warm-up step to the end of the last, data loading and collation included), and the padding fraction of each run
(positions that hold no sample ÷ all positions the LLM computed). Runs alternate (ours, reference, ours, ...) so
machine noise hits both alike; the speed-up is the ratio of the medians. Both on one thread: `speedup` divides
wall-clock rates, `speedup_cpu_time` rates per second of this process's CPU time, which other jobs on a shared
machine disturb far less.

The data: a synthworld mix with LLaVA-665K's composition and length profile (llava_v1_5_mix665k.json, LLaVA-1.5's
stage 2), at half LLaVA-1.5's scale in tokens: 256 visual tokens per image (224 px / 14; LLaVA-1.5: 576) and
model_max_length 1024 (LLaVA-1.5: 2048). The shares are the LLaVA-1.5 paper's data table; the academic VQA sets hold
one conversation per image with all its questions (VQAv2's 83K is the number of COCO train images, not of its 443K
questions); ShareGPT is Vicuna's, whose long conversations were cut into pieces of the context length. The token
lengths of LLaVA-1.5's samples are our estimates (Vicuna tokenizer, 576 visual tokens, a 35-token system prompt),
not measurements: the JSON cannot be read here. Each sample here is built to a length drawn in its kind's range
(in fractions of model_max_length), from whole rounds of synthworld questions, captions and dense captions (the
lengths, not the contents, are what this bench needs); the bench reports the lengths it got.

| kind | share | LLaVA-665K sources | LLaVA-1.5 tokens, of 2048 (estimate) | here, of 1024 |
|---|---|---|---|---|
| single-turn, short answer | 15 % | OKVQA 9K, A-OKVQA 66K, TextCaps 22K | 640-700 (0.31-0.34) | one question or caption (0.29-0.33) |
| single-turn, long answer | 15 % | LLaVA detail 23K, complex reasoning 77K | 750-1000 (0.37-0.49) | one dense caption (0.33-0.47) |
| multi-turn, short answers | 55 % | VQAv2 83K, GQA 72K, OCR-VQA 80K, RefCOCO 48K, VG 86K | 700-1000 (0.35-0.5), 3-12 rounds | questions of one scene, to 0.35-0.5 |
| multi-turn, long answers | 9 % | LLaVA conversation 58K | 1100-1650 (0.55-0.8), 3-5 rounds | dense captions and questions, to 0.55-0.8 |
| text-only | 6 % | ShareGPT 40K | half near the cap (0.8-1.0), half 0.1-0.8 | dense captions without their image, same |

Model: a Llama of 2 layers x 256 (bench/common.py's width; vocabulary = the project tokenizer's), CLIP 3 x 32 at
224 px, fp32, SDPA; batch 16 per step (LLaVA-1.5's per-GPU batch), lr 2e-5. Ours packs each batch into rows of at most
model_max_length tokens (the default `packing_max_length`; `--budget N` sets another).

Prints one JSON line: {"bench": "train_packing", "speedup": ..., "padding_fraction": {"packed": ...,
"reference": ...}, ...}. Usage: python bench/train_packing.py [REPEATS] [--steps N] [--batch N] [--budget N]
[--hidden N]. About 2 minutes on the project's CPU machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from common import emit
from transformers import Trainer, TrainerCallback

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import to_llava_hf
from polyfocus.data.dataset import DataCollator, SupervisedDataset
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import export
from polyfocus.synthworld.tasks import DENSE_CAPTION_PROMPTS
from polyfocus.train import run
from polyfocus.train.trainer import PolyfocusTrainer

IMAGE_SIZE, PATCH, MAX_LENGTH = 224, 14, 1024
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
# kind: (share, range of a sample's length in fractions of MAX_LENGTH; None: one round), as in the table above
KINDS = {"single_short": (0.15, None), "single_long": (0.15, None), "multi_short": (0.55, (0.35, 0.5)),
         "multi_long": (0.09, (0.55, 0.8)), "text_only": (0.06, (0.1, 0.8))}  # text: half of it 0.8-1.0
SHORT = ("colour", "shape", "count", "existence", "text", "spatial", "mc", "grounding", "caption")
ROUND_TOKENS = 7  # the v1 template's "USER: ... ASSISTANT: ...</s>" around a round (our tokenizer)
SYSTEM_TOKENS = 34  # and its system prompt


def llava_mix(root: Path, n_samples: int, tokenizer, seed: int = 0) -> dict[str, int]:
    """root/mix.json: `n_samples` records of the KINDS (see the module docstring), from one synthworld export."""
    rng = random.Random(seed)
    export(str(root), n_samples, seed=seed, image_size=IMAGE_SIZE)
    by_scene: dict[str, dict[str, tuple[str, str]]] = {}
    images = {}
    for r in json.loads((root / "train.json").read_text()):
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        by_scene.setdefault(r["scene_id"], {})[r["family"]] = (question, r["conversations"][1]["value"])
        images[r["scene_id"]] = r["image"]
    scene_ids = list(by_scene)

    def tokens(q: str, a: str) -> int:
        return len(tokenizer(q + " " + a, add_special_tokens=False).input_ids) + ROUND_TOKENS

    def fill(rounds_from, target: float, image: bool) -> list[tuple[str, str]]:
        """Whole rounds until the next would pass `target` tokens (one round at least)."""
        rounds, length = [], SYSTEM_TOKENS + (IMAGE_TOKENS if image else 0)
        for q, a in rounds_from:
            if rounds and length + tokens(q, a) > target:
                break
            rounds.append((q, a))
            length += tokens(q, a)
        return rounds

    kinds = rng.choices(list(KINDS), weights=[share for share, _ in KINDS.values()], k=n_samples)
    records = []
    for i, (kind, scene) in enumerate(zip(kinds, scene_ids)):
        tasks = by_scene[scene]
        short = [tasks[f] for f in SHORT if f in tasks]
        rng.shuffle(short)
        if KINDS[kind][1] is not None:
            low, high = KINDS[kind][1]
            if kind == "text_only" and rng.random() < 0.5:
                low, high = 0.8, 1.0  # a piece cut at the context length
            target = rng.uniform(low, high) * MAX_LENGTH
        if kind == "single_short":
            rounds = short[:1]
        elif kind == "single_long":
            rounds = [tasks["dense_caption"]]
        elif kind == "multi_short":  # an image's questions, again in another order once all were asked
            rounds = fill((short[k % len(short)] for k in range(100)), target, image=True)
        elif kind == "multi_long":  # LLaVA's conversations: paragraphs, and questions between them
            dense = tasks["dense_caption"][1]
            paragraphs = [(p, dense) for p in DENSE_CAPTION_PROMPTS]
            rounds = fill((r for pair in zip(paragraphs * 3, short * 3) for r in pair), target, image=True)
        else:  # ShareGPT: text only
            others = (by_scene[rng.choice(scene_ids)] for _ in range(100))
            rounds = fill(((f"Describe a picture of this: {o['caption'][1]}", o["dense_caption"][1]) for o in others),
                          target, image=False)
        conversation = []
        for k, (q, a) in enumerate(rounds):
            image = k == 0 and kind != "text_only"
            conversation += [{"from": "human", "value": ("<image>\n" if image else "") + q},
                             {"from": "gpt", "value": a}]
        record = {"id": f"mix_{i:05d}_{kind}", "conversations": conversation}
        if kind != "text_only":
            record["image"] = images[scene]
        records.append(record)
    (root / "mix.json").write_text(json.dumps(records))
    return {k: kinds.count(k) for k in KINDS}


class StepClock(TrainerCallback):
    """Tokens, wall seconds and this process's CPU seconds from the end of the first (warm-up) step to the end of
    the last. CPU time is what the run computed, whatever else the machine ran meanwhile (one thread: see main)."""

    def __init__(self):
        self.start = self.tokens0 = None
        self.seconds = self.cpu_seconds = self.tokens = 0

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have run
        now, cpu = time.perf_counter(), time.process_time()
        if self.start is None:
            self.start, self.cpu_start, self.tokens0 = now, cpu, state.num_input_tokens_seen
        else:
            self.seconds, self.cpu_seconds = now - self.start, cpu - self.cpu_start
            self.tokens = state.num_input_tokens_seen - self.tokens0


class Positions:
    """A forward pre-hook counting the LLM positions computed and those holding no sample (the pad id)."""

    def __init__(self, pad_token_id: int):
        self.pad, self.total, self.padding = pad_token_id, 0, 0

    def __call__(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.total += ids.numel()
        self.padding += int((ids == self.pad).sum())


def run_ours(config: Path, clock: StepClock, positions: Positions, out: str, overrides: list[str]) -> None:
    class Timed(PolyfocusTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(clock)
            self.model.register_forward_pre_hook(positions, with_kwargs=True)

    original, run.PolyfocusTrainer = run.PolyfocusTrainer, Timed
    try:
        run.train(str(config), ["--output_dir", out, *overrides])
    finally:
        run.PolyfocusTrainer = original


def run_reference(model, dataset, collator, clock: StepClock, positions: Positions, out: str, steps: int,
                  batch: int) -> None:
    args = transformers.TrainingArguments(  # polyfocus's finetune preset, as far as the plain Trainer has it
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=2e-5,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0, logging_strategy="no",
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding")
    hook = model.register_forward_pre_hook(positions, with_kwargs=True)
    try:
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock]).train()
    finally:
        hook.remove()


def main(repeats: int = 3, steps: int = 8, batch: int = 16, budget: int | None = None, hidden: int = 256) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared: one thread each, so CPU time measures the work
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = build_tokenizer(save_dir=tmp / "tok")
        composition = llava_mix(tmp / "data", (steps + 1) * batch * 2, tokenizer)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        config = tiny_config(hidden_size=hidden, image_size=IMAGE_SIZE, patch_size=PATCH, vocab_size=len(tokenizer),
                             image_token_id=image_id)
        start = PolyfocusForConditionalGeneration(config)
        start.save_pretrained(tmp / "start")  # both runs start from these weights
        tokenizer.save_pretrained(tmp / "start")
        reference_model = to_llava_hf(start).train()
        reference_state = {k: v.clone() for k, v in reference_model.state_dict().items()}
        dataset = SupervisedDataset(tmp / "data" / "mix.json", tmp / "data", tokenizer, "v1",
                                    ImageProcessor(image_size=IMAGE_SIZE, aspect_ratio="pad"), image_id,
                                    config.num_image_tokens, MAX_LENGTH)
        by_kind: dict[str, list[float]] = {}
        for i, sample in enumerate(dataset.samples):  # the lengths this mix got, by kind
            by_kind.setdefault(sample.id.split("_", 2)[2], []).append(len(dataset[i]["input_ids"]) / MAX_LENGTH)
        recipe = tmp / "packed.yaml"
        recipe.write_text(yaml.safe_dump({
            "stage": "finetune", "model_name_or_path": str(tmp / "start"), "data_path": str(tmp / "data" / "mix.json"),
            "model_max_length": MAX_LENGTH, "packing": True, "packing_max_length": budget,
            "group_by_modality_length": False,  # the reference's random sampler: the very same batches
            "per_device_train_batch_size": batch, "max_steps": steps + 1, "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "dataloader_num_workers": 0, "plot_loss": False, "seed": 0, "bf16": False,
            "tf32": None, "logging_strategy": "no", "validate_data": False}))

        rates = {"packed": [], "reference": []}
        cpu_rates = {"packed": [], "reference": []}
        padding, tokens = {}, {}
        for r in range(repeats):
            for name in rates:
                clock, positions = StepClock(), Positions(tokenizer.pad_token_id)
                if name == "packed":
                    run_ours(recipe, clock, positions, str(tmp / f"ours_{r}"), [])
                else:
                    reference_model.load_state_dict(reference_state)
                    run_reference(reference_model, dataset, DataCollator(tokenizer.pad_token_id), clock, positions,
                                  str(tmp / f"ref_{r}"), steps, batch)
                rates[name].append(clock.tokens / clock.seconds)
                cpu_rates[name].append(clock.tokens / clock.cpu_seconds)
                padding[name] = positions.padding / positions.total
                tokens.setdefault(name, clock.tokens)
                assert tokens[name] == clock.tokens  # deterministic runs
        assert tokens["packed"] == tokens["reference"], tokens  # the same batches, counted alike
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    emit({"bench": "train_packing", "speedup": round(med["packed"] / med["reference"], 3),
          "speedup_cpu_time": round(cpu["packed"] / cpu["reference"], 3),
          "padding_fraction": {k: round(v, 3) for k, v in padding.items()},
          "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
          "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
          "runs_cpu_time": {k: [round(x, 1) for x in v] for k, v in cpu_rates.items()},
          "steps": steps, "batch": batch, "llm": f"llama 2 x {hidden}", "repeats": repeats,
          "budget": budget or MAX_LENGTH,
          "timed_tokens": tokens["packed"], "data": composition,
          "length_of_max": {k: [round(min(v), 2), round(statistics.median(v), 2), round(max(v), 2)]
                            for k, v in by_kind.items()},  # min, median, max
          "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("repeats", nargs="?", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=int, default=None, help="packing_max_length (default: model_max_length)")
    parser.add_argument("--hidden", type=int, default=256, help="the LLM's width")
    a = parser.parse_args()
    main(a.repeats, a.steps, a.batch, a.budget, a.hidden)
