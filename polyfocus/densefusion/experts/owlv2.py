"""Open-vocabulary detection with OWLv2 (transformers' Owlv2ForObjectDetection), queried with each image's tags
(from the "tags" expert, run before it) or with a fixed list: DenseFusion's OWL-ViTv2 queried with RAM++ tags
(spec §3, confirmed in the reference repo's issue #2).

OWLv2 predicts one box per patch and scores it against every query; transformers' post-processing keeps the
best query per box above `threshold` (boxes in the original image's pixels: it undoes OWLv2's pad-to-square). Many
patches see the same object, so boxes of one label that overlap by IoU > `nms_iou` keep only the best (class-wise
NMS, polyfocus.data.boxes), and at most `max_detections` remain, best first. Queries read "a photo of {tag}" (as
`polyfocus boxes` asks OWLv2); labels are the bare tags. The paper's score threshold and its "balanced sampling" of
small objects are not given; these values are ours.
"""

from __future__ import annotations

import torch

from polyfocus.data.boxes import batched_nms
from polyfocus.densefusion.experts.base import Detection, Expert, Item, default_device, hf_image_processor
from polyfocus.densefusion.experts.clip_tags import read_vocabulary


class OWLv2(Expert):
    name = "owlv2"

    def __init__(self, model: str, queries: str | list[str] | None = None, threshold: float = 0.1,
                 nms_iou: float = 0.5, max_detections: int = 20, template: str = "a photo of {}",
                 device: str | None = None):
        """model: a local OWLv2 directory (weights, tokenizer, preprocessor_config.json); queries: a fixed query file
        or list, else each image's tags."""
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        self.queries = read_vocabulary(queries) if queries is not None else None
        self.threshold, self.nms_iou, self.max_detections = float(threshold), float(nms_iou), int(max_detections)
        self.template = template
        self.device = default_device(device)
        self.model = Owlv2ForObjectDetection.from_pretrained(model).to(self.device).eval()
        self.processor = hf_image_processor(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.text_length = self.model.config.text_config.max_position_embeddings  # OWLv2 pads queries to this

    def __call__(self, items: list[Item]) -> None:
        asked = [item for item in items if self.queries or item.hints.tags]  # no tags: nothing to look for
        queries = [self.queries or item.hints.tags for item in asked]
        for item, found in zip(asked, self.detect([item.image for item in asked], queries)):
            item.hints.detections += found

    @torch.inference_mode()
    def detect(self, images, queries: list[list[str]]) -> list[list[Detection]]:
        if not images:
            return []
        n = max(len(q) for q in queries)
        # as Owlv2Processor pads a batch: every image gets n queries, the missing ones " "
        texts = [text for q in queries for text in [self.template.format(t) for t in q] + [" "] * (n - len(q))]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.text_length, truncation=True,
                                return_tensors="pt").to(self.device)
        padding = torch.tensor([i >= len(q) for q in queries for i in range(n)], device=self.device)
        tokens["input_ids"][padding, 0] = 0  # OWLv2 masks a query whose first token is 0 (its logits -> -inf)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        outputs = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             pixel_values=pixels)
        sizes = [(image.height, image.width) for image in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)
        found = []
        for image, q, result in zip(images, queries, results):
            real = result["labels"] < len(q)  # padding queries are masked; this only guards it
            boxes, scores = result["boxes"][real].cpu(), result["scores"][real].cpu()
            labels = [q[i] for i in result["labels"][real].tolist()]
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_detections].tolist()
            found.append([Detection.from_pixels(labels[k], boxes[k].tolist(), image.size, float(scores[k]), self.name)
                          for k in keep])
        return found
