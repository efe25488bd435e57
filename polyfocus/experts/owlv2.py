"""DenseFusion's open-vocabulary detection expert: OWLv2 (polyfocus/experts/detectors.py) queried with each image's
tags (from the "tags" expert, run before it) or with a fixed list: DenseFusion's OWL-ViTv2 queried with RAM++ tags
(spec §3, confirmed in the reference repo's issue #2).

OWLv2 predicts one box per patch and scores it against every query; the best query per box above `threshold` is
kept. Many patches see the same object, so boxes of one label that overlap by IoU > `nms_iou` keep only the best
(class-wise NMS, polyfocus.data.boxes), and at most `max_detections` remain, best first. Queries read "a photo of
{tag}" (as `polyfocus boxes` asks OWLv2); labels are the bare tags. The paper's score threshold and its "balanced
sampling" of small objects are not given; these values are ours.
"""

from __future__ import annotations

import torch

from polyfocus.data.boxes import batched_nms
from polyfocus.experts.base import Detection, Expert, Item
from polyfocus.experts.clip_tags import read_vocabulary
from polyfocus.experts.detectors import OpenVocabularyDetector


class OWLv2(Expert):
    name = "owlv2"

    def __init__(self, model: str, queries: str | list[str] | None = None, threshold: float = 0.1,
                 nms_iou: float = 0.5, max_detections: int = 20, template: str = "a photo of {}",
                 device: str | None = None):
        """model: a local OWLv2 directory (weights, tokenizer, preprocessor_config.json); queries: a fixed query file
        or list, else each image's tags."""
        self.queries = read_vocabulary(queries) if queries is not None else None
        self.nms_iou, self.max_detections = float(nms_iou), int(max_detections)
        self.detector = OpenVocabularyDetector(model, threshold=threshold, device=device, template=template)
        if self.detector.kind != "owlv2":
            raise ValueError(f"{model}: the owlv2 expert takes an OWLv2 directory, got {self.detector.kind}")

    def __call__(self, items: list[Item]) -> None:
        asked = [item for item in items if self.queries or item.hints.tags]  # no tags: nothing to look for
        queries = [self.queries or item.hints.tags for item in asked]
        for item, found in zip(asked, self.detect([item.image for item in asked], queries)):
            item.hints.detections += found

    def detect(self, images, queries: list[list[str]]) -> list[list[Detection]]:
        found = []
        for image, record in zip(images, self.detector.detect(images, queries)):
            boxes, scores = torch.tensor(record.boxes).view(-1, 4), torch.tensor(record.scores)
            keep = batched_nms(boxes, scores, record.labels, self.nms_iou)[: self.max_detections].tolist()
            found.append([Detection.from_pixels(record.labels[k], boxes[k].tolist(), image.size, float(scores[k]),
                                                self.name) for k in keep])
        return found
