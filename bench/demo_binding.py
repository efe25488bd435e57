"""Where the demo's accuracy stops: do the tower's features let a question's words find their object, and does the
demo's LLM learn to? One JSON line.

Both learners read the same frozen DINOv2 layer-6 patch features (standardised per channel, the demo's projector
MLP on top) of scenes at the demo's settings, and must name the colour of the object a phrase picks out — the phrase
a colour question names it by ("the star", or "the large star" when the scene has two stars; objects that no phrase
without their colour picks out alone are left out, as the questions leave them out):

- `probe`: one cross-attention whose query is a learned vector per phrase, the answer read from its output — the
  binding alone, one hop from the words to the patches;
- `llm`: the demo's earlier LLM (Llama 2 x 128 from random weights) after the image, trained on captions
  "Objects: large star red, hexagon blue." — the colour follows its phrase, so this too is one hop (the shape
  token's own query to the patches), with nothing to route.

Reported per scene size (1, 2, 3 objects): held-out colour accuracy, and the attention the phrase puts on its
object's patches vs on the other objects' patches (the LLM: its most selective head, chosen per object among all
layers' heads — an optimistic reading, said so where quoted). Same steps, batch and
learning rate for both. docs/benchmarks.md ("The demo's accuracy target") reads it.

    python bench/demo_binding.py [--scenes 4000] [--steps 800]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polyfocus.checkpoints.dinov2 import dinov2_s
from polyfocus.demo import DEFAULT_IMAGE_SIZE, DEMO_SIZES, DINOV2_LAYER
from polyfocus.model.projector import build_projector
from polyfocus.synthworld.scenes import make_scene, render
from polyfocus.synthworld.tasks import refer

PATCH = 14


def scenes_and_features(n: int, split: str, tower):
    """n scenes at the demo's settings and their layer-6 patch features (n x 64 x 384)."""
    config = json.loads((Path(tower.name_or_path) / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(config[k]).view(3, 1, 1) for k in ("image_mean", "image_std"))
    scenes = [make_scene(f"binding/{split}/{i}", DEFAULT_IMAGE_SIZE, 3, sizes=DEMO_SIZES) for i in range(n)]
    features = []
    with torch.no_grad():
        for i in range(0, n, 64):
            pixels = torch.stack([(torch.from_numpy(np.asarray(render(s).convert("RGB"), dtype=np.float32) / 255)
                                   .permute(2, 0, 1) - mean) / std for s in scenes[i:i + 64]])
            features.append(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[DINOV2_LAYER][:, 1:])
    return scenes, torch.cat(features)


def patches(box) -> list[int]:
    """Indices of the 14 px patches (row-major on the 8 x 8 grid) that a pixel box touches."""
    x0, y0, x1, y1 = box
    grid = DEFAULT_IMAGE_SIZE // PATCH
    return [r * grid + c for r in range(grid) for c in range(grid)
            if not (c * PATCH >= x1 or (c + 1) * PATCH <= x0 or r * PATCH >= y1 or (r + 1) * PATCH <= y0)]


def attention_share(weights, obj, objects) -> tuple[float, float]:
    """weights: 64 attention weights over the patches; the mass on obj's patches and on the other objects' ones."""
    own = patches(obj.box)
    others = {p for o in objects if o is not obj for p in patches(o.box)} - set(own)
    return float(weights[own].sum()), float(weights[sorted(others)].sum()) if others else 0.0


def named(scene) -> list[tuple]:
    """(object, the phrase a colour question names it by, "the large star") for every object that has one: size and
    shape alone fit more than one object for 23 % of the objects of demo scenes (synthworld groups objects by shape)."""
    return [(o, phrase) for o in scene.objects if (phrase := refer(scene, o, without="colour"))]


def summarise(records) -> dict:
    """records: (objects in the scene, correct, attention on the object, on the others)."""
    by_size = defaultdict(list)
    for size, *values in records:
        by_size[size].append(values)
    return {str(size): dict(zip(("accuracy", "attention_on_object", "attention_on_others"),
                                (round(float(v), 3) for v in np.mean(rows, axis=0))))
            for size, rows in sorted(by_size.items())}


def run_probe(train, test, steps, batch_size, lr, seed) -> dict:
    (train_scenes, train_x), (test_scenes, test_x) = train, test
    colours = sorted({o.colour for s in train_scenes for o in s.objects})
    phrases = sorted({phrase for s in train_scenes for _, phrase in named(s)})
    torch.manual_seed(seed)
    project, query = build_projector("mlp2x_gelu", 384, 128), nn.Embedding(len(phrases), 128)
    attend, read = nn.MultiheadAttention(128, 4, batch_first=True), nn.Linear(128, len(colours))
    params = [p for m in (project, query, attend, read) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def forward(x, objects):
        keys = project(x)
        q = query(torch.tensor([phrases.index(phrase) for _, phrase in objects]))[:, None]
        out, weights = attend(q, keys, keys)
        return read(out[:, 0]), weights[:, 0]

    train_named = [named(s) for s in train_scenes]
    rng, usable = random.Random(seed), [i for i, n in enumerate(train_named) if n]
    for _ in range(steps):
        idx = rng.sample(usable, batch_size)
        objects = [rng.choice(train_named[i]) for i in idx]
        logits, _ = forward(train_x[idx], objects)
        loss = nn.functional.cross_entropy(logits, torch.tensor([colours.index(o.colour) for o, _ in objects]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    records = []
    with torch.no_grad():
        for scene, x in zip(test_scenes, test_x):
            objects = named(scene)
            if not objects:  # no object of this scene can be named without its colour
                continue
            logits, weights = forward(x.expand(len(objects), -1, -1), objects)
            for (obj, _), guess, w in zip(objects, logits.argmax(-1), weights):
                records.append((len(scene.objects), colours[guess] == obj.colour, *attention_share(w, obj, scene.objects)))
    return summarise(records)


def run_llm(train, test, steps, batch_size, lr, seed, work: Path) -> dict:
    from transformers import LlamaForCausalLM

    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.demo import demo_model_config
    from polyfocus.model.presets import tiny_config

    (train_scenes, train_x), (test_scenes, test_x) = train, test
    tokenizer = build_tokenizer(save_dir=work / "tokenizer")
    torch.manual_seed(seed)
    # Llama: the demo's LLM when this bench's figures were taken (docs/benchmarks.md); the demo's is Qwen3's now
    config = tiny_config(vocab_size=len(tokenizer), **demo_model_config(overrides={"text": "llama"})).text_config
    config._attn_implementation = "eager"  # attention weights are read
    llm, project = LlamaForCausalLM(config), build_projector("mlp2x_gelu", 384, config.hidden_size)
    params = list(llm.parameters()) + list(project.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    prefix = tokenizer("Objects:", add_special_tokens=False)["input_ids"]

    def caption(objects):
        """Token ids and, per object, the position of its shape word's (last) token and of its colour's first."""
        ids, where = list(prefix), []
        for k, (o, phrase) in enumerate(objects):
            ids += tokenizer(("," if k else "") + " " + phrase.removeprefix("the "), add_special_tokens=False)["input_ids"]
            where.append(len(ids) - 1)
            ids += tokenizer(" " + o.colour, add_special_tokens=False)["input_ids"]
        return ids + tokenizer(".", add_special_tokens=False)["input_ids"], where

    def embed(x, objects):
        ids, where = caption(objects)
        return torch.cat([project(x), llm.get_input_embeddings()(torch.tensor(ids))]), ids, where

    train_named = [named(s) for s in train_scenes]
    rng, usable = random.Random(seed), [i for i, n in enumerate(train_named) if n]
    for _ in range(steps):
        rows = []
        for i in rng.sample(usable, batch_size):
            objects = train_named[i]
            emb, ids, _ = embed(train_x[i], rng.sample(objects, len(objects)))
            rows.append((emb, [-100] * train_x.shape[1] + ids))
        length = max(len(r[1]) for r in rows)
        inputs = torch.stack([nn.functional.pad(e, (0, 0, 0, length - len(e))) for e, _ in rows])
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in rows])
        mask = (torch.arange(length)[None] < torch.tensor([len(lab) for _, lab in rows])[:, None]).long()
        loss = llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    records, n_image = [], test_x.shape[1]
    with torch.no_grad():
        for scene, x in zip(test_scenes, test_x):
            objects = named(scene)
            if not objects:
                continue
            emb, ids, where = embed(x, objects)
            out = llm(inputs_embeds=emb[None], output_attentions=True)
            for (obj, _), pos in zip(objects, where):
                right = out.logits[0, n_image + pos].argmax().item() == ids[pos + 1]
                shares = [max((attention_share(layer[0, h, n_image + pos, :n_image], obj, scene.objects)
                               for h in range(layer.shape[1])), key=lambda s: s[0] - s[1])
                          for layer in out.attentions]  # per layer, the head most selective for this object
                records.append((len(scene.objects), right, *max(shares, key=lambda s: s[0] - s[1])))
    return summarise(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import Dinov2Model

    tower = Dinov2Model.from_pretrained(dinov2_s(image_size=DEFAULT_IMAGE_SIZE, quiet=True)).eval()
    train = scenes_and_features(args.scenes, "train", tower)
    test = scenes_and_features(args.test_scenes, "test", tower)
    mean, std = train[1].mean((0, 1)), train[1].std((0, 1))  # the demo's per-channel standardisation
    train, test = [(s, (x - mean) / std) for s, x in (train, test)]
    with tempfile.TemporaryDirectory() as work:
        record = {"bench": "demo_binding", **vars(args),
                  "probe": run_probe(train, test, args.steps, args.batch_size, args.lr, args.seed),
                  "llm": run_llm(train, test, args.steps, args.batch_size, args.lr, args.seed, Path(work))}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
