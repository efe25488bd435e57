"""Pretraining a vision tower on labelled object boxes: the demo's stand-in for CLIP.

LLaVA starts from a pretrained CLIP tower. Nothing can be downloaded here, and a random tower hands the LLM
features in which a small object is lost in the background: trained end to end from random weights, the
demo model stayed at the majority answer on colour and shape (docs/benchmarks.md). So the demo first
teaches its tower what objects look like, the way a detector backbone is taught: the features of the layer
the LLM will read are pooled over each object's box (each patch weighted by the fraction of it the box
covers) and classified into the object's attributes (colour and shape on synthworld). The result is saved
as a plain transformers vision checkpoint, the kind of directory `vision_tower:` takes, and stays frozen in
stages 1 and 2 as LLaVA's CLIP does.

    python -c "from polyfocus.train.tower import pretrain_tower; help(pretrain_tower)"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, Trainer, TrainingArguments

from polyfocus.data.images import ImageProcessor, load_image


def box_weights(boxes: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Pooling weights of each box over the patch grid: the covered fraction of every patch, normalised.

    boxes: [O, 4] pixel (x1, y1, x2, y2), half-open  →  [O, G*G] (row-major, as the tower orders patches)
    """
    edges = torch.arange(0, image_size + 1, patch_size, dtype=torch.float32)  # G + 1 patch borders
    lo, hi = edges[:-1], edges[1:]

    def overlap(a, b):  # [O] x [O] → [O, G]: pixels of each patch row/column inside [a, b)
        return (torch.minimum(b[:, None], hi) - torch.maximum(a[:, None], lo)).clamp(min=0)

    boxes = boxes.float()
    cover = overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]  # [O, G, G]
    cover = cover.flatten(1)
    return cover / cover.sum(1, keepdim=True)


class ObjectBoxes(torch.utils.data.Dataset):
    """Images with labelled object boxes, from a synthworld export (scenes.jsonl + images/)."""

    def __init__(self, data_dir: str | Path, split: str, image_processor: ImageProcessor, patch_size: int,
                 attributes: dict[str, list[str]]):
        self.data_dir, self.processor, self.patch_size, self.attributes = Path(data_dir), image_processor, patch_size, attributes
        with open(self.data_dir / "scenes.jsonl") as f:
            self.scenes = [s for s in map(json.loads, f) if s["split"] == split]
        if not self.scenes:
            raise ValueError(f"{self.data_dir / 'scenes.jsonl'}: no scenes of split {split!r}")

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        scene = self.scenes[i]
        size = self.processor.image_size
        if scene["image_size"] != size:
            raise ValueError(f"scene {scene['id']}: rendered at {scene['image_size']} px, the tower reads {size} px")
        item = {"pixel_values": self.processor([load_image(self.data_dir / "images" / f"{scene['id']}.png")])[0],
                "box_weights": box_weights(torch.tensor([o["box"] for o in scene["objects"]]), size, self.patch_size)}
        for name, values in self.attributes.items():
            item[name] = torch.tensor([values.index(o[name]) for o in scene["objects"]])
        return item


def collate_objects(items: list[dict]) -> dict:
    """Images stack; objects (a different number per image) concatenate, with the index of their image."""
    batch = {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
             "image_index": torch.cat([torch.full((len(x["box_weights"]),), i) for i, x in enumerate(items)])}
    for key in items[0]:
        if key != "pixel_values":
            batch[key] = torch.cat([x[key] for x in items])
    return batch


class ObjectClassifier(nn.Module):
    """Tower + one linear head per attribute over box-pooled features of layer `select_layer` (CLS dropped)."""

    def __init__(self, tower: nn.Module, select_layer: int, attributes: dict[str, list[str]]):
        super().__init__()
        self.tower, self.select_layer = tower, select_layer
        self.heads = nn.ModuleDict({name: nn.Linear(tower.config.hidden_size, len(values))
                                    for name, values in attributes.items()})

    def forward(self, pixel_values, box_weights, image_index, **labels):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        patches = hidden[:, -box_weights.shape[1]:]  # [B, G*G, C]: the patch tokens, after any CLS
        pooled = torch.einsum("op,opc->oc", box_weights, patches[image_index])  # [O, C]
        logits = {name: head(pooled) for name, head in self.heads.items()}
        loss = sum(nn.functional.cross_entropy(logits[name], labels[name]) for name in self.heads)
        return {"loss": loss, "correct": {name: logits[name].argmax(-1) == labels[name] for name in logits}}


@torch.no_grad()
def object_accuracy(model: ObjectClassifier, dataset: ObjectBoxes, batch_size: int = 64) -> dict[str, float]:
    """Fraction of objects whose attribute the pooled features classify correctly, per attribute."""
    model.eval()
    correct = {name: [] for name in model.heads}
    for start in range(0, len(dataset), batch_size):
        batch = collate_objects([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for name, ok in model(**batch)["correct"].items():
            correct[name].append(ok)
    return {name: torch.cat(ok).float().mean().item() for name, ok in correct.items()}


def pretrain_tower(vision_config, data_dir: str | Path, out_dir: str | Path, steps: int = 1500,
                   batch_size: int = 32, learning_rate: float = 2e-3, select_layer: int = -2, split: str = "pretrain",
                   test_split: str | None = "test", seed: int = 0) -> dict[str, float]:
    """Train a fresh tower of `vision_config` on synthworld's object colours and shapes and save it to out_dir;
    return its object accuracy on `test_split` (empty without one).

    Cosine schedule with warmup through transformers' Trainer (progress bar and logs as in `polyfocus train`).
    """
    from polyfocus.data.synthworld import COLOURS, SHAPES

    torch.manual_seed(seed)
    attributes = {"colour": list(COLOURS), "shape": list(SHAPES)}
    tower = AutoModel.from_config(vision_config)
    processor = ImageProcessor(image_size=vision_config.image_size)
    dataset = ObjectBoxes(data_dir, split, processor, vision_config.patch_size, attributes)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
                             weight_decay=0.0, logging_steps=50, save_strategy="no", report_to="none",
                             remove_unused_columns=False, dataloader_num_workers=0, seed=seed)
    model = ObjectClassifier(tower, select_layer, attributes)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate_objects).train()
    tower.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if test_split is None:
        return {}
    return object_accuracy(model, ObjectBoxes(data_dir, test_split, processor, vision_config.patch_size, attributes))
