"""Supervised multimodal dataset and its collator (LLaVA's LazySupervisedDataset / DataCollatorForSupervisedDataset).

Each `<image>` becomes `image_seq_len` copies of `image_token_id` at tokenization time, so a sample's length here
is its exact length in the LLM. Bad samples are found in three places, each error naming the file and sample:

- at init (no I/O beyond the annotation file): malformed records, unknown roles, `<image>` count != image count;
- in `__getitem__` (lazy): missing/corrupt images, template errors, over-long samples, samples with nothing to
  learn (all labels masked);
- in `validate()`, optionally: the lazy checks for every sample up front (text is tokenized, each image's header
  read: format and size; or every image fully decoded), so all ranks fail fast before training starts (ecosystem
  §2 items 5, 11).

strict=True raises DataError at the first bad sample. strict=False skips it: one warning per sample, and
`skipped` maps reason -> [sample names]. Skips found at init or by validate() drop the sample from the index, so
the sampler never sees it. A skip found in __getitem__ (an image whose header reads but whose pixels do not, or no
validate()) returns a `Skipped` marker, which the collator drops: that batch is one sample short. A bad sample is
never replaced by another one, which would train that one twice in the epoch. The batch carries the markers
(`skipped`), because DataLoader workers each hold their own copy of the dataset and its `skipped`.

Over-long samples: image tokens are never cut. If the excess can be removed by dropping whole trailing
(user, assistant) rounds that hold no `<image>`, while keeping at least one round, those rounds are dropped
(the sample is listed in `trimmed` and logged once); otherwise the sample is refused ("too_long").
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from polyfocus.data.boxes import BoxError, indexed
from polyfocus.data.formats import DataError, Sample, load_samples
from polyfocus.data.images import ImageLoadError, ImageProcessor, check_image, load_image
from polyfocus.data.templates import IGNORE_INDEX, IMAGE_TOKEN, TemplateError, encode, get_template, move_image_to_front

logger = logging.getLogger(__name__)
VALIDATE_IMAGES = ("header", "decode")


@dataclass(frozen=True)
class Skipped:
    """What `SupervisedDataset[i]` returns (strict=False) for a sample that failed to load; the collator drops it."""

    reason: str
    sample: str
    source: str  # the annotation file


class SupervisedDataset(torch.utils.data.Dataset):
    """
    Args:
        data_path: LLaVA JSON / messages file (JSON list or JSONL), see polyfocus.data.formats.
        image_root: directory the records' image paths are relative to (None: the annotation file's directory).
        template: a template or its name (see polyfocus.data.templates; "auto" uses the tokenizer's own).
        image_seq_len: visual tokens per image; an int, or `f(sample, image_index) -> int` when it varies
            (e.g. one extra token per object box). It must not need the decoded image: lengths use it at init.
        image_first: move each `<image>` to the front of its turn, as LLaVA's preprocess_multimodal does.
        object_boxes: MG-LLaVA's object tokens (polyfocus.data.boxes.ObjectBoxes): each image's boxes, from a box JSON
            by sample id or a detector; its `<image>` then stands for `image_seq_len` + one token per box, and the
            item holds `image_boxes` [K, 5] (image index in the sample, x1, y1, x2, y2).
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_root: str | os.PathLike | None,
        tokenizer,
        template,
        image_processor: ImageProcessor,
        image_token_id: int,
        image_seq_len: int | Callable[[Sample, int], int],
        model_max_length: int,
        strict: bool = True,
        image_first: bool = True,
        object_boxes=None,
    ):
        self.data_path = os.fspath(data_path)
        self.image_root = os.fspath(image_root) if image_root is not None else os.path.dirname(self.data_path)
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_seq_len = image_seq_len
        self.model_max_length = model_max_length
        self.strict = strict
        self.image_first = image_first
        self.object_boxes = object_boxes
        self.skipped: dict[str, list[str]] = defaultdict(list)  # reason -> sample names
        self.trimmed: set[str] = set()  # samples whose trailing rounds were dropped to fit model_max_length

        self.samples: list[Sample] = []
        for sample in load_samples(self.data_path, on_error=self._skip_or_raise):
            try:
                self._check_image_count(sample)
                self.samples.append(sample)
            except DataError as e:
                self._skip_or_raise(e)
        if not self.samples:
            raise DataError(f"{self.data_path}: no usable samples (skipped: {self._skip_counts()})", "empty")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | Skipped:
        sample = self.samples[i]
        try:
            return self._load(sample)
        except DataError as e:
            if self.strict or sample.name not in self.skipped[e.reason]:  # a later epoch: no second warning
                self._skip_or_raise(e)
            return Skipped(e.reason, e.sample, self.data_path)

    def validate(self, images: str = "header") -> None:
        """Run the lazy checks on every sample now: tokenize the text, and read every image's header (format and
        size: cheap) or, with images="decode", decode every image in full (what training will do).

        strict: raises at the first bad sample. Otherwise the bad ones are recorded and removed from the index,
        so build the sampler (which reads `modality_lengths`) after this call.
        """
        if images not in VALIDATE_IMAGES:
            raise ValueError(f"validate: images must be one of {VALIDATE_IMAGES}, got {images!r}")
        good = []
        for sample in self.samples:
            try:
                self._encode(sample)
                if self.object_boxes is not None and self.object_boxes.records is not None and sample.images:
                    self._box_record(sample, None)  # the sample's box JSON record exists and is one image's
                for rel in sample.images:
                    path = os.path.join(self.image_root, rel)
                    if images == "decode":
                        self._load_image(sample, path)
                    else:
                        try:
                            check_image(path)
                        except ImageLoadError as e:
                            raise self._error(sample, str(e), "image") from e
                good.append(sample)
            except DataError as e:
                self._skip_or_raise(e)
        if not good:
            raise DataError(f"{self.data_path}: no usable samples (skipped: {self._skip_counts()})", "empty")
        self.samples = good

    # ---- lengths for the sampler (no tokenization, no image decoding) ----------------------------------------

    @property
    def lengths(self) -> list[int]:
        """LLaVA's estimate: whitespace words over all turns, plus the image tokens (LLaVA adds a flat 128)."""
        return [
            max(1, sum(len(m["content"].split()) for m in s.messages) + sum(self._image_seq_lens(s)))
            for s in self.samples
        ]

    @property
    def modality_lengths(self) -> list[int]:
        """`lengths`, positive for samples with images and negative for text-only ones (for the sampler)."""
        return [n if s.images else -n for n, s in zip(self.lengths, self.samples)]

    # ---- internals --------------------------------------------------------------------------------------------

    def _error(self, sample: Sample, message: str, reason: str) -> DataError:
        return DataError(f"{self.data_path}: sample {sample.name}: {message}", reason, sample.name)

    def _skip_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in self.skipped.items()}

    def _skip_or_raise(self, e: DataError) -> None:
        if self.strict:
            raise e
        logger.warning("skipping sample: %s", e)
        self.skipped[e.reason].append(e.sample)

    def _check_image_count(self, sample: Sample) -> None:
        tags = sum(m["content"].count(IMAGE_TOKEN) for m in sample.messages)
        if tags != len(sample.images):
            raise self._error(sample, f"{tags} {IMAGE_TOKEN} tag(s) but {len(sample.images)} image(s)", "image_count")

    def _image_seq_lens(self, sample: Sample) -> list[int]:
        if callable(self.image_seq_len):
            return [int(self.image_seq_len(sample, k)) for k in range(len(sample.images))]
        return [self.image_seq_len] * len(sample.images)

    def _encode(self, sample: Sample, object_tokens: list[int] | None = None) -> tuple[list[int], list[int]]:
        seq_lens = self._image_seq_lens(sample)
        if object_tokens is not None:  # MG-LLaVA: each image's tokens, then one per box
            seq_lens = [n + k for n, k in zip(seq_lens, object_tokens)]
        messages = move_image_to_front(sample.messages) if self.image_first and sample.images else sample.messages
        dropped = 0
        while True:
            try:
                enc = encode(messages, self.tokenizer, self.template, self.image_token_id, seq_lens)
            except TemplateError as e:
                raise self._error(sample, str(e), "template") from e
            if len(enc.input_ids) <= self.model_max_length:
                break
            if not _can_drop_last_round(messages):
                raise self._error(
                    sample,
                    f"{len(enc.input_ids)} tokens ({sum(seq_lens)} of them image tokens) > model_max_length "
                    f"{self.model_max_length}, and no trailing text-only round can be dropped",
                    "too_long",
                )
            messages, dropped = messages[:-2], dropped + 1

        n_image_tokens = enc.input_ids.count(self.image_token_id)
        if n_image_tokens != sum(seq_lens):  # e.g. the text itself tokenizes to the image token
            raise self._error(sample, f"{n_image_tokens} image tokens, expected {sum(seq_lens)}", "image_tokens")
        if all(label == IGNORE_INDEX for label in enc.labels):
            # Would add zero loss silently (the "tokenization mismatch" failure of LLaVA, ecosystem §2 item 4).
            raise self._error(sample, "no supervised tokens (every label is masked)", "no_labels")
        if dropped and sample.name not in self.trimmed:
            self.trimmed.add(sample.name)
            logger.warning(
                "%s: sample %s: dropped %d trailing round(s) to fit model_max_length %d",
                self.data_path, sample.name, dropped, self.model_max_length,
            )
        return enc.input_ids, enc.labels

    def _load_image(self, sample: Sample, path: str):
        try:
            return load_image(path)
        except ImageLoadError as e:
            raise self._error(sample, str(e), "image") from e

    def _box_record(self, sample: Sample, image, path: str | None = None):
        """The sample's detections (box JSON record, or the detector on `image`); a DataError naming it if bad."""
        try:
            return self.object_boxes.record_of(sample.id, image, len(sample.images), path)
        except BoxError as e:
            raise self._error(sample, str(e), "boxes") from e

    def _load(self, sample: Sample) -> dict:
        input_ids, labels = self._encode(sample)  # text first: cheap, and fails before any image decoding
        pixel_values = image_boxes = None
        if sample.images:
            paths = [os.path.join(self.image_root, rel) for rel in sample.images]
            images = [self._load_image(sample, path) for path in paths]
            pixel_values = self.image_processor(images)
            if self.object_boxes is not None:  # the boxes decide how many tokens each image takes
                where = f"{self.data_path}: sample {sample.name}"
                boxes = [self.object_boxes.for_image(image, self._box_record(sample, image, path), len(input_ids),
                                                     where) for image, path in zip(images, paths)]
                input_ids, labels = self._encode(sample, [len(b) for b in boxes])
                image_boxes = indexed(boxes)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "id": sample.id,
            **({"image_boxes": image_boxes} if image_boxes is not None else {}),
        }


