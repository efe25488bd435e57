"""Pretraining a vision tower on labelled object boxes: the demo's stand-in for CLIP.

LLaVA starts from a pretrained CLIP tower. Nothing can be downloaded here, and a random tower hands the LLM
features in which a small object is lost in the background: trained end to end from random weights, the
demo model stayed at the majority answer on colour and shape (docs/benchmarks.md). So the demo first
teaches its tower what objects look like, the way a detector backbone is taught: the features of the layer
the LLM will read are pooled over each object's box (each patch weighted by the fraction of it the box
covers) and classified into the object's attributes (colour and shape on synthworld). The result is saved
as a plain transformers vision checkpoint, the kind of directory `vision_tower:` takes, and stays frozen in
stages 1 and 2 as LLaVA's CLIP does.

    python -c "from polyfocus.synthworld.tower import pretrain_tower; help(pretrain_tower)"
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from polyfocus.data.images import ImageProcessor


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


class SceneObjects(torch.utils.data.Dataset):
    """Freshly generated synthworld scenes with their objects' boxes and attributes: rendering a scene costs less
    than a millisecond, so every step sees new images (scene i of `split` is the same for every run)."""

    def __init__(self, n: int, image_processor: ImageProcessor, patch_size: int, attributes: dict[str, list[str]],
                 max_objects: int = 3, split: str = "tower", seed: int = 0):
        self.n, self.processor, self.patch_size, self.attributes = n, image_processor, patch_size, attributes
        self.max_objects, self.split, self.seed = max_objects, split, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from polyfocus.synthworld.scenes import make_scene, render

        size = self.processor.image_size
        scene = make_scene(f"{self.seed}/{self.split}/{i}", size, self.max_objects)
        item = {"pixel_values": self.processor([render(scene)])[0],
                "box_weights": box_weights(torch.tensor([o.box for o in scene.objects]), size, self.patch_size)}
        for name, values in self.attributes.items():
            item[name] = torch.tensor([values.index(getattr(o, name)) for o in scene.objects])
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
def attribute_accuracy(model: nn.Module, dataset, collate, batch_size: int = 64) -> dict[str, float]:
    """Per attribute head, the fraction of its items (objects, plate characters) the pooled features classify
    right; `model(**collate(items))["correct"]` gives a boolean per item and head. Heads that saw no item are left
    out."""
    model.eval()
    correct = {name: [] for name in model.heads}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for name, ok in model(**batch)["correct"].items():
            correct[name].append(ok)
    return {name: torch.cat(ok).float().mean().item() for name, ok in correct.items() if ok}


def pretrain_tower(vision_config, out_dir: str | Path, steps: int = 3000, batch_size: int = 32,
                   learning_rate: float = 2e-3, select_layer: int = -2, max_objects: int = 3, seed: int = 0,
                   test_scenes: int = 300, quiet: bool = False) -> dict[str, float]:
    """Train a fresh tower of `vision_config` on the colours and shapes of fresh synthworld scenes and save it to
    out_dir; return its object accuracy on `test_scenes` other scenes.

    Cosine schedule with warmup through transformers' Trainer (progress bar and logs as in `polyfocus train`).
    """
    from polyfocus.synthworld.scenes import COLOURS, SHAPES

    torch.manual_seed(seed)
    attributes = {"colour": list(COLOURS), "shape": list(SHAPES)}
    tower = AutoModel.from_config(vision_config)
    processor = ImageProcessor(image_size=vision_config.image_size)

    def scenes(n, split):
        return SceneObjects(n, processor, vision_config.patch_size, attributes, max_objects, split, seed)

    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
                             weight_decay=0.0, logging_steps=50, save_strategy="no", report_to="none",
                             remove_unused_columns=False, dataloader_num_workers=0, seed=seed, disable_tqdm=quiet,
                             dataloader_pin_memory=torch.cuda.is_available())
    model = ObjectClassifier(tower, select_layer, attributes)
    trainer = Trainer(model=model, args=args, train_dataset=scenes(steps * batch_size, "tower"),
                      data_collator=collate_objects)
    if quiet:
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    tower.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return attribute_accuracy(model, scenes(test_scenes, "tower-test"), collate_objects)
