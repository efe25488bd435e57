"""Reuse across requests: the KV states of recent prompts (so the next turn of a conversation, or another question on
the same image with the same system prompt, prefills only its new tokens). (The visual tokens of recent images are
kept in a model/vision.py TensorLRU by the scheduler.)

SGLang keeps every sequence's KV in a radix tree over its tokens (RadixAttention, Zheng et al. 2024,
`sglang/srt/mem_cache/radix_cache.py`); vLLM hashes fixed-size blocks of tokens, each hash chained to the one before
(automatic prefix caching, `vllm/v1/core/kv_cache_utils.py`). Here, on transformers' DynamicCache (one contiguous
tensor per layer, not paged): an entry is one sequence's KV, whole, and an index of its blocks' chained hashes finds
the entry sharing the longest prefix with a new prompt in len/16 dictionary lookups; the match is then checked token
by token (a hash collision can cost a hit, never give a wrong one) and extended to the exact token.

Keys are token ids with each image position replaced by its image's digest (`image_digest`: pixels and, for MG-LLaVA,
boxes): every image is the same id in input_ids, so ids alone would let one image's KV answer for another's.

Both caches are bounded in bytes and evict the least recently used entry first. A hit is exact: the KV of a prefix
depends on its tokens and positions only (causal attention; positions count from the prompt's start), so a prompt
prefilled after a cached prefix has the logits of a cold prefill up to float rounding (other matmul shapes), the same
as between batched and unbatched decoding (tests/test_continuous.py: within 1e-5; 1e-7 measured).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per hashed block


def image_digest(image, boxes: torch.Tensor | None = None) -> str:
    """What a visual token depends on: the image's pixels (mode, size, bytes) and its object boxes (MG-LLaVA)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    if boxes is not None:
        h.update(boxes.detach().to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class Prefix:
    """One sequence's KV: per layer (keys, values) [1, heads, len(key), head_dim], for the tokens of `key`."""

    key: list[Hashable]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    hashes: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return nbytes(t for pair in self.layers for t in pair)


class PrefixCache:
    """Sequences' KV, found by their longest shared prefix with a new key; bounded in bytes, LRU."""

    def __init__(self, capacity_bytes: int):
        self.capacity, self.size = capacity_bytes, 0
        self.entries: OrderedDict[int, Prefix] = OrderedDict()  # id(entry) -> entry, least recently used first
        self.index: dict[int, dict[int, None]] = {}  # block hash -> the entries holding that prefix, newest last
        self.hits = self.misses = self.hit_tokens = 0

    def match(self, key: Sequence[Hashable]) -> tuple[Prefix | None, int]:
        """(the entry sharing the longest prefix with `key`, its length in tokens); (None, 0) without one."""
        candidates, blocks, h = {}, 0, 0
        for start in range(0, len(key) - BLOCK + 1, BLOCK):
            h = hash((h, tuple(key[start:start + BLOCK])))
            if not (holders := self.index.get(h)):
                break
            candidates, blocks = holders, start + BLOCK
        best, matched = None, 0
        for entry in (self.entries[i] for i in reversed(candidates)):  # each holder of the deepest block, newest first
            if list(entry.key[:blocks]) != list(key[:blocks]):  # a hash collision
                continue
            n, limit = blocks, min(len(entry.key), len(key))
            while n < limit and entry.key[n] == key[n]:  # to the exact token (an entry's tail is no whole block)
                n += 1
            if n > matched:
                best, matched = entry, n
        if best is None:
            self.misses += 1
            return None, 0
        self.entries.move_to_end(id(best))
        self.hits += 1
        self.hit_tokens += matched
        return best, matched

    def insert(self, key: Sequence[Hashable], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `layers` (the KV of `key`'s tokens; not copied, so the caller must not change them in place). A key
        that an entry already holds whole is not stored again; an entry whose whole key the new one extends is
        replaced by it (a conversation's next turn supersedes its last)."""
        key = list(key)
        entry = Prefix(key, layers)
        if entry.nbytes > self.capacity or len(key) < BLOCK:
            return
        hits, misses, hit_tokens = self.hits, self.misses, self.hit_tokens
        old, matched = self.match(key)
        self.hits, self.misses, self.hit_tokens = hits, misses, hit_tokens  # an insert is not a lookup
        if old is not None and matched == len(key):
            return
        if old is not None and matched == len(old.key):
            self._remove(old)
        h = 0
        for start in range(0, len(key) - BLOCK + 1, BLOCK):
            h = hash((h, tuple(key[start:start + BLOCK])))
            entry.hashes.append(h)
            self.index.setdefault(h, {})[id(entry)] = None
        self.entries[id(entry)] = entry
        self.size += entry.nbytes
        while self.size > self.capacity:
            self._remove(next(iter(self.entries.values())))

    def _remove(self, entry: Prefix) -> None:
        del self.entries[id(entry)]
        self.size -= entry.nbytes
        for h in entry.hashes:
            holders = self.index[h]
            del holders[id(entry)]
            if not holders:
                del self.index[h]

    def __len__(self) -> int:
        return len(self.entries)
