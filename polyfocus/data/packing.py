"""Packed, padding-free batches (`packing: true`): the samples of each batch concatenated into fewer rows.

A padded batch is as wide as its longest sample, so on instruction data that mixes one-line answers with long
conversations (LLaVA-665K) much of it is padding. `PackingCollator` lays the batch's samples end to end instead:

- rows of at most a token budget (`packing_max_length`, by default `model_max_length`), filled first-fit by
  length, longest first, and as narrow as that packing allows without more rows (`pack`); image tokens count, since
  each `<image>` is already expanded to its visual tokens in `input_ids`;
- `position_ids` restart at 0 at every sample; no `attention_mask`. From position ids that restart, and only when
  no 2D mask is given, transformers keeps attention inside each sample: on SDPA and eager it builds a
  block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`, used by `create_causal_mask`), on
  FlashAttention 2/3 it runs the varlen kernel with sequence boundaries taken from the position ids
  (`modeling_flash_attention_utils._is_packed_sequence`, which needs a batch of one row: no budget then);
- each sample's first label is ignored, so the last token of a sample never learns to predict the next sample
  (unpacked, a row's first token is never a target either: the loss shifts labels by one);
- the padding left at the end of a row gets position ids of its own (0, 1, ...): a segment that attends only to
  itself, with ignored labels;
- the images go in the order of their tokens, row by row, as the model scatters them (`collate_images`), and
  MG-LLaVA's box indices follow them.

Packing happens inside each batch the sampler chose, so every optimizer step trains exactly the samples it would
unpacked (random or modality-length grouped sampler alike), with the same supervised tokens: the loss, its
normalisation (transformers' `num_items_in_batch`, counted over labels), gradient accumulation, DDP and exact
resume are those of the unpacked run. The packing itself is a pure function of the batch (stable sort), the same
on every rank and after a resume.

Compare: TRL's `DataCollatorWithFlattening` (padding-free: the whole batch in one row, FlashAttention) and
LLaMA-Factory's `neat_packing` (the dataset pre-packed into rows of `cutoff_len`, a 4D mask of its own); LLaVA-1.5
pads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from polyfocus.data.dataset import collate_images
from polyfocus.data.templates import IGNORE_INDEX


def first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of `lengths` in rows of at most `budget` tokens: longest first, each into the first row with room
    (first-fit decreasing); a sample longer than the budget gets a row of its own. Equal lengths keep their order,
    so the result depends on the lengths alone."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # sorted() is stable
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """`first_fit` rows of at most `budget` tokens that leave the least padding: every row is padded to the widest,
    so a batch costs rows x width positions. Filling rows up to the budget gives the fewest rows, but rarely the
    narrowest: for each row count from the fewest up, the narrowest width at which first-fit needs no more rows
    (a bisection) is tried, and the cheapest layout kept (the narrower one at equal cost: attention grows with the
    square of the width). A budget below the longest sample is raised to it. Deterministic: a function of the
    lengths and the budget."""
    longest, total = max(lengths), sum(lengths)
    budget = max(budget, longest)
    best, best_cost = None, None
    for n_rows in range(len(first_fit(lengths, budget)), len(lengths) + 1):
        narrowest = max(longest, -(-total // n_rows))  # no n_rows rows narrower than this hold the batch
        if best_cost is not None and n_rows * narrowest > best_cost:
            break  # more rows only cost more from here on
        lo, hi = narrowest, budget  # first-fit fits the batch in n_rows rows at hi
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(first_fit(lengths, mid)) <= n_rows else (mid + 1, hi)
        rows = first_fit(lengths, hi)
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_cost is None or cost <= best_cost:
            best, best_cost = rows, cost
    return best


@dataclass
class PackingCollator:
    """Dataset items → one packed batch: `input_ids`, `labels`, `position_ids` [rows, width], the images.

    max_length: the token budget of a row (`pack`). With a dense mask (SDPA, eager) attention costs rows x width²,
        so the budget caps what a row costs; the padded batch of the longest allowed sample (`model_max_length`)
        costs that much per row too. None: the whole batch in one row, no padding at all (FlashAttention's varlen
        path: attention costs per sample whatever the row's width, and transformers derives the boundaries from
        position ids for a batch of one row only).
    model_max_length: samples longer than this are an error, as in DataCollator (never cut: an image's tokens
        could be split).
    """

    pad_token_id: int
    max_length: int | None = None
    model_max_length: int | None = None

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        if self.model_max_length is not None:
            for f, n in zip(features, lengths):
                if n > self.model_max_length:
                    raise ValueError(f"sample {f.get('id')!r} has {n} tokens > model_max_length "
                                     f"{self.model_max_length}")
        rows = [list(range(len(features)))] if self.max_length is None else pack(lengths, self.max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        has_labels = all("labels" in f for f in features)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                end = start + lengths[i]
                input_ids[r, start:end] = torch.as_tensor(features[i]["input_ids"])
                position_ids[r, start:end] = torch.arange(lengths[i])
                if has_labels:
                    labels[r, start:end] = torch.as_tensor(features[i]["labels"])
                    labels[r, start] = IGNORE_INDEX  # never the target of the previous sample's last token
                start = end
            position_ids[r, start:] = torch.arange(width - start)  # the padding: a segment of its own
        batch = {"input_ids": input_ids, "position_ids": position_ids,
                 **collate_images([features[i] for row in rows for i in row])}
        if has_labels:
            batch["labels"] = labels
        return batch
