"""Dynamic batching for the server: requests that arrive close together share one batched `generate`.

A scheduler thread takes the first queued `Job`, waits up to `window_s` for more (up to `max_batch_size`; jobs
already queued are taken at once), and runs them as one left-padded batch through `Pipeline.prepare` and
transformers' `generate`. While a batch runs, new jobs queue up and form the next batch. This is batching per
window, not continuous batching (vLLM's): a job that arrives mid-batch waits for the batch to end.

Each row of a batch has its own settings, so two per-step hooks go into `generate`:

- `RowSampler` (a logits processor) draws each sampled row's token from that row's own `torch.Generator`
  (temperature, top-p), and leaves greedy rows alone; `generate` itself runs greedy, so it takes the one token
  left. A row's draws depend only on its own logits and seed, never on the other rows, so a seeded request gives
  the same answer alone or in any batch (up to float noise from different matmul shapes flipping a near-tie).
- `RowTracker` (a stopping criterion, called once per step with the sequences after the new token, before
  generate's own streamer) appends each row's new token, detects its end (EOS, a stop string, its own
  max_tokens), marks it done, and sends the newly visible text to that row's job: streaming inside a batch.

Text is cut and held back as `Pipeline.decode` / `until_stop` do (at the first stop string, stripped), so the
streamed pieces add up to the whole answer and a greedy answer equals `Pipeline.generate`'s.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from threading import Thread

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from polyfocus.infer.stops import visible_text

logger = logging.getLogger(__name__)

GREEDY_BELOW = 0.001  # temperature at or under which decoding is greedy, as Pipeline and LLaVA's worker


@dataclass
class Event:
    """What a job hears from the scheduler: "delta" (more answer text), then "finish" or "error"."""

    kind: str
    text: str = ""  # delta: the new text; finish: the whole answer; error: the message
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0


@dataclass
class Job:
    """One validated request: a chat with its decoded images, and its own generation settings."""

    images: list  # PIL images, one per <image> in `messages`
    messages: list[dict]
    prompt_tokens: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()  # the request's stop strings (the template's is added by the scheduler)
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens (benches); the request's own stop strings still apply
    stream: bool = True  # whether anyone reads the text as it comes (else only the finish event is needed)
    boxes: list | None = None  # MG-LLaVA: each image's detections (BoxRecord), found once when the job was built
    draft: Callable[[list[int]], list[int]] | None = None  # jump-forward (infer/jump.py): ids the format puts next
    cancelled: bool = False  # set when the client went away: the row stops at the next step
    emit: Callable[[Event], None] = lambda event: None  # called from the scheduler thread; must be thread-safe
    # filled in by the scheduler
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    done: bool = False


class Scheduler:
    """A queue of jobs and the thread that serves it: what the server and the strategies use (`submit`, `stream`,
    `waiting`, `close`, `pipe`). `submit` is safe from any thread. Subclasses write `_loop`, which takes jobs from
    `_queue` (None: close) until it returns."""

    def __init__(self, pipe, max_batch_size: int = 16, window_s: float = 0.01):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pipe = pipe
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # jobs taken from the queue together, newest last
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = Thread(target=self._loop, name=f"polyfocus-{type(self).__name__.lower()}", daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    async def stream(self, job: Job) -> AsyncIterator[Event]:
        """Submit `job` and yield its events as they come (inside an event loop). If the consumer stops early (the
        client went away), the job is cancelled: its row is freed at the next step."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:  # from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down)
                job.cancelled = True

        job.emit = emit
        self.submit(job)
        try:
            while True:
                event = await events.get()
                yield event
                if event.kind != "delta":
                    return
        finally:
            job.cancelled = not job.done

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken into a batch."""
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class Batcher(Scheduler):
    """Batching per window: a batch is the jobs queued within `window_s` of the first, run to its longest answer."""

    def __init__(self, pipe, max_batch_size: int = 16, window_s: float = 0.01):
        super().__init__(pipe, max_batch_size, window_s)
        self._start()

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                logger.exception("batch of %d failed", len(batch))
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.emit(Event("error", f"generation failed: {type(e).__name__}: {e}"))

    def _collect(self) -> list[Job] | None:
        """The next batch: the first job, then whatever arrives within the window (or is already queued).
        Jobs whose clients went away while queued are dropped; a batch of only those is skipped (in a loop, not
        by recursion: any number of them in a row must not exhaust the stack and kill this thread)."""
        while True:
            first = self._queue.get()
            if first is None:
                return None
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:  # closing: serve what we have, then stop
                    self._queue.put(None)
                    break
                batch.append(job)
            if batch := [job for job in batch if not job.cancelled]:
                return batch

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        pipe = self.pipe
        self.batch_sizes.append(len(batch))
        inputs = pipe.prepare([(job.images, job.messages) for job in batch], boxes=[job.boxes for job in batch])
        tracker = RowTracker(batch, pipe.tokenizer, pipe.stop, eos_ids(pipe))
        # EOS is left to the tracker (per row, so that ignore_eos rows can share a batch): eos_token_id=None.
        pipe.model.generate(
            **inputs, max_new_tokens=max(job.max_tokens for job in batch), do_sample=False, eos_token_id=None,
            pad_token_id=pipe.pad_token_id, logits_processor=LogitsProcessorList([RowSampler(batch)]),
            stopping_criteria=StoppingCriteriaList([tracker]),
        )
        tracker.finish_all("length")  # rows still open ran out of steps


def eos_ids(pipe) -> list[int]:
    """The ids that end a reply, as Pipeline.generate has them: the tokenizer's EOS (+ a one-token stop string)."""
    eos = pipe._stop_kwargs()["eos_token_id"]
    return [eos] if isinstance(eos, int) else list(eos)


