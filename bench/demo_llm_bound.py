"""What the demo's LLM can learn in the demo's steps when the scene reaches it perfectly: a bound on what any tower
gives it. One JSON line.

The demo's LLM (2 x 128 from random weights, `demo_model_config`: Qwen3's layout; `--llm` sets another, e.g.
`'{"text": "llama"}'`, the demo's earlier LLM) is trained as the demo's stage 2 trains it —
the six VQA families at the demo's scene settings, answers balanced, one multi-turn conversation per scene, the
vicuna_v1 template, AdamW at 1e-3 with 3 % warm-up and a cosine decay, batch 16, gradients clipped at 1 — with the
image replaced by what no vision tower can beat:

- `oracle`: 64 tokens on the demo's 8 x 8 patch grid, each the one-hot shape, colour and size of the object the patch
  touches (zeros on background), standardised per channel over the training scenes as the demo standardises its
  tower's features (`mm_standardize_features`), through the demo's projector MLP;
- `text`: the scene written out ("large red star. medium blue circle."), the LLM's own token embeddings.

Reported per input and run length: held-out accuracy per family (one question per sample, the answer's
tokens all right under teacher forcing) and each family's majority answer. docs/benchmarks.md ("The demo's accuracy
target") reads it.

    python bench/demo_llm_bound.py [--steps 800,3000] [--inputs oracle,text] [--llm JSON] [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch
from demo_binding import patches
from torch import nn

from polyfocus.data.templates import encode
from polyfocus.demo import DEFAULT_IMAGE_SIZE, DEMO_SIZES, VQA_FAMILIES
from polyfocus.model.projector import build_projector
from polyfocus.synthworld.scenes import COLOURS, SHAPES, SIZES, make_scene
from polyfocus.synthworld.tasks import AnswerBalance, WorldStats, make_task

PLACEHOLDER = -1  # the image's positions in the encoded ids, replaced by the scene's tokens
ONE_HOT = [*SHAPES, *COLOURS, *SIZES]


def make_split(n: int, split: str) -> list[tuple]:
    """n scenes at the demo's settings, each with its tasks (one per family it can ask), answers balanced."""
    scenes = [make_scene(f"bound/{split}/{i}", DEFAULT_IMAGE_SIZE, 3, sizes=DEMO_SIZES) for i in range(n)]
    stats, balance = WorldStats.from_scenes(scenes), AnswerBalance()
    split_tasks = [[t for f in VQA_FAMILIES if (t := make_task(s, f, stats=stats, balance=balance))] for s in scenes]
    rng = random.Random(f"bound/{split}/turns")
    for tasks in split_tasks:
        rng.shuffle(tasks)
    return list(zip(scenes, split_tasks))


def oracle_tokens(scene) -> torch.Tensor:
    """64 x len(ONE_HOT): per patch, the one-hot shape, colour and size of the object it touches."""
    x = torch.zeros(len(patches((0, 0, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))), len(ONE_HOT))
    for obj in scene.objects:
        for p in patches(obj.box):
            x[p, [ONE_HOT.index(obj.shape), ONE_HOT.index(obj.colour), ONE_HOT.index(obj.size)]] = 1.0
    return x


def scene_text(scene) -> str:
    return " " + ". ".join(f"{o.size} {o.colour} {o.shape}" for o in scene.objects) + "."


