"""Zero-shot image tagging with a CLIP model over a tag vocabulary: the stand-in for DenseFusion's RAM++ (spec §3),
whose tags serve as the text queries of open-set detection (OWLv2). RAM++ is not in transformers; CLIP is.

    p = softmax(logit_scale * norm(image_features) @ norm(text_features).T)   [B, T], texts = template.format(tag)
    tags = the top_k tags of p with p >= min_probability, best first

CLIP's softmax ranks the vocabulary for each image; RAM++ scores each tag independently. Keeping the top few above a
small probability floor is our reading of "tags of the image" with CLIP (docs/densefusion.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from polyfocus.data.files import require_local
from polyfocus.experts.base import Expert, Item, default_device, hf_image_processor, pooled


def read_vocabulary(vocabulary: str | os.PathLike | list[str]) -> list[str]:
    """A list of tags, or a text file with one tag per line (blank lines and # comments skipped)."""
    if isinstance(vocabulary, (str, os.PathLike)):
        with open(vocabulary, encoding="utf-8") as f:
            tags = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    else:
        tags = [str(t).strip() for t in vocabulary]
    if not tags or len(set(tags)) != len(tags):
        raise ValueError(f"tag vocabulary {vocabulary!r}: needs distinct, non-empty tags")
    return tags


class CLIPTagger(Expert):
    name = "tags"

    def __init__(self, model: str, vocabulary: str | list[str], template: str = "a photo of a {}.", top_k: int = 10,
                 min_probability: float = 0.01, device: str | None = None):
        """model: a local CLIP directory (weights, tokenizer, preprocessor_config.json); vocabulary: a tag file or
        list."""
        from transformers import AutoModel, AutoTokenizer

        model = require_local(model, "tagger")
        self.tags = read_vocabulary(vocabulary)
        self.top_k, self.min_probability = int(top_k), float(min_probability)
        self.device = default_device(device)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        self.processor = hf_image_processor(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        texts = tokenizer([template.format(tag) for tag in self.tags], padding=True, return_tensors="pt")
        with torch.inference_mode():
            self.text_features = F.normalize(pooled(self.model.get_text_features(**texts.to(self.device))), dim=-1)

    @torch.inference_mode()
    def probabilities(self, images) -> torch.Tensor:
        """[B] images -> [B, T] each tag's probability (softmax over the vocabulary)."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        image_features = F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        logits = self.model.logit_scale.exp() * image_features @ self.text_features.T
        return logits.softmax(dim=-1).float().cpu()

    def tags_of(self, images) -> list[list[str]]:
        """[B] images -> each image's tags, best first."""
        tags = []
        for p in self.probabilities(images):
            values, indices = p.topk(min(self.top_k, len(self.tags)))
            tags.append([self.tags[i] for v, i in zip(values.tolist(), indices.tolist()) if v >= self.min_probability])
        return tags

    def __call__(self, items: list[Item]) -> None:
        for item, tags in zip(items, self.tags_of([item.image for item in items])):
            item.hints.tags = tags