def _can_drop_last_round(messages: list[dict]) -> bool:
    """The last two turns are a (user, assistant) round without images, and another answered round remains."""
    return (
        len(messages) >= 4
        and [m["role"] for m in messages[-2:]] == ["user", "assistant"]
        and not any(IMAGE_TOKEN in m["content"] for m in messages[-2:])
        and any(m["role"] == "assistant" for m in messages[:-2])
    )


@dataclass
class DataCollator:
    """Pads a list of dataset items into a batch.

    input_ids are padded with `pad_token_id`, labels with IGNORE_INDEX, and attention_mask marks each sample's
    true length (LLaVA's `ids != pad_id` would also mask real tokens that share the pad id). pixel_values of
    all samples are concatenated in sample order, [total_images, 3, S, S], matching the order of the image
    tokens in the batch; None when the batch has no image. Samples over `model_max_length` are an error, never
    cut: cutting could split an image's tokens (the dataset already refuses or trims such samples).
    `Skipped` items (samples that failed to load) are dropped and listed in the batch's `skipped`; a batch of
    nothing but them has zero rows.
    """

    pad_token_id: int
    padding_side: str = "right"
    model_max_length: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, features: list[dict | Skipped]) -> dict:
        skipped = [(f.source, f.reason, f.sample) for f in features if isinstance(f, Skipped)]
        features = [f for f in features if not isinstance(f, Skipped)]
        if not features:  # every sample of this batch failed to load (strict=False): an empty batch, reported
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "labels": empty, "pixel_values": None,
                    "skipped": skipped}
        lengths = [len(f["input_ids"]) for f in features]
        if self.model_max_length is not None:
            for f, n in zip(features, lengths):
                if n > self.model_max_length:
                    raise ValueError(
                        f"sample {f.get('id')!r} has {n} tokens > model_max_length {self.model_max_length}"
                    )
        width = max(lengths)
        has_labels = all("labels" in f for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[row, cols] = torch.as_tensor(f["input_ids"])
            attention_mask[row, cols] = 1
            if has_labels:
                labels[row, cols] = torch.as_tensor(f["labels"])

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **collate_images(features)}
        if has_labels:
            batch["labels"] = labels
        if skipped:  # (annotation file, reason, sample) of each sample dropped from this batch
            batch["skipped"] = skipped
        return batch


def collate_images(features: list[dict]) -> dict:
    """The images of `features`, in their order: `pixel_values` [total_images, 3, S, S] (None without images) and,
    with MG-LLaVA's boxes, `image_boxes` [K, 5] whose image indices count from the first image of the batch.
    The model scatters the images into the image-token positions row-major, so `features` must come in the order
    their tokens take in the batch (DataCollator: one row each; polyfocus.data.packing: row by row)."""
    pixel_values = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
    image_boxes, first = [], 0
    for f in features:
        if f.get("image_boxes") is not None:
            image_boxes.append(f["image_boxes"] + torch.tensor([first, 0, 0, 0, 0], dtype=torch.float32))
        first += 0 if f.get("pixel_values") is None else len(f["pixel_values"])
    images = {"pixel_values": torch.cat(pixel_values) if pixel_values else None}
    if image_boxes:
        images["image_boxes"] = torch.cat(image_boxes)
    return images
