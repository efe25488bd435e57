"""Continuous batching for the server: a request joins the running batch at the decoding step after its prefill and
leaves it when done, so a short answer never waits for a long one (iteration-level scheduling: Orca, Yu et al. 2022;
vLLM's scheduler, `vllm/v1/core/sched/scheduler.py`). With prefix reuse (`prefix_cache.py`, SGLang's RadixAttention
idea) and jump-forward decoding for jobs with a draft (`jump.py`, DualFocus's box).

One scheduler thread loops:
1. admit queued jobs, first come first served, while the batch has a free row (`max_batch_size`), KV room
   (`max_tokens_in_flight`: a running job holds its prompt + max_tokens) and this step's prefill budget
   (`max_prefill_tokens`) lasts; an idle scheduler waits `window_s` after the first job for others;
2. prefill each admitted job alone (batch 1, no padding: its first token is one-at-a-time generation's), from the
   longest cached prefix of its tokens and its images' cached visual tokens; its prompt's KV goes into the prefix
   cache (a second question on the same image finds it);
3. write the new rows' KV into the running batch's cache (right-aligned with the others, pads before, masked);
4. decode one step: each row feeds its newest token (a greedy job with a draft: the draft too, keeping what greedy
   decoding gives); per-row sampling and streaming as the window batcher's (`RowTracker`, `sample`);
5. finished and cancelled rows leave the cache (a finished one's KV, answer included, goes to the prefix cache: the
   conversation's next turn finds it), and columns that only pads fill are cut.

Built on transformers' DynamicCache, its layers `SlotLayer`s (a DynamicLayer whose tensors have room for more rows and
columns, so that joining, leaving and decoding copy nothing but the new KV), and the model's own forward, rather than
transformers' ContinuousBatchingManager: docs/serving.md says why. A model whose cache is not made of plain
DynamicLayers (sliding windows, linear attention) cannot be row-managed this way: `refusal` says so and the server
batches per window.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from polyfocus.data.boxes import indexed
from polyfocus.data.images import load_image
from polyfocus.infer import batcher as batching
from polyfocus.infer.batcher import Batcher, Event, Job, RowTracker, Scheduler, row_generator, sample
from polyfocus.infer.jump import accepted
from polyfocus.infer.prefix_cache import PrefixCache, image_digest
from polyfocus.model.vision import TensorLRU

logger = logging.getLogger(__name__)


def refusal(model) -> str | None:
    """Why continuous batching cannot manage this model's KV cache row by row, or None."""
    cache = DynamicCache(config=model.config.text_config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if not cache.layers or kinds != {DynamicLayer.__name__}:
        return f"its LLM's cache layers are {sorted(kinds) or 'not known in advance'}, not plain DynamicLayers"
    return None


def make_scheduler(pipe, kind: str = "continuous", max_batch_size: int = 16, window_s: float = 0.01,
                   **continuous) -> Scheduler:
    """The server's scheduler: "continuous" (falling back, with a warning, to batching per window for a model it
    cannot run) or "window"."""
    if kind not in ("continuous", "window"):
        raise ValueError(f"scheduler must be 'continuous' or 'window', got {kind!r}")
    if kind == "continuous":
        reason = refusal(pipe.model)
        if reason is None:
            return ContinuousBatcher(pipe, max_batch_size, window_s, **continuous)
        logger.warning("continuous batching is off for this model (%s): batching per window instead", reason)
    return Batcher(pipe, max_batch_size, window_s)


@dataclass(eq=False)
class Row:
    """A job in the running batch."""

    job: Job
    tracker: RowTracker
    generator: torch.Generator | None  # None: greedy
    key: list  # the prefix-cache key of the tokens in the cache (ids; image positions as their image's digest)
    reserve: int  # KV tokens it may come to hold: prompt + max_tokens
    next: int = -1  # its newest token, not yet fed


class Running:
    """The running rows and their KV: a DynamicCache of `SlotLayer`s, [R, heads, T, head_dim] per layer, and `mask`
    [R, T] (0: a pad, or a rejected draft token). A row's tokens are its mask's ones; every row's newest token is in
    the last column."""

    def __init__(self, config):
        self.config = config
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[Row], caches: list[DynamicCache]) -> None:
        """The new rows (each with its own cache, no pads) join after the others, right-aligned."""
        lengths = [c.get_seq_length() for c in caches]
        width = max([self.mask.shape[1] if self.mask is not None else 0, *lengths])
        if self.cache is None:
            self.cache = DynamicCache(config=self.config)
            self.cache.layers = [SlotLayer() for _ in self.cache.layers]  # `refusal` checked they were DynamicLayers
        for i, layer in enumerate(self.cache.layers):
            layer.add_rows([(c.layers[i].keys, c.layers[i].values) for c in caches], width)
        device = self.cache.layers[0].keys.device
        masks = ([self.mask] if self.mask is not None else []) + [
            torch.ones(1, n, dtype=torch.long, device=device) for n in lengths]
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
        self.rows += rows

    def keep(self, kept: list[int]) -> None:
        """Keep only the rows at these indices (the last rows move into the gaps: their order changes); then cut the
        columns that are pads in every row."""
        if not kept:
            self.rows, self.cache, self.mask = [], None, None
            return
        n, keeping = len(kept), set(kept)
        gaps = [k for k in range(n) if k not in keeping]
        moves = list(zip(gaps, [k for k in kept if k >= n]))  # (slot, the row that moves into it)
        order = list(range(n))
        for slot, row in moves:
            order[slot] = row
        for layer in self.cache.layers:
            layer.move(moves, n)
        self.rows = [self.rows[k] for k in order]
        self.mask = self.mask[order]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start:
            for layer in self.cache.layers:
                layer.trim(start)
            self.mask = self.mask[:, start:]

    def row_kv(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row k's KV, its tokens only (copied): [1, heads, n, head_dim] per layer."""
        columns = self.mask[k].nonzero().flatten()
        return [(layer.keys[k:k + 1, :, columns], layer.values[k:k + 1, :, columns]) for layer in self.cache.layers]


def set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put tensors in a DynamicLayer as its state (the class `refusal` checks for)."""
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


class SlotLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views [:rows, :, start:end] of larger tensors (`slots`), so that the
    batch changes without copying it: a decoding step writes its column into the room after `end`, where
    DynamicLayer.update concatenates (copying every row's KV at every step: a fifth of the decoding time on the
    bench's CPU); a joining row is written into the next free row; a leaving row's slot takes the last row; cutting
    leading columns moves `start`. Only running out of room copies (into tensors with as much room again)."""

    ROOM = 64  # free columns (and at least one free row) after a copy

    def add_rows(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        """Append rows (keys, values [b, heads, n, head_dim]), right-aligned in `width` columns (zeros before: pads)."""
        new_rows = sum(keys.shape[0] for keys, _ in parts)
        if not self.is_initialized:
            first = parts[0][0]
            self.slots = [first.new_empty(new_rows + 1, first.shape[1], width + self.ROOM, first.shape[3])
                          for _ in range(2)]
            self.rows, self.start, self.end = 0, 0, width
        elif width > self.end:  # a row longer than all columns so far: new tensors
            self._copy(self.rows + new_rows, width)
        elif width > self.end - self.start:  # room on the left (cut columns): the others get pads there
            start = self.end - width
            for slot in self.slots:
                slot[:self.rows, :, start:self.start] = 0
            self.start = start
        if self.rows + new_rows > self.slots[0].shape[0]:
            self._copy(self.rows + new_rows, self.end - self.start)
        for keys, values in parts:
            rows, n = slice(self.rows, self.rows + keys.shape[0]), keys.shape[2]
            for slot, tensor in zip(self.slots, (keys, values)):
                slot[rows, :, self.start:self.end - n] = 0
                slot[rows, :, self.end - n:self.end] = tensor
            self.rows += keys.shape[0]
        self._view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.end + n > self.slots[0].shape[2]:
            self._copy(self.rows, self.end - self.start)
        for slot, tensor in zip(self.slots, (key_states, value_states)):
            slot[:self.rows, :, self.end:self.end + n] = tensor
        self.end += n
        self._view()
        return self.keys, self.values

    def move(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Row `src` into slot `dst` for each pair; then `rows` rows."""
        for dst, src in moves:
            for slot in self.slots:
                slot[dst, :, self.start:self.end] = slot[src, :, self.start:self.end]
        self.rows = rows
        self._view()

    def trim(self, columns: int) -> None:
        self.start += columns
        self._view()

    def crop(self, tokens_to_remove: int) -> None:
        self.end -= abs(tokens_to_remove)
        self._view()

    def _copy(self, rows: int, width: int) -> None:
        """Into new tensors of `rows` + 1 rows and `width` + ROOM + as many columns as now: the running rows
        right-aligned at column `width` (pads before)."""
        used = self.end - self.start
        slots = [slot.new_empty(rows + 1, slot.shape[1], width + self.ROOM + used, slot.shape[3]) for slot in self.slots]
        for new, old in zip(slots, self.slots):
            new[:self.rows, :, :width - used] = 0
            new[:self.rows, :, width - used:width] = old[:self.rows, :, self.start:self.end]
        self.slots, self.start, self.end = slots, 0, width

    def _view(self) -> None:
        self.keys = self.slots[0][:self.rows, :, self.start:self.end]
        self.values = self.slots[1][:self.rows, :, self.start:self.end]
        self.is_initialized, self.device = True, self.keys.device


class ContinuousBatcher(Scheduler):
    """Continuous batching (see the module's docstring). `Batcher`'s surface: submit, stream, waiting, close, pipe,
    max_batch_size, window_s, batch_sizes (jobs admitted together); and `running` (rows in the batch now),
    `step_sizes` (rows of each decoding step), `prefixes` and `features` (the caches, with their hit counts)."""

    def __init__(self, pipe, max_batch_size: int = 16, window_s: float = 0.0, max_tokens_in_flight: int = 65536,
                 max_prefill_tokens: int = 4096, prefix_cache_bytes: int = 2**30, feature_cache_bytes: int = 2**28):
        reason = refusal(pipe.model)
        if reason is not None:
            raise ValueError(f"continuous batching cannot run this model: {reason}")
        super().__init__(pipe, max_batch_size, window_s)
        self.max_tokens_in_flight, self.max_prefill_tokens = max_tokens_in_flight, max_prefill_tokens
        self.prefixes, self.features = PrefixCache(prefix_cache_bytes), TensorLRU(feature_cache_bytes)  # visual tokens
        self.step_sizes: deque[int] = deque(maxlen=10_000)
        self.batch = Running(pipe.model.config.text_config)
        self._pending: deque[Job] = deque()  # taken from the queue, not yet admitted (no room yet)
        self._closing = False
        self._start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    # ---- the loop --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while (admitted := self._admit()) is not None:
            rows, caches = [], []
            for job in admitted:
                try:
                    row, cache = self._prefill(job)
                except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
                    logger.exception("prefill failed")
                    fail(job, e)
                    continue
                if not job.done:
                    rows.append(row)
                    caches.append(cache)
            try:
                if rows:
                    self.batch.add(rows, caches)
                if self.batch.rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - the rows fail, the server goes on
                logger.exception("decoding step of %d rows failed", len(self.batch.rows) + len(rows))
                for row in self.batch.rows + rows:
                    fail(row.job, e)
                self.batch = Running(self.pipe.model.config.text_config)

    def _admit(self) -> list[Job] | None:
        """The jobs that join the batch now ([] when none can); None once closing with nothing left to do."""
        if not self.batch.rows and not self._pending:
            if self._closing:
                return None
            first = self._queue.get()  # idle: wait for work
            if first is None:
                self._closing = True
                return []
            self._pending.append(first)
            deadline = time.monotonic() + self.window_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                self._take(job)
        while True:  # whatever else has arrived, without waiting
            try:
                self._take(self._queue.get_nowait())
            except queue.Empty:
                break
        admitted, prefill = [], 0
        held = sum(row.reserve for row in self.batch.rows)
        while self._pending and len(self.batch.rows) + len(admitted) < self.max_batch_size:
            job = self._pending[0]
            if job.cancelled:  # its client went away while it waited
                self._pending.popleft()
                continue
            reserve = job.prompt_tokens + job.max_tokens
            alone = not admitted and not self.batch.rows  # a job always runs when it would run alone
            if not alone and (held + reserve > self.max_tokens_in_flight
                              or (admitted and prefill + job.prompt_tokens > self.max_prefill_tokens)):
                break
            admitted.append(self._pending.popleft())
            held, prefill = held + reserve, prefill + job.prompt_tokens
        if admitted:
            self.batch_sizes.append(len(admitted))
        return admitted

    def _take(self, job: Job | None) -> None:
        if job is None:
            self._closing = True
        else:
            self._pending.append(job)

    # ---- prefill -----------------------------------------------------------------------------------------------

    def _prefill(self, job: Job) -> tuple[Row, DynamicCache]:
        """The job's prompt into a cache of its own, and its first token."""
        logits, cache, key, ids = self.prompt(job)
        row = Row(job, RowTracker([job], self.pipe.tokenizer, self.pipe.stop, batching.eos_ids(self.pipe)),
                  row_generator(job), key, len(ids) + job.max_tokens)
        row.next = self._choose(row, logits)
        row.tracker.advance(0, row.next)
        return row, cache

    @torch.inference_mode()  # also when called from outside the loop (tests)
    def prompt(self, job: Job) -> tuple[torch.Tensor, DynamicCache, list, list[int]]:
        """Prefill the job's prompt from its longest cached prefix, and keep its KV in the prefix cache: (the logits
        of its next token [V], its cache, its prefix-cache key, its ids)."""
        pipe, model = self.pipe, self.pipe.model
        images = [load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in job.images]
        boxes = None
        if pipe.object_boxes is not None:  # MG-LLaVA: the boxes found when the job was built (the detector if none)
            boxes = [pipe.image_boxes(image, None, record)
                     for image, record in zip(images, job.boxes or [None] * len(images))]
        ids = pipe.encode(job.messages, len(images), object_tokens=[len(b) for b in boxes] if boxes else None)
        digests = [image_digest(image, b) for image, b in zip(images, boxes or [None] * len(images))]
        runs = image_runs(ids, model.config.image_token_id, [model.config.num_image_tokens + (len(b) if boxes else 0)
                                                             for b in boxes or [None] * len(images)])
        key = list(ids)
        for (start, length), digest in zip(runs, digests):
            key[start:start + length] = [digest] * length
        entry, start = self.prefixes.match(key) if self.prefixes.capacity else (None, 0)
        start = min(start, len(ids) - 1)  # the last prompt token is fed again: its logits give the first token
        cache = DynamicCache(config=model.config.text_config)
        if start:
            for layer, (keys, values) in zip(cache.layers, entry.layers):
                set_layer(layer, keys[:, :, :start], values[:, :, :start])  # views: the cache concatenates, never writes
        embeds = self._embeds(ids, start, images, boxes, digests, runs)
        positions = torch.arange(start, len(ids), device=model.device)[None]
        logits = model(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1].float()
        if self.prefixes.capacity:
            self.prefixes.insert(key, [(layer.keys, layer.values) for layer in cache.layers])
        return logits, cache, key, ids

    def _embeds(self, ids: list[int], start: int, images: list, boxes, digests: list[str],
                runs: list[tuple[int, int]]) -> torch.Tensor:
        """Input embeddings [1, len(ids) - start, D] of ids[start:]: token embeddings, and each image's visual
        tokens (cached by digest, else computed by the model's tower, fusion and projector for the images missing)."""
        model = self.pipe.model
        image_id = model.config.image_token_id
        tail = torch.tensor(ids[start:], device=model.device)
        embeds = model.get_input_embeddings()(tail.masked_fill(tail == image_id, 0))
        needed = [i for i, (at, length) in enumerate(runs) if at + length > start]
        tokens = {i: self.features.get(digests[i]) for i in needed}
        missing = [i for i in needed if tokens[i] is None]
        if missing:  # all of them through the tower at once, as `Pipeline.generate` does for a request's images
            lengths = [runs[i][1] for i in missing]
            positions = torch.full((1, sum(lengths)), image_id, device=model.device)
            pixel_values = self.pipe.image_processor([images[i] for i in missing]).to(model.device)
            extra = {"image_boxes": indexed([boxes[i] for i in missing]).to(model.device)} if boxes else {}
            spliced = model.embed_inputs(positions, pixel_values, **extra)[0]
            for i, part in zip(missing, spliced.split(lengths)):
                tokens[i] = part
                self.features.put(digests[i], part)
        for i in needed:
            at, length = runs[i]
            first = max(at, start)
            embeds[first - start:at + length - start] = tokens[i][first - at:].to(embeds.dtype)
        return embeds[None]

    # ---- decoding ----------------------------------------------------------------------------------------------

    def _step(self) -> None:
        batch, model = self.batch, self.pipe.model
        gone = [k for k, row in enumerate(batch.rows) if row.job.cancelled]
        if gone:  # clients that went away: their rows leave before costing a step
            for k in gone:
                batch.rows[k].job.done = True
            batch.keep([k for k in range(len(batch.rows)) if k not in gone])
            if not batch.rows:
                return
        drafts = [self._draft(row) for row in batch.rows]
        blocks = [[row.next, *draft] for row, draft in zip(batch.rows, drafts)]
        width = max(len(b) for b in blocks)
        pad = self.pipe.pad_token_id
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in blocks], device=batch.mask.device)
        fed = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in blocks], device=batch.mask.device)
        mask = torch.cat([batch.mask, fed], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache,
                       use_cache=True, logits_to_keep=width).logits.float()
        batch.mask = mask
        self.step_sizes.append(len(batch.rows))
        finished = []
        for k, (row, draft) in enumerate(zip(batch.rows, drafts)):
            if draft:
                tokens = accepted(draft, logits[k, width - 1 - len(draft):].argmax(-1).tolist())
                rejected = len(draft) - (len(tokens) - 1)
                if rejected:  # fed but not greedy decoding's: masked out, as pads
                    batch.mask[k, -rejected:] = 0
            else:
                tokens = [self._choose(row, logits[k, -1])]
            row.key += [row.next, *tokens[:-1]]
            row.next = tokens[-1]
            if any(row.tracker.advance(0, token) for token in tokens):  # any() stops at the token that ends it
                finished.append(k)
        if finished:
            for k in finished:
                if self.prefixes.capacity and not batch.rows[k].job.cancelled:
                    self.prefixes.insert(batch.rows[k].key, batch.row_kv(k))
            batch.keep([k for k in range(len(batch.rows)) if k not in finished])

    def _draft(self, row: Row) -> list[int]:
        """A greedy job's draft (jump-forward), cut to what its max_tokens leaves."""
        job = row.job
        if job.draft is None or row.generator is not None:
            return []
        return job.draft(job.ids)[: max(0, job.max_tokens - len(job.ids) - 1)]

    @staticmethod
    def _choose(row: Row, logits: torch.Tensor) -> int:
        if row.generator is None:
            return int(logits.argmax())
        return sample(logits, row.job.temperature, row.job.top_p, row.generator)


def image_runs(ids: list[int], image_id: int, lengths: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each image's positions in `ids`: its `lengths[i]` image-token positions, in order."""
    positions = [p for p, token in enumerate(ids) if token == image_id]
    if len(positions) != sum(lengths):
        raise ValueError(f"the prompt holds {len(positions)} image positions, its images {sum(lengths)}")
    runs, taken = [], 0
    for length in lengths:
        start = positions[taken] if length else 0
        if positions[taken:taken + length] != list(range(start, start + length)):
            raise ValueError("an image's positions are not contiguous in the prompt")
        runs.append((start, length))
        taken += length
    return runs


def fail(job: Job, error: Exception) -> None:
    if not job.done:
        job.done = True
        job.emit(Event("error", f"generation failed: {type(error).__name__}: {error}"))
