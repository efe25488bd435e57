"""How an answer is produced, behind one interface that chat, eval and the server all call:

    strategy = get_strategy("dualfocus")
    texts, details = strategy.generate(pipe, requests, max_new_tokens=64)   # offline, batched (chat, eval, demo)
    strategy.refusal(config, images, messages)       # (why it cannot answer this request, the field), or None
    async for event in strategy.serve(batcher, job): ...                     # one request in the server

- "plain": one generation (`Pipeline.generate`; in the server, one job of the batcher);
- "dualfocus", "dualfocus_answer": DualFocus (infer/dualfocus.py): macro answer, box, zoomed micro answer, pick by
  perplexity, scored on the box and the answer (the reference) or on the answer alone. Greedy.

A new strategy is a class with these three methods and a line in STRATEGIES.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from polyfocus.infer.batcher import Event, Job, Scheduler
from polyfocus.infer.dualfocus import DualFocus, make_item


class Plain:
    name = "plain"

    def generate(self, pipe, requests: Sequence, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, **gen_kwargs) -> tuple[list[str], list[dict]]:
        texts = pipe.generate(requests, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              batch_size=batch_size, **gen_kwargs)
        return texts, [{} for _ in texts]

    def refusal(self, config, images: list, messages: list[dict]) -> tuple[str, str] | None:
        return None

    def serve(self, batcher: Scheduler, job: Job) -> AsyncIterator[Event]:
        return batcher.stream(job)


@dataclass(frozen=True)
class DualFocusStrategy:
    name: str
    span: str  # what the perplexity pick averages over: "box_and_answer" (the reference) or "answer"

    def generate(self, pipe, requests: Sequence, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, **gen_kwargs) -> tuple[list[str], list[dict]]:
        """Answers, and each answer's details (macro and micro answers, box, scores, choice, reason)."""
        dualfocus = DualFocus(pipe, span=self.span)
        texts = dualfocus.generate(requests, max_new_tokens, temperature, top_p, batch_size, **gen_kwargs)
        return texts, [result.to_dict() for result in dualfocus.last_results]

    def refusal(self, config, images: list, messages: list[dict]) -> tuple[str, str] | None:
        if make_item(images, messages, 0) is None:
            return (f"strategy {self.name!r} answers one user message with one image (after an optional system "
                    "message)", "messages")
        return None

    def serve(self, batcher: Scheduler, job: Job) -> AsyncIterator[Event]:
        return DualFocus(batcher.pipe, span=self.span).serve(batcher, job)


STRATEGIES = {
    "plain": Plain(),
    "dualfocus": DualFocusStrategy("dualfocus", span="box_and_answer"),
    "dualfocus_answer": DualFocusStrategy("dualfocus_answer", span="answer"),
}


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
