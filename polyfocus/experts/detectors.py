"""Object detectors: an image (and text queries) in, its boxes out as a `BoxRecord` (pixels of the image, a score and
a label each). One home for every detector, whoever asks: MG-LLaVA's object tokens (`box_detector`, `polyfocus
boxes`) and DenseFusion's detection experts (polyfocus/experts/owlv2.py).

- `OpenVocabularyDetector`: OWLv2 / OWL-ViT / Grounding DINO through transformers, from a local directory. OWLv2 and
  OWL-ViT are asked "a photo of {tag}"; Grounding DINO one "tag. tag." prompt. OWLv2 batches images with different
  query lists (padding queries masked, as Owlv2Processor pads a batch); boxes come back in the original image's
  pixels (transformers' post-processing undoes OWLv2's pad-to-square).
- `TaggedDetector`: MG-LLaVA's box generator: an image tagger's tags are that image's queries (RAM++ then OWLv2;
  here the CLIP tagger, RAM++ not being loadable through transformers).
- Named detectors (`register_detector`): detectors that live with what they detect register a name, e.g. synthworld's
  pixel detector registers "synthworld" (polyfocus/synthworld/detector.py), so a model config's `box_detector:
  synthworld` resolves here without this package knowing the world it detects in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from polyfocus.data.boxes import BoxRecord
from polyfocus.data.files import require_local
from polyfocus.experts.base import default_device, hf_image_processor

KINDS = ("owlv2", "owlvit", "grounding-dino")
DEFAULT_THRESHOLDS = {"owlv2": 0.2, "owlvit": 0.2, "grounding-dino": 0.35}  # MG-LLaVA's OWLv2 generator; GD's own
DETECTORS: dict[str, Callable[..., Callable]] = {}  # name -> factory(queries) of a named detector


def register_detector(name: str, factory: Callable[..., Callable]) -> None:
    """Make `box_detector: <name>` (and `polyfocus boxes --detector <name>`) build `factory(queries)`."""
    DETECTORS[name] = factory


def normalized(queries: Sequence[str]) -> list[str]:
    return [q.strip().lower() for q in queries]


class OpenVocabularyDetector:
    """An open-vocabulary detector through transformers, from a local directory (see the module docstring).

    queries: the tags to look for when a call brings none; threshold: keep boxes scoring above it (None: the kind's
    default); template: how OWLv2 / OWL-ViT are asked about a tag."""

    def __init__(self, path: str | os.PathLike, queries: Sequence[str] | None = None, threshold: float | None = None,
                 device: str | None = None, template: str = "a photo of {}"):
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor, AutoTokenizer

        path = require_local(path, "detector")
        self.kind = AutoConfig.from_pretrained(path).model_type
        if self.kind not in KINDS:
            raise ValueError(f"{path}: model_type {self.kind!r} is not OWLv2, OWL-ViT or Grounding DINO")
        self.queries = normalized(queries) if queries is not None else None
        self.threshold = float(threshold) if threshold is not None else DEFAULT_THRESHOLDS[self.kind]
        self.template, self.device = template, default_device(device)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(self.device).eval()
        if self.kind == "owlv2":  # batched by hand (below): the tokenizer and the image processor apart
            self.tokenizer, self.image_processor = AutoTokenizer.from_pretrained(path), hf_image_processor(path)
            self.text_length = self.model.config.text_config.max_position_embeddings  # OWLv2 pads queries to this
        else:
            self.processor = AutoProcessor.from_pretrained(path)

    def __call__(self, image: Image.Image, queries: Sequence[str] | None = None) -> BoxRecord:
        """One image's boxes, truncated to integer pixels as MG-LLaVA's generator writes them. queries: this image's
        (a tagger's), instead of the detector's own; none at all: no boxes."""
        queries = normalized(queries) if queries is not None else self.queries
        if not queries:
            return BoxRecord()
        record = self.detect([image.convert("RGB")], [queries])[0]
        return BoxRecord([[float(int(v)) for v in box] for box in record.boxes], record.scores, record.labels)

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], queries: Sequence[Sequence[str]]) -> list[BoxRecord]:
        """Each image's boxes above the threshold (float pixels of that image), asked with that image's queries."""
        if self.kind == "owlv2":
            return self._detect_owlv2(images, queries) if images else []
        return [self._detect_one(image, list(q)) for image, q in zip(images, queries)]

    def _detect_owlv2(self, images, queries) -> list[BoxRecord]:
        n = max(len(q) for q in queries)
        # as Owlv2Processor pads a batch: every image gets n queries, the missing ones " "
        texts = [text for q in queries for text in [self.template.format(t) for t in q] + [" "] * (n - len(q))]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.text_length, truncation=True,
                                return_tensors="pt").to(self.device)
        padding = torch.tensor([i >= len(q) for q in queries for i in range(n)], device=self.device)
        tokens["input_ids"][padding, 0] = 0  # OWLv2 masks a query whose first token is 0 (its logits -> -inf)
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        outputs = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             pixel_values=pixels)
        sizes = [(image.height, image.width) for image in images]
        results = self.image_processor.post_process_object_detection(outputs, threshold=self.threshold,
                                                                     target_sizes=sizes)
        records = []
        for q, result in zip(queries, results):
            real = result["labels"] < len(q)  # padding queries are masked; this only guards it
            records.append(BoxRecord(result["boxes"][real].cpu().tolist(), result["scores"][real].cpu().tolist(),
                                     [q[i] for i in result["labels"][real].tolist()]))
        return records

    def _detect_one(self, image: Image.Image, queries: list[str]) -> BoxRecord:
        if not queries:
            return BoxRecord()
        width, height = image.size
        if self.kind == "grounding-dino":
            inputs = self.processor(images=image, text=". ".join(queries) + ".", return_tensors="pt")
            outputs = self.model(**inputs.to(self.device))
            result = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.threshold, text_threshold=0.25,
                target_sizes=[(height, width)])[0]
            labels = list(result["text_labels"])
        else:  # OWL-ViT: no padding to a square
            inputs = self.processor(text=[[self.template.format(q) for q in queries]], images=image, padding=True,
                                    truncation=True, return_tensors="pt")
            outputs = self.model(**inputs.to(self.device))
            result = self.processor.post_process_grounded_object_detection(outputs, threshold=self.threshold,
                                                                           target_sizes=[(height, width)])[0]
            labels = [queries[int(i)] for i in result["labels"]]
        return BoxRecord(result["boxes"].cpu().tolist(), [float(s) for s in result["scores"].tolist()], labels)


class TaggedDetector:
    """MG-LLaVA's box generator: an image tagger's tags are that image's detector queries. An image with no tags
    gets no boxes."""

    def __init__(self, tagger, detector):
        self.tagger, self.detector = tagger, detector

    def __call__(self, image: Image.Image) -> BoxRecord:
        tags = self.tagger.tags_of([image])[0]
        return self.detector(image, queries=tags) if tags else BoxRecord()


def make_detector(spec: str, queries: Sequence[str] | None = None, threshold: float | None = None, tagger=None):
    """A registered name ("synthworld") or a local detector directory (OWLv2 / OWL-ViT / Grounding DINO) → a
    callable image → BoxRecord. tagger: an image tagger (`tags_of(images)`, e.g. the CLIP tagger) whose tags replace
    `queries`."""
    if tagger is not None and queries:
        raise ValueError("give the detector fixed queries or a tagger, not both")
    if spec in DETECTORS:
        detector = DETECTORS[spec](queries)
    elif not Path(spec, "config.json").is_file():
        names = " / ".join(repr(n) for n in DETECTORS) or "a registered name"
        raise ValueError(f"box detector {spec!r}: use {names} or a local OWLv2 / Grounding DINO directory "
                         "(with config.json)")
    else:
        if tagger is None and not queries:
            raise ValueError(f"{spec}: an open-vocabulary detector needs text queries (box_queries / --queries: the "
                             "tags to look for, or --tagger)")
        detector = OpenVocabularyDetector(spec, None if tagger is not None else queries, threshold)
    return TaggedDetector(tagger, detector) if tagger is not None else detector


def model_detector(config) -> Callable | None:
    """The detector a model config names (`box_detector`, asked with `box_queries`), or None."""
    return make_detector(config.box_detector, config.box_queries) if config.box_detector else None
