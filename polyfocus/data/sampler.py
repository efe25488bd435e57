"""LLaVA's `group_by_modality_length` sampler (LLaVA-1.5 spec §3.3).

Indices come out in "megabatches" of `world_size * batch_size`: one optimizer step across all ranks when
`world_size` is passed as (number of ranks) x (gradient accumulation steps), as LLaVA does. Inside a megabatch
the indices are sorted by length and dealt into `world_size` chunks of equal count and similar total length,
one chunk per per-device batch, so ranks wait less on each other. With both signs present (positive = has an
image, negative = text-only) every megabatch holds one modality only; the incomplete leftovers of both
modalities go last, merged.

Two deliberate differences from LLaVA's code (both follow the spec's wording):
- the per-modality permutations use the `generator` passed in (LLaVA passes None there, so its order comes
  from torch's global RNG and the seed given to the sampler does not fully determine it);
- only *incomplete* megabatches form the merged tail (LLaVA always takes each modality's last megabatch, even a
  full one, so up to two megabatches of mixed modality could end the epoch).
Consequence: every global batch before the tail has one modality. The tail has r_mm + r_text < 2 * megabatch
indices, so it is the last global batch, or the last two when r_mm + r_text > megabatch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal `indices` (sorted by length, longest first) into `num_chunks` chunks of equal count, each next index
    to the chunk with the smallest total length so far. Falls back to round-robin when counts cannot be equal."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")  # full: takes no more
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """Random megabatches of world_size*batch_size, each sorted longest first and split into balanced chunks."""
    megabatch_size = world_size * batch_size
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    result = []
    for start in range(0, len(indices), megabatch_size):
        megabatch = sorted(indices[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            result.extend(chunk)
    return result


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """`lengths[i]` > 0 for a sample with image(s), < 0 for text-only; |lengths[i]| is its length estimate."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero: the sign carries the modality")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices([abs(length) for length in lengths], batch_size, world_size, generator)

    megabatch_size = world_size * batch_size
    full, tail = [], []
    for sign in (1, -1):
        idx = [i for i, length in enumerate(lengths) if length * sign > 0]
        order = length_grouped_indices([abs(lengths[i]) for i in idx], batch_size, world_size, generator)
        grouped = [idx[i] for i in order]
        n_full = len(grouped) // megabatch_size * megabatch_size
        full += [grouped[s : s + megabatch_size] for s in range(0, n_full, megabatch_size)]
        tail += grouped[n_full:]
    perm = torch.randperm(len(full), generator=generator).tolist()
    return [i for p in perm for i in full[p]] + sorted(tail)


class LengthGroupedSampler(Sampler[int]):
    """Yields `modality_length_grouped_indices` for the whole world; the trainer shards it into per-rank batches.

    Deterministic per (seed, epoch): the order of epoch e is the same on every rank and after a resume.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