class SceneLLM(nn.Module):
    """The demo's LLM with the image's positions filled by the oracle's projected tokens or the scene's text."""

    def __init__(self, tokenizer, inputs: str, oracle_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                 llm: dict | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        from polyfocus.demo import demo_model_config
        from polyfocus.model.presets import tiny_config

        llm = dict(llm or {})  # tiny_config's LLM keywords ({"text": "llama"}), then any other field of the config
        shape = {k: llm.pop(k) for k in ("text", "hidden_size", "text_layers") if k in llm}
        config = tiny_config(vocab_size=len(tokenizer), **demo_model_config(overrides=shape)).text_config
        for name, value in llm.items():  # e.g. {"initializer_range": 0.088}
            setattr(config, name, value)
        self.llm, self.tokenizer, self.inputs = AutoModelForCausalLM.from_config(config), tokenizer, inputs
        self.oracle_mean, self.oracle_std = oracle_stats or (torch.zeros(len(ONE_HOT)), torch.ones(len(ONE_HOT)))
        self.projector = build_projector("mlp2x_gelu", len(ONE_HOT), config.hidden_size)

    def scene_embeddings(self, scene) -> torch.Tensor:
        if self.inputs == "oracle":
            return self.projector((oracle_tokens(scene) - self.oracle_mean) / self.oracle_std)
        ids = self.tokenizer(scene_text(scene), add_special_tokens=False)["input_ids"]
        return self.llm.get_input_embeddings()(torch.tensor(ids))

    def example(self, scene, tasks) -> tuple[torch.Tensor, list[int]]:
        """(embeddings, labels) of one conversation about scene: its tasks in turn, the image in the first."""
        image = self.scene_embeddings(scene)
        messages = []
        for k, task in enumerate(tasks):
            messages += [{"role": "user", "content": ("<image>\n" if k == 0 else "") + task.prompt},
                         {"role": "assistant", "content": task.answer}]
        encoded = encode(messages, self.tokenizer, "vicuna_v1", PLACEHOLDER, [len(image)])
        ids = torch.tensor(encoded.input_ids)
        embeddings = self.llm.get_input_embeddings()(ids.clamp(min=0))
        embeddings[ids == PLACEHOLDER] = image
        return embeddings, encoded.labels

    def forward(self, examples):
        """examples: (scene, tasks) pairs; right-padded into one batch; returns the output and the labels."""
        rows = [self.example(scene, tasks) for scene, tasks in examples]
        length = max(len(labels) for _, labels in rows)
        inputs = torch.stack([nn.functional.pad(e, (0, 0, 0, length - len(e))) for e, _ in rows])
        labels = torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in rows])
        mask = (torch.arange(length)[None] < torch.tensor([len(lab) for _, lab in rows])[:, None]).long()
        return self.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels), labels


def evaluate(model: SceneLLM, test, batch_size: int = 64) -> dict:
    """Per family: the share of held-out questions whose answer tokens are all the model's greedy choices."""
    questions = [(scene, [task]) for scene, tasks in test for task in tasks]
    right = Counter()
    model.eval()
    with torch.no_grad():
        for i in range(0, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            out, labels = model(batch)
            guess, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
            for (_, (task,)), g, t in zip(batch, guess, target):
                right[task.family] += bool((g[t != -100] == t[t != -100]).all())
    model.train()
    asked = Counter(task.family for _, tasks in test for task in tasks)
    return {family: round(100 * right[family] / asked[family], 1) for family in VQA_FAMILIES}


def train(inputs: str, tokenizer, train_split, test, steps: int, batch_size: int, lr: float, seed: int,
          llm: dict | None = None) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    tokens = torch.cat([oracle_tokens(scene) for scene, _ in train_split[:256]])  # the demo calibrates on 256 images
    model = SceneLLM(tokenizer, inputs, (tokens.mean(0), tokens.std(0).clamp(min=1e-6)), llm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)  # the demo's (train/args.py)
    rng = random.Random(seed)
    for _ in range(steps):
        out, _ = model(rng.sample(train_split, batch_size))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return evaluate(model, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--steps", default="800", help="run lengths, comma-separated: one run each (its own cosine "
                                                       "schedule); 800 is the demo's stage 2")
    parser.add_argument("--inputs", default="oracle,text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llm", type=json.loads, default=None,
                        help='the LLM over the demo\'s: tiny_config\'s text, hidden_size, text_layers, then any '
                             'config field, e.g. \'{"text": "llama"}\' or \'{"initializer_range": 0.088}\'')
    args = parser.parse_args()
    train_split, test = make_split(args.scenes, "train"), make_split(args.test_scenes, "test")
    answers = {f: Counter(t.answer for _, tasks in test for t in tasks if t.family == f) for f in VQA_FAMILIES}
    record = {"bench": "demo_llm_bound", **vars(args),
              "majority": {f: round(100 * max(c.values()) / sum(c.values()), 1) for f, c in answers.items()}}
    from polyfocus.data.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as work:
        tokenizer = build_tokenizer(save_dir=Path(work) / "tokenizer")
    for inputs in args.inputs.split(","):
        record[inputs] = {steps: train(inputs, tokenizer, train_split, test, int(steps), args.batch_size, args.lr,
                                       args.seed, args.llm) for steps in args.steps.split(",")}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
