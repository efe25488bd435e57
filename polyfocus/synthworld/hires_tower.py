"""Pretraining MG-LLaVA's high-resolution ConvNeXt on synthworld: the demo's stand-in for CLIP-ConvNeXt.

MG-LLaVA freezes an open_clip CLIP-ConvNeXt-L; nothing can be downloaded here and a random tower gives the LLM
nothing to read (docs/benchmarks.md, for the CLIP stand-in), so the demo teaches a small ConvNeXt what synthworld's
objects look like, as polyfocus/synthworld/tower.py does for the low-resolution tower. Each object's box is pooled from
the tower exactly as the object tokens pool it (`box_features`: RoIAlign mean over the multi-stage map) and, apart,
from the last stage alone (what the Conv-Gate fuses); linear heads classify the object's colour and shape and, since
this tower sees the image at the high resolution where the label plates are readable, each character of a plate
(its box cut into one column per character). The result is a plain transformers ConvNeXt checkpoint, the kind of
directory `hires_tower:` takes, frozen in stages 1 and 2 as MG-LLaVA's.

    python -c "from polyfocus.synthworld.hires_tower import pretrain_hires_tower; help(pretrain_hires_tower)"
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextModel, Trainer, TrainingArguments

from polyfocus.data.images import ImageProcessor
from polyfocus.model.hires import hires_stages
from polyfocus.model.objects import box_features
from polyfocus.synthworld.tower import attribute_accuracy

OBJECT_ATTRIBUTES = ("colour", "shape")


def synthworld_attributes() -> dict[str, list[str]]:
    """Labels per head: an object's colour and shape; a character of a label plate."""
    from polyfocus.synthworld.scenes import CODE_ALPHABET, COLOURS, SHAPES

    return {"colour": list(COLOURS), "shape": list(SHAPES), "char": list(CODE_ALPHABET)}


def character_boxes(plate, n: int) -> list[list[float]]:
    """A label plate's box cut into n equal columns, one per character (synthworld centres the code on it)."""
    x1, y1, x2, y2 = plate
    width = (x2 - x1) / n
    return [[x1 + k * width, y1, x1 + (k + 1) * width, y2] for k in range(n)]


class SceneBoxes(torch.utils.data.Dataset):
    """Fresh synthworld scenes at the tower's resolution: pixels, the objects' boxes and colours and shapes, the
    label plates' boxes and characters."""

    def __init__(self, n: int, image_size: int, max_objects: int = 3, split: str = "hires-tower", seed: int = 0):
        self.n, self.max_objects, self.split, self.seed = n, max_objects, split, seed
        self.processor = ImageProcessor(image_size=image_size)
        self.attributes = synthworld_attributes()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from polyfocus.synthworld.scenes import make_scene, render

        scene = make_scene(f"{self.seed}/{self.split}/{i}", self.processor.image_size, self.max_objects)
        plates = [o for o in scene.objects if o.code]
        chars = [box for o in plates for box in character_boxes(o.code_box, len(o.code))]
        item = {"pixel_values": self.processor([render(scene)])[0],
                "boxes": torch.tensor([o.box for o in scene.objects], dtype=torch.float32),
                "plates": torch.tensor(chars, dtype=torch.float32).view(-1, 4),
                "char": torch.tensor([self.attributes["char"].index(c) for o in plates for c in o.code],
                                     dtype=torch.long)}
        for name in OBJECT_ATTRIBUTES:
            item[name] = torch.tensor([self.attributes[name].index(getattr(o, name)) for o in scene.objects])
        return item


def _indexed(items: list[dict], key: str) -> torch.Tensor:
    return torch.cat([torch.cat([torch.full((len(x[key]), 1), float(i)), x[key]], 1) for i, x in enumerate(items)])


def collate_boxes(items: list[dict]) -> dict:
    """Images stack; object and plate boxes become [K, 5] (image index, x1, y1, x2, y2); labels concatenate."""
    batch = {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
             "image_boxes": _indexed(items, "boxes"), "plate_boxes": _indexed(items, "plates")}
    for key in items[0]:
        if key not in ("pixel_values", "boxes", "plates"):
            batch[key] = torch.cat([x[key] for x in items])
    return batch


class BoxClassifier(nn.Module):
    """ConvNeXt + per-attribute linear heads on two views of each box: the object tokens' (multi-stage RoI mean) and
    the Conv-Gate's (the last stage's slice of it). Objects → colour, shape; plates → their characters."""

    def __init__(self, tower: ConvNextModel, attributes: dict[str, list[str]]):
        super().__init__()
        self.tower, self.attributes = tower, attributes
        widths = tower.config.hidden_sizes
        self.heads = nn.ModuleDict({name: nn.Linear(sum(widths), len(values)) for name, values in attributes.items()})
        self.last_heads = nn.ModuleDict({name: nn.Linear(widths[-1], len(values))
                                         for name, values in attributes.items()})

    def forward(self, pixel_values, image_boxes, plate_boxes, **labels):
        stages = hires_stages(self.tower, pixel_values)
        size, last = pixel_values.shape[-1], self.tower.config.hidden_sizes[-1]
        pooled = {"objects": box_features(stages, image_boxes, size)}  # [K, sum C_s]
        if len(plate_boxes):
            pooled["plates"] = box_features(stages, plate_boxes, size)
        loss, correct = 0.0, {}
        for name in self.heads:
            view = pooled.get("objects" if name in OBJECT_ATTRIBUTES else "plates")
            if view is None:
                continue
            logits = self.heads[name](view)
            loss = loss + nn.functional.cross_entropy(logits, labels[name]) + nn.functional.cross_entropy(
                self.last_heads[name](view[:, -last:]), labels[name])
            correct[name] = logits.argmax(-1) == labels[name]
        return {"loss": loss, "correct": correct}


def pretrain_hires_tower(config: ConvNextConfig, out_dir: str | Path, image_size: int, steps: int = 1500,
                         batch_size: int = 16, learning_rate: float = 2e-3, max_objects: int = 3, seed: int = 0,
                         test_scenes: int = 200) -> dict[str, float]:
    """Train a fresh ConvNeXt of `config` on synthworld scenes rendered at `image_size` (the model's
    hires_image_size) and save it to out_dir; return its held-out box accuracy per attribute."""
    torch.manual_seed(seed)
    attributes = synthworld_attributes()
    tower = ConvNextModel(config)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
                             weight_decay=0.0, logging_steps=50, save_strategy="no", report_to="none",
                             remove_unused_columns=False, dataloader_num_workers=0, seed=seed,
                             dataloader_pin_memory=torch.cuda.is_available())
    model = BoxClassifier(tower, attributes)
    train = SceneBoxes(steps * batch_size, image_size, max_objects, seed=seed)
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate_boxes).train()
    tower.save_pretrained(out_dir)
    test = SceneBoxes(test_scenes, image_size, max_objects, "hires-tower-test", seed)
    return attribute_accuracy(model, test, collate_boxes, batch_size=32)