class RowSampler(LogitsProcessor):
    """Per-row sampling: each sampled row's scores become one-hot at a token drawn with the row's generator."""

    def __init__(self, batch: list[Job]):
        self.batch = batch
        self.generators = [row_generator(job) for job in batch]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, (job, generator) in enumerate(zip(self.batch, self.generators)):
            if generator is None or job.done:  # greedy rows: generate's argmax; done rows: ignored anyway
                continue
            token = sample(scores[row], job.temperature, job.top_p, generator)
            scores[row] = -float("inf")
            scores[row, token] = 0.0
        return scores


def row_generator(job: Job) -> torch.Generator | None:
    """A sampled job's own generator (its seed, or a random one); None for a greedy job."""
    if job.temperature <= GREEDY_BELOW:
        return None
    return torch.Generator().manual_seed(secrets.randbits(63) if job.seed is None else job.seed)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from softmax(logits / temperature), restricted to the top-p nucleus. On the CPU, where the
    generator lives, so the draw does not depend on the device's kernels."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # the first token is always kept
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping after each step: new token, end detection, newly visible text to the job."""

    def __init__(self, batch: list[Job], tokenizer, template_stop: str, eos: list[int]):
        self.batch, self.tokenizer = batch, tokenizer
        self.eos = set(eos)
        self.stops = [[s for s in ([] if job.ignore_eos else [template_stop]) + list(job.stop) if s] for job in batch]
        # A stop string that is a special token never shows in the decoded text (EOS ends the row instead): a job that
        # is not streamed and has no other stop string is decoded once, at its end, not at every token.
        special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self.decode_each = [job.stream or any(stop not in special for stop in stops)
                            for job, stops in zip(batch, self.stops)]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            self.advance(row, token)
        return torch.tensor([job.done for job in self.batch], device=input_ids.device)

    def advance(self, row: int, token: int) -> bool:
        """Row `row` generated `token`: record it, end the job if this token ends it, stream the new text. Whether
        the job is done (so also when it already was, or its client went away)."""
        job, stops = self.batch[row], self.stops[row]
        if job.done:
            return True
        if job.cancelled:
            job.done = True
            return True
        job.ids.append(token)
        if token in self.eos and not job.ignore_eos:
            self._finish(job, stops, "stop")
            return True
        if not self.decode_each[row]:
            if len(job.ids) >= job.max_tokens:
                self._finish(job, stops, "length")
            return job.done
        text, stopped = visible_text(self._decode(job), stops, final=False)
        if stopped:
            self._finish(job, stops, "stop")
        elif len(job.ids) >= job.max_tokens:
            self._finish(job, stops, "length")
        elif len(text) > len(job.emitted) and text.startswith(job.emitted):
            job.emit(Event("delta", text[len(job.emitted):]))
            job.emitted = text
        return job.done

    def finish_all(self, reason: str) -> None:
        for job, stops in zip(self.batch, self.stops):
            if not job.done:
                self._finish(job, stops, reason)

    def _decode(self, job: Job) -> str:
        ids = job.ids[:-1] if job.ids and job.ids[-1] in self.eos else job.ids
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, job: Job, stops: list[str], reason: str) -> None:
        job.done = True
        if job.cancelled:
            return
        text, _ = visible_text(self._decode(job), stops, final=True)
        if text.startswith(job.emitted) and len(text) > len(job.emitted):
            job.emit(Event("delta", text[len(job.emitted):]))
        job.emit(Event("finish", text, finish_reason=reason, completion_tokens=len(job.ids)))


