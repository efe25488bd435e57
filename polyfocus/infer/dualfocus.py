"""DualFocus inference (spec dualfocus.md §4-6): macro answer, predicted box, zoomed micro answer, pick by perplexity.

    from polyfocus.infer.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/dualfocus_stage2")
    question = "What is the code written on the star?\\nAnswer the question using a single word or phrase."
    pipe.generate([("a.png", question)], strategy="dualfocus")
    DualFocus(pipe).answer([("a.png", question)])   # with the macro/micro answers, the box, the scores, the reason

Per question, on one image (greedy, as the reference):
1. macro: the question as asked, with the full image (exactly the plain answer);
2. box:   "Please provide the bounding box coordinate of the region this question asks: {Q}" -> "[x1, y1, x2, y2]";
3. zoom:  the first box in the reply -> `zoom` (polyfocus/data/dualfocus.py, the crop training used); a reply without
          a box or a degenerate box ends here with the macro answer;
4. micro: round 1 and its reply as history, then "Please combine the information from these two images and answer
          this question: {prompt}" with [full image, crop];
5. pick:  multiple choice: the one valid option letter when only one answer has one, the macro answer when neither
          or both pick the same; otherwise (and always for open answers that differ) the candidate with the lower
          mean token NLL in the two-image context (section 5), ties to the macro answer.

Scoring context (shared by both candidates): round 1, its box reply, then "<image>\\nPlease combine ...: {Q}\\nAnswer
the question using a single word or phrase." and the candidate as the reply; for multiple choice the candidates are
the two options' texts. span="box_and_answer" (the reference) averages the NLL over every supervised token, the box
reply's included; span="answer" (our deviation, spec §5) over the candidate's tokens and its end token only.

The procedure is written once (`steps`: a generator that yields what to generate or score and takes the results);
three executors run it, giving the same choices:
- `cached=False` ("reference-style"): question by question, each step its own pass (3 generations + 1 scoring
  forward per candidate), as the reference scripts run;
- `cached=True` (default): questions in batches, on one KV cache per batch. The macro and box prompts share their
  prefix (system prompt + image): it is computed once, and both are generated as two rows continuing from it. The
  micro prompt starts with the box prompt, which is still in the cache: only the box reply, the crop and round 2
  are new. The scoring context shares the micro prompt up to its question text: both candidates continue from
  there, as two rows of one forward. Blocks are right-aligned (pads in the middle of a row are masked, and position
  ids count real tokens only, as `generate`'s), so every row's newest token is in the last column;
- `serve` (the server): each generation a job of the server's batcher, batched with the other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache, LogitsProcessorList

from polyfocus.config import IGNORE_INDEX
from polyfocus.data.boxes import indexed
from polyfocus.data.dualfocus import ZOOM_PROMPT, Question, box_turn, parse_box_text, split_prompt, zoom, zoom_turn
from polyfocus.data.images import load_image
from polyfocus.data.prompts import LETTERS, SHORT_ANSWER, mcq_letter
from polyfocus.data.templates import IMAGE_TOKEN, encode
from polyfocus.infer.batcher import GREEDY_BELOW, Event, Job
from polyfocus.infer.jump import BoxDrafter, accepted
from polyfocus.infer.requests import normalize_request

logger = logging.getLogger(__name__)

BOX_MAX_NEW_TOKENS = 64  # the box reply ("[0.12, 0.34, 0.56, 0.78]") takes ~25 tokens with Llama's digit split
SPANS = ("box_and_answer", "answer")


@dataclass
class DualFocusResult:
    answer: str  # what is returned: the macro or the micro answer, as generated
    macro: str
    box_text: str | None = None  # the model's box reply
    crop_box: tuple[int, int, int, int] | None = None  # the crop, in pixels of the original image
    micro: str | None = None
    candidates: list[str] | None = None  # what was scored (option texts for multiple choice)
    scores: list[float] | None = None  # mean NLL of each candidate
    choice: str = "macro"  # "macro" | "micro"
    reason: str = ""  # why this choice (see `select`), or why DualFocus did not apply

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Item:
    """One question in flight: its image, its conversations, and its result so far."""

    image: Image.Image
    system: list[dict]  # [] or the request's system message, kept in every conversation
    macro_messages: list[dict]  # the request as asked
    parts: Question
    result: DualFocusResult | None = None
    crop: Image.Image | None = None
    object_boxes: list | None = None  # the image's and the crop's detected boxes (object tokens), found once

    def box_messages(self) -> list[dict]:
        return [*self.system, {"role": "user", "content": box_turn(self.parts.question)}]

    def micro_messages(self, box_reply: str) -> list[dict]:
        return [*self.box_messages(), {"role": "assistant", "content": box_reply},
                {"role": "user", "content": zoom_turn(self.parts.prompt)}]

    def score_messages(self, box_reply: str, candidate: str | None) -> list[dict]:
        """The scoring context; candidate None: up to the generation prompt."""
        question = f"{IMAGE_TOKEN}\n{ZOOM_PROMPT}{self.parts.question}{SHORT_ANSWER}"
        messages = [*self.box_messages(), {"role": "assistant", "content": box_reply},
                    {"role": "user", "content": question}]
        return messages if candidate is None else [*messages, {"role": "assistant", "content": candidate}]


# ----------------------------------------------------------------------------- the selection rule


def select(parts: Question, macro: str, micro: str) -> tuple[str | None, list[str] | None, str]:
    """(choice, candidates, reason). choice None: score the two candidates and take the lower mean NLL.

    Multiple choice (spec §4 step 5): each answer is read as an option letter the way the reference's
    process_outputs does (`mcq_letter`; the micro answer stripped of newlines and dots first). Open answers: the
    candidates are the macro answer and the micro answer stripped the same way (model_vqa_textvqa.py)."""
    options = parts.options
    if options:
        letters = LETTERS[: len(options)]
        macro_letter = mcq_letter(macro, options)
        micro_letter = mcq_letter(micro.strip("\n").strip("."), options)
        macro_valid, micro_valid = macro_letter in letters, micro_letter in letters
        if macro_valid and not micro_valid:
            return "macro", None, "only_macro_valid"
        if micro_valid and not macro_valid:
            return "micro", None, "only_micro_valid"
        if not macro_valid:
            return "macro", None, "neither_valid"
        if macro_letter == micro_letter:  # the same option: scoring would tie, and a tie goes to the macro answer
            return "macro", None, "same_answer"
        return None, [options[letters.index(macro_letter)], options[letters.index(micro_letter)]], "perplexity"
    micro = micro.strip("\n").strip(".")  # as the reference's TextVQA script: the micro answer scored without its dots
    if macro == micro:
        return "macro", None, "same_answer"
    return None, [macro, micro], "perplexity"


def pick(scores: Sequence[float]) -> str:
    """The lower mean NLL wins; a tie goes to the macro answer (the reference's argmin takes the first)."""
    return "micro" if scores[1] < scores[0] else "macro"


def set_choice(result: DualFocusResult, choice: str) -> None:
    result.choice = choice
    result.answer = result.micro if choice == "micro" else result.macro


# ----------------------------------------------------------------------------- the procedure, once


@dataclass
class Ask:
    """A step: generate a reply to `messages` with `images`. box: the box reply (greedy, its own token budget, the
    request's stop strings ignored); otherwise an answer, with the request's settings."""

    messages: list[dict]
    images: list
    box: bool = False


@dataclass
class Score:
    """A step: the mean NLL of each candidate in the scoring context (`Item.score_messages`)."""

    candidates: list[str]


Steps = Generator["list[Ask] | Score", "list[str] | list[float]", DualFocusResult]


def steps(item: Item) -> Steps:
    """DualFocus on one question (spec §4), as the steps to run: each `yield` hands an executor the generations
    (a list of Ask) or the scoring (Score) to do, and receives their texts (or mean NLLs); the return value is the
    result. The reference-style, the cached-and-batched and the server's executors all run this one procedure."""
    macro, box = yield [Ask(item.macro_messages, [item.image]), Ask(item.box_messages(), [item.image], box=True)]
    result = item.result = DualFocusResult(macro, macro, box_text=box)
    parsed = parse_box_text(box)
    zoomed = zoom(item.image, parsed) if parsed is not None else None
    if zoomed is None:  # without a usable box the macro answer stands
        result.reason = "no_box" if parsed is None else "degenerate_box"
        return result
    item.crop, result.crop_box = zoomed
    (result.micro,) = yield [Ask(item.micro_messages(box), [item.image, item.crop])]
    choice, result.candidates, result.reason = select(item.parts, result.macro, result.micro)
    if choice is None:
        result.scores = [float(s) for s in (yield Score(result.candidates))]
        choice = pick(result.scores)
    set_choice(result, choice)
    return result


def run_steps(procedure: Steps, generate, score, step=None) -> DualFocusResult:
    """Run a procedure to its end, one step at a time: `generate(asks)` -> texts, `score(Score)` -> NLLs. step: the
    step it is waiting at (None: it has not started)."""
    step = next(procedure) if step is None else step
    try:
        while True:
            step = procedure.send(score(step) if isinstance(step, Score) else generate(step))
    except StopIteration as done:
        return done.value


# ----------------------------------------------------------------------------- the strategy


class DualFocus:
    """DualFocus over a `Pipeline`, with the Pipeline's `generate(requests, ...)` signature (what the eval runner and
    `Pipeline.generate(strategy="dualfocus")` call), and `serve(batcher, job)` for the server. A request that is not
    one user message with one image is answered plainly (reason "not_single_image")."""

    def __init__(self, pipe, span: str = "box_and_answer", cached: bool = True,
                 box_max_new_tokens: int = BOX_MAX_NEW_TOKENS, jump_forward: bool = True):
        if span not in SPANS:
            raise ValueError(f"span must be one of {SPANS}, got {span!r}")
        # MG-LLaVA's object tokens (one per detected box) make an image's token count depend on the image, which the
        # cached path's block plan takes as fixed: such a model takes the reference path, every step its own pass.
        self.object_tokens = pipe.object_boxes is not None
        self.pipe, self.span, self.box_max_new_tokens = pipe, span, box_max_new_tokens
        self.cached = cached and not self.object_tokens
        self.jump_forward = jump_forward  # the box reply's fixed characters verified in passes with the digits
        self.last_results: list[DualFocusResult] = []
        self._drafter: BoxDrafter | None = None

    def box_drafter(self) -> BoxDrafter:
        if self._drafter is None:
            self._drafter = BoxDrafter.for_pipe(self.pipe)
        return self._drafter

    def generate(self, requests: Sequence, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 batch_size: int = 16, **gen_kwargs) -> list[str]:
        """Answers only; the details of each are in `self.last_results`."""
        if temperature > GREEDY_BELOW:
            raise ValueError(f"dualfocus decodes greedily, as the reference; got temperature={temperature}")
        self.last_results = self.answer(requests, max_new_tokens, batch_size, **gen_kwargs)
        return [r.answer for r in self.last_results]

    @torch.inference_mode()
    def answer(self, requests: Sequence, max_new_tokens: int = 128, batch_size: int = 16,
               **gen_kwargs) -> list[DualFocusResult]:
        if gen_kwargs.get("num_beams", 1) != 1:  # the cached path continues one row per question from its cache
            raise ValueError(f"dualfocus decodes greedily with one beam, as the reference; got "
                             f"num_beams={gen_kwargs['num_beams']}")
        results: list[DualFocusResult | None] = [None] * len(requests)
        items, plain = {}, {}
        for i, (images, messages) in enumerate(requests):
            item = make_item(images, messages, i)
            if item is None:
                plain[i] = (images, messages)
            else:
                items[i] = item
        if plain:
            answers = self.pipe.generate(list(plain.values()), max_new_tokens, batch_size=batch_size, **gen_kwargs)
            for i, text in zip(plain, answers):
                results[i] = DualFocusResult(text, text, reason="not_single_image")
        order = list(items)
        step = batch_size if self.cached else 1
        for start in range(0, len(order), step):
            batch = [items[i] for i in order[start:start + step]]
            if self.cached:
                self._answer_cached(batch, max_new_tokens, gen_kwargs)
            else:
                self._answer_reference(batch[0], max_new_tokens, gen_kwargs)
            for i, item in zip(order[start:start + step], batch):
                results[i] = item.result
        return results

    # ---- reference-style: every step its own pass ------------------------------------------------------------

    def _answer_reference(self, item: Item, max_new_tokens: int, gen_kwargs: dict,
                          procedure: Steps | None = None, step=None) -> None:
        """Run `item`'s procedure (from `step`, or from its start) one pass per generation and per scoring."""

        def generate(asks: list[Ask]) -> list[str]:
            return [self.pipe.generate([(ask.images, ask.messages)],
                                       self.box_max_new_tokens if ask.box else max_new_tokens, **gen_kwargs)[0]
                    for ask in asks]

        run_steps(procedure or steps(item), generate, lambda score: [self.score(item, c) for c in score.candidates],
                  step)

    def score(self, item: Item, candidate: str) -> float:
        """Mean NLL of one scoring conversation, in one forward of its own (the reference's PPL pass)."""
        pipe, config = self.pipe, self.pipe.model.config
        messages = item.score_messages(item.result.box_text, candidate)
        boxes = self._object_boxes(item)
        extra = [len(b) for b in boxes] if boxes is not None else [0, 0]
        enc = encode(messages, pipe.tokenizer, pipe.template, config.image_token_id,
                     [config.num_image_tokens + n for n in extra])
        labels = torch.tensor(enc.labels)
        if self.span == "answer":
            labels[: self._reply_start(item, enc.input_ids, extra)] = IGNORE_INDEX
        ids = torch.tensor([enc.input_ids], device=pipe.model.device)
        pixel_values = pipe.image_processor([item.image, item.crop]).to(pipe.model.device)
        image_boxes = {"image_boxes": indexed(boxes).to(pipe.model.device)} if boxes is not None else {}
        logits = pipe.model(input_ids=ids, pixel_values=pixel_values, **image_boxes).logits[0]
        nll = token_nll(logits[:-1], labels[1:].to(logits.device))
        return float(nll.sum() / len(nll))

    def _object_boxes(self, item: Item) -> list[torch.Tensor] | None:
        """The image's and the crop's boxes for a model with object tokens ([N_i, 4] each, from the model's detector,
        as `Pipeline.generate` gives them to the micro answer), else None."""
        if not self.object_tokens:
            return None
        if item.object_boxes is None:  # both candidates are scored on the same two images: detect once
            item.object_boxes = [self.pipe.image_boxes(image, None, where=what)
                                 for image, what in ((item.image, "the image"), (item.crop, "the crop"))]
        return item.object_boxes

    def _reply_start(self, item: Item, ids: list[int], object_tokens: list[int]) -> int:
        """Where the candidate's reply starts: the length of the context's ids (checked to be a prefix)."""
        context = self.pipe.encode(item.score_messages(item.result.box_text, None), 2, object_tokens=object_tokens)
        if ids[: len(context)] != context:
            raise ValueError("the conversation template renders the scoring context differently when a reply "
                             "follows, so the candidate's tokens cannot be located; use a built-in template")
        return len(context)

    # ---- cached and batched ------------------------------------------------------------------------------------

    def _answer_cached(self, items: list[Item], max_new_tokens: int, gen_kwargs: dict) -> None:
        """The questions' procedures, each step batched over the questions on one KV cache:
        1. macro and box: their shared prefix (system prompt + image) once, then both as rows 2i and 2i+1.
        2. micro: continues the box rows (box prompt cached) with the box reply, the crop and round 2.
        3. scoring (`_score_cached`): continues the micro rows."""
        pipe, config = self.pipe, self.pipe.model.config
        procedures = [steps(it) for it in items]
        for procedure in procedures:
            next(procedure)  # the macro and box asks, built here from the same messages
        macro_ids = [pipe.encode(it.macro_messages, 1) for it in items]
        box_ids = [pipe.encode(it.box_messages(), 1) for it in items]
        shared = [min(common_prefix(m, b), len(m) - 1, len(b) - 1) for m, b in zip(macro_ids, box_ids)]
        has_image = [m[:s].count(config.image_token_id) == config.num_image_tokens for m, s in zip(macro_ids, shared)]
        if not all(has_image):  # a question asked with its image after the text: no shared prefix worth caching
            for item, procedure in ((it, p) for it, p, ok in zip(items, procedures, has_image) if not ok):
                procedure.close()
                self._answer_reference(item, max_new_tokens, gen_kwargs)
            keep = [i for i, ok in enumerate(has_image) if ok]
            items, procedures, macro_ids, box_ids, shared = ([x[i] for i in keep] for x in
                                                             (items, procedures, macro_ids, box_ids, shared))
            if not items:
                return
        rows = Rows(pipe)
        rows.forward([m[:s] for m, s in zip(macro_ids, shared)], images=[it.image for it in items])
        rows.repeat(2)
        budgets = [max_new_tokens, self.box_max_new_tokens] * len(items)
        suffixes = [ids[s:] for m, b, s in zip(macro_ids, box_ids, shared) for ids in (m, b)]
        box = self.box_drafter() if self.jump_forward else None
        # the macro rows leave the cache once answered: the box rows go on alone, and the micro prompt continues them
        new = rows.complete(suffixes, budgets, gen_kwargs, drafters=[None, box] * len(items),
                            release=[True, False] * len(items))
        texts = [pipe.decode(ids) for ids in new]
        pending = {}  # question -> its next step, for the questions still going after their box
        for i, (procedure, macro, box) in enumerate(zip(procedures, texts[0::2], texts[1::2])):
            try:
                pending[i] = procedure.send([macro, box])
            except StopIteration:  # no usable box: the macro answer
                pass
        plans = {i: self._plan(items[i], box_ids[i]) for i in pending}
        for i in [i for i in pending if plans[i] is None]:  # a template that is not prefix-stable: no cache reuse
            self._answer_reference(items[i], max_new_tokens, gen_kwargs, procedures[i], pending.pop(i))
        live = list(pending)
        if not live:
            return
        rows.select(live)  # the box rows, one per question
        # the box reply (its NLL taken on the way, for the reference's score), the crop and round 2, in one pass
        box_nll = rows.forward([plans[i].reply + plans[i].to_question for i in live],
                               images=[items[i].crop for i in live],
                               labels=[plans[i].reply_labels + [IGNORE_INDEX] * len(plans[i].to_question)
                                       for i in live])
        new = rows.complete([plans[i].rest for i in live], [max_new_tokens] * len(live), gen_kwargs, keep=False)
        scored = []  # (row, question) of the questions that go to the perplexity pick
        for row, (i, ids) in enumerate(zip(live, new)):
            try:
                procedures[i].send([pipe.decode(ids)])
            except StopIteration:  # decided without scoring
                continue
            scored.append((row, i))
        if scored:
            scores = self._score_cached(rows, [(row, plans[i]) for row, i in scored], box_nll)
            for (_, i), pair in zip(scored, scores):
                with contextlib.suppress(StopIteration):  # the scores are its last step
                    procedures[i].send(pair)

    def _score_cached(self, rows: Rows, scored: list[tuple[int, Plan]], box_nll) -> list[list[float]]:
        """Scoring: both candidates of a question continue its micro row from where round 2's text starts (the
        scoring context's own question text), as two rows of one forward. Returns each question's two mean NLLs."""
        rows.select([row for row, _ in scored])
        rows.repeat(2)
        blocks = [plan.candidate(c) for _, plan in scored for c in plan.item.result.candidates]
        sums, counts = rows.forward([ids for ids, _ in blocks], labels=[labels for _, labels in blocks])
        if self.span == "box_and_answer":  # the box reply's tokens count in both candidates' means
            rows_of_pairs = torch.tensor([row for row, _ in scored], device=sums.device).repeat_interleave(2)
            sums, counts = sums + box_nll[0][rows_of_pairs], counts + box_nll[1][rows_of_pairs]
        scores = (sums / counts).tolist()
        return [scores[2 * k: 2 * k + 2] for k in range(len(scored))]

    def _plan(self, item: Item, box_ids: list[int]) -> Plan | None:
        """How the micro prompt and the scoring conversations split into cached blocks, or None when the template
        does not render them as continuations of the box prompt."""
        pipe, config = self.pipe, self.pipe.model.config
        box = item.result.box_text
        micro = pipe.encode(item.micro_messages(box), 2)
        context = pipe.encode(item.score_messages(box, None), 2)
        probe = encode(item.score_messages(box, ""), pipe.tokenizer, pipe.template, config.image_token_id,
                       [config.num_image_tokens] * 2)
        start = len(box_ids)
        supervised = [j for j, label in enumerate(probe.labels) if label != IGNORE_INDEX]
        reply_end = next((supervised[0] + k for k, j in enumerate(supervised) if j != supervised[0] + k),
                         supervised[-1] + 1)  # the end of the first run of supervised positions: the box reply
        split = max(min(common_prefix(micro, context), len(micro) - 1), reply_end)
        if (micro[:start] != box_ids or probe.input_ids[:len(context)] != context or not supervised
                or supervised[0] < start or micro[:reply_end] != context[:reply_end] or split > len(context)):
            return None
        if micro[reply_end:split].count(config.image_token_id) != config.num_image_tokens:  # the crop: in one block
            return None
        return Plan(micro, context, start, reply_end, split, probe.labels[start:reply_end], item, pipe, self.span)

    # ---- in the server -----------------------------------------------------------------------------------------

    async def serve(self, batcher, job) -> AsyncIterator[Event]:
        """One request in the server: the procedure's generations go to the batcher as jobs (the macro answer and
        the box together, batched with whatever else is running), the scoring to a worker thread. The chosen
        answer comes as one piece. The box is greedy; the answers follow the request's sampling settings (greedy
        at temperature 0, as the reference). On the continuous scheduler the box job decodes jump-forward, and the
        prefix cache shares the image's prefix between the macro and box prompts (whichever is prefilled second)
        and the box prompt and reply with the micro prompt."""
        pipe = self.pipe
        context = getattr(pipe.model.config.text_config, "max_position_embeddings", None) or 2048
        item = make_item(job.images, job.messages, 0)  # the strategy's refusal made sure it applies
        box = self.box_drafter() if self.jump_forward else None  # a continuous scheduler verifies its drafts

        async def run(ask: Ask) -> Event:
            """One job through the batcher: its last event (the finish, or an error)."""
            prompt_tokens = len(pipe.encode(ask.messages, len(ask.images)))
            room = context - prompt_tokens  # the micro prompt holds two images: it may need more than the request's
            if room < 1:
                return Event("error", f"dualfocus: the {len(ask.images)}-image prompt ({prompt_tokens} tokens) "
                                      "leaves no room in the context")
            budget = self.box_max_new_tokens if ask.box else job.max_tokens
            sub = Job(images=ask.images, messages=ask.messages, prompt_tokens=prompt_tokens,
                      max_tokens=min(budget, room), temperature=0.0 if ask.box else job.temperature, top_p=job.top_p,
                      seed=job.seed, stop=() if ask.box else job.stop, draft=box if ask.box else None,
                      stream=False)  # only its end is read
            last = None
            async for last in batcher.stream(sub):
                pass
            return last

        def score(step: Score) -> list[float]:
            with torch.inference_mode():
                return [self.score(item, c) for c in step.candidates]

        procedure = steps(item)
        macro, box = await asyncio.gather(*(run(ask) for ask in next(procedure)))
        if macro.kind == "error":
            yield macro
            return
        chosen = macro
        try:
            step = procedure.send([macro.text, box.text if box.kind == "finish" else ""])
            (micro,) = await asyncio.gather(*(run(ask) for ask in step))
            if micro.kind != "finish":
                logger.warning("dualfocus: the micro answer failed (%s); answering with the macro answer", micro.text)
                procedure.close()
            else:
                step = procedure.send([micro.text])
                procedure.send(await asyncio.to_thread(score, step))
        except StopIteration as done:
            chosen = micro if done.value.choice == "micro" else macro
        if chosen.text:
            yield Event("delta", chosen.text)
        yield chosen


@dataclass
class Plan:
    """One question's token blocks on the cached path (absolute positions in the micro prompt's ids):
    [box prompt: cached] [reply: box text + end token] [to_question: up to `split`, the crop inside] [rest]
    and the scoring conversation = micro[:split] + candidate block."""

    micro: list[int]
    context: list[int]
    start: int
    reply_end: int
    split: int
    reply_labels: list[int]
    item: Item = field(repr=False)
    pipe: object = field(repr=False)
    span: str = "box_and_answer"

    @property
    def reply(self) -> list[int]:
        return self.micro[self.start:self.reply_end]

    @property
    def to_question(self) -> list[int]:
        return self.micro[self.reply_end:self.split]

    @property
    def rest(self) -> list[int]:
        return self.micro[self.split:]

    def candidate(self, candidate: str) -> tuple[list[int], list[int]]:
        """The scoring block of one candidate and its labels (the candidate's reply and end token)."""
        config = self.pipe.model.config
        enc = encode(self.item.score_messages(self.item.result.box_text, candidate), self.pipe.tokenizer,
                     self.pipe.template, config.image_token_id, [config.num_image_tokens] * 2)
        if enc.input_ids[: len(self.context)] != self.context:
            raise ValueError("the conversation template renders the scoring context differently when a reply "
                             "follows, so the candidate's tokens cannot be located; use a built-in template")
        return enc.input_ids[self.split:], enc.labels[self.split:]


class Rows:
    """Sequences grown block by block on one KV cache. `ids` / `mask` [R, T] mirror what the cache holds; each
    block is right-aligned, so a row's newest token is always the last column and `last_logits` [R, V] (the logits
    there) predict its next token."""

    def __init__(self, pipe):
        self.pipe, self.model = pipe, pipe.model
        self.device = self.model.device
        self.cache = DynamicCache(config=self.model.config.text_config)
        self.ids = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        self.last_logits: torch.Tensor | None = None

    def block(self, pieces: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in pieces)
        ids = torch.tensor([[fill] * (width - len(p)) + p for p in pieces], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pieces], device=self.device)
        return ids, mask

    def forward(self, pieces: list[list[int]], images: list[Image.Image] | None = None,
                labels: list[list[int]] | None = None, last: int | None = None):
        """Feed one block per row (the images it holds, in order). With labels: per-row (NLL sum, count) over the
        supervised tokens of the block, each predicted from the position before it (`last_logits` for the first).
        last: return the logits of the block's last `last` columns [R, last, V] (float)."""
        ids, mask = self.block(pieces, self.pipe.pad_token_id)
        if self.ids.shape[0] != ids.shape[0]:  # the first block
            self.ids, self.mask = self.ids.expand(ids.shape[0], 0), self.mask.expand(ids.shape[0], 0)
        full_mask = torch.cat([self.mask, mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        pixel_values = self.pipe.image_processor(images).to(self.device) if images else None
        width = ids.shape[1]
        targets = self.block(labels, IGNORE_INDEX)[0] if labels is not None else None
        if last is not None:
            keep = torch.arange(width - last, width, device=self.device)
        elif targets is None:
            keep = torch.tensor([width - 1], device=self.device)
        else:  # the LM head only where it predicts a label (the column before it), and at the end
            label_columns = (targets != IGNORE_INDEX).any(0).nonzero().flatten()
            keep = torch.cat([label_columns - 1, torch.tensor([width - 1], device=self.device)]).clamp(min=0).unique()
        logits = self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, pixel_values=pixel_values,
                            cache=self.cache, use_cache=True, logits_to_keep=keep).logits
        previous = self.last_logits
        self.ids, self.mask = torch.cat([self.ids, ids], dim=1), full_mask
        self.last_logits = logits[:, -1].float()
        if last is not None:
            return logits.float()
        if targets is None:
            return None
        # the logits predicting label column c: column c-1's, or the previous block's last ones for a row's first token
        columns = label_columns.tolist()
        at = {c: k for k, c in enumerate(keep.tolist())}
        predictors = torch.stack([logits[:, at[c - 1]] if c > 0 else previous.to(logits.dtype) for c in columns], 1)
        first = (mask.bool() & (mask.cumsum(-1) == 1))[:, label_columns]  # after pads: predicted from `previous`
        predictors[first] = previous[:, None].expand(-1, len(columns), -1)[first].to(predictors.dtype)
        targets = targets[:, label_columns]
        nll = torch.nn.functional.cross_entropy(predictors.float().transpose(1, 2), targets,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        return nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)

    def generate(self, pieces: list[list[int]], max_new_tokens: int, gen_kwargs: dict, keep: bool) -> torch.Tensor:
        """Greedy continuation of every row after its block: the new tokens [R, n]. The block is fed by `forward`
        (so `last_logits` are the raw logits at its end), its last token again by `generate`. Afterwards the cache
        holds the rows up to the block's end (keep=True) or as they were before it (keep=False)."""
        before, previous = self.ids.shape[1], self.last_logits
        self.forward(pieces)
        self.cache.crop(-1)
        history = self.ids
        image_id = self.model.config.image_token_id
        if not 0 <= image_id < self.model.get_input_embeddings().num_embeddings:  # as the model's own generate
            history = history.masked_fill(history == image_id, 0)
        inputs = {"input_ids": history, "attention_mask": self.mask}
        longest = int(self.mask.sum(-1).max())  # pads in the middle hold no position: the context counts real tokens
        kwargs = self.pipe._generation_kwargs({"input_ids": history[:, :longest]}, max_new_tokens, 0.0, 1.0,
                                              gen_kwargs)
        out = self.model.generate(**inputs, cache=self.cache, **kwargs)
        new = out[:, history.shape[1]:]
        end = before if not keep else self.ids.shape[1]
        self.cache.crop(end - self.cache.get_seq_length())
        if not keep:
            self.ids, self.mask, self.last_logits = self.ids[:, :end], self.mask[:, :end], previous
        return new

    def complete(self, pieces: list[list[int]], budgets: list[int], gen_kwargs: dict, drafters: list | None = None,
                 keep: bool = True, release: list[bool] | None = None) -> list[list[int]]:
        """Each row's greedy continuation after its block, up to its budget: by `decode` (jump-forward for the rows
        with a drafter; see there for keep and release), or by `generate` when gen_kwargs or the model's generation
        config ask for more than logits processors of the caller's."""
        processors = greedy_processors(self.model, gen_kwargs)
        if processors is not None:
            return self.decode(pieces, budgets, processors, drafters, keep, release)
        new = self.generate(pieces, max(budgets), gen_kwargs, keep)
        if release:
            self.select([r for r, gone in enumerate(release) if not gone])
        return [ids[:budget].tolist() for ids, budget in zip(new, budgets)]  # greedy: a shorter run's prefix

    def decode(self, pieces: list[list[int]], budgets: list[int], processors, drafters: list | None = None,
               keep: bool = True, release: list[bool] | None = None) -> list[list[int]]:
        """Greedy continuation of every row after its block (`generate`'s, with the caller's logits processors), in a
        loop of our own so that rows with a drafter decode jump-forward (infer/jump.py): each pass feeds a row's
        newest token (its block, in the first pass) and its draft, and keeps the tokens greedy decoding gives, several
        per pass where the draft holds. A row ends at an end token, at the template's stop string or at its budget
        (capped by the context). Returns each row's new tokens.

        Afterwards the cache holds the rows up to their block's end (keep=True) or as they were before it
        (keep=False). Rows marked in `release` leave the cache as soon as they end (their answer is all the caller
        needs), so the others decode in a smaller batch; the cache then holds only the other rows, in order."""
        pipe, n_rows = self.pipe, len(pieces)
        before, previous = self.ids.shape[1], self.last_logits
        stop_kwargs = pipe._stop_kwargs()
        ends, stop = set(stop_kwargs["eos_token_id"]), stop_kwargs.get("stop_strings", [""])[0]
        context = getattr(self.model.config.text_config, "max_position_embeddings", None) or 2**31
        real = self.mask.bool() if self.mask.shape[0] == n_rows else None
        lengths = [len(p) + (int(real[r].sum()) if real is not None else 0) for r, p in enumerate(pieces)]
        budgets = [min(b, context - n) for b, n in zip(budgets, lengths)]
        histories = None
        if processors:  # what `generate` would show them: each row's tokens, pads in the middle left out
            image_id = self.model.config.image_token_id
            hidden = not 0 <= image_id < self.model.get_input_embeddings().num_embeddings  # as the model's generate
            histories = [[0 if hidden and t == image_id else t
                          for t in (self.ids[r][real[r]].tolist() if real is not None else []) + list(p)]
                         for r, p in enumerate(pieces)]
        release = release or [False] * n_rows
        new: list[list[int]] = [[] for _ in pieces]
        done = [budget < 1 for budget in budgets]
        index = list(range(n_rows))  # the rows in the cache, in order
        heads = [list(p) for p in pieces]  # what each row feeds before its draft: its block, then its newest token
        first = True
        block_logits: dict[int, torch.Tensor] = {}

        def greedy(rows: list[int], extra: list[list[int]], scores: torch.Tensor) -> list[int]:
            """The greedy token of each of `rows` (after its new tokens and `extra`) from its scores [n, V], after the
            processors. They see one row per position a pass verifies, so they must judge a row by its own tokens,
            as transformers' processors do (a processor that keeps state across calls: pass it to `generate`)."""
            if processors and rows:
                seqs = [histories[r] + new[r] + x for r, x in zip(rows, extra)]
                width = max(len(q) for q in seqs)
                ids = torch.tensor([[pipe.pad_token_id] * (width - len(q)) + q for q in seqs], device=self.device)
                scores = processors(ids, scores.clone())
            return scores.argmax(-1).tolist()

        def take(r: int, tokens: list[int]) -> None:
            for token in tokens:
                new[r].append(token)
                if token in ends or len(new[r]) >= budgets[r] or (stop and stop in pipe.tokenizer.decode(new[r])):
                    done[r] = True
                    return

        while first or not all(done):
            leaving = [k for k, r in enumerate(index) if done[r] and release[r]]
            if leaving and not first:
                self.select([k for k in range(len(index)) if k not in leaving])
                index = [r for k, r in enumerate(index) if k not in leaving]
            drafts = {r: (drafters[r](new[r])[: budgets[r] - len(new[r]) - 1]
                          if drafters and drafters[r] and not done[r] else []) for r in index}
            blocks = [heads[r] + drafts[r] if first or not done[r] else [] for r in index]
            last = max(len(drafts[r]) for r in index) + 1  # the columns whose logits verify the drafts
            logits = self.forward(blocks, last=last)  # [R, last, V]
            if first:
                block_end = self.ids.shape[1]
                block_logits = {r: logits[k, -len(drafts[r]) - 1] for k, r in enumerate(index)}
                block_drafts = {r: len(drafts[r]) for r in index}
            # every row's greedy token after each prefix of its draft, all in one call of the processors
            at = {r: k for k, r in enumerate(index)}
            positions = [(r, j) for r in index if not done[r] for j in range(len(drafts[r]) + 1)]
            scores = logits[[at[r] for r, _ in positions], [last - 1 - len(drafts[r]) + j for r, j in positions]]
            predictions: dict[int, list[int]] = {r: [] for r, _ in positions}
            for (r, _), token in zip(positions, greedy([r for r, _ in positions],
                                                       [drafts[r][:j] for r, j in positions], scores)):
                predictions[r].append(token)
            for k, r in enumerate(index):
                if r not in predictions:
                    continue
                tokens = accepted(drafts[r], predictions[r])
                rejected = len(drafts[r]) - (len(tokens) - 1)
                if rejected:  # the rejected draft tokens are in the cache: masked out, as pads
                    self.mask[k, -rejected:] = 0
                take(r, tokens)
                heads[r] = [tokens[-1]]
            first = False
        gone = [k for k, r in enumerate(index) if release[r]]
        if gone:
            self.select([k for k in range(len(index)) if k not in gone])
            index = [r for k, r in enumerate(index) if k not in gone]
        end = block_end if keep else before
        self.cache.crop(end - self.cache.get_seq_length())
        self.ids, self.mask = self.ids[:, :end], self.mask[:, :end]
        if keep:  # the first pass's drafts are not the block: masked out
            for k, r in enumerate(index):
                if block_drafts[r]:
                    self.mask[k, -block_drafts[r]:] = 0
            self.last_logits = torch.stack([block_logits[r] for r in index]) if index else self.last_logits[:0]
        else:
            self.last_logits = previous[index] if previous is not None else None
        return new

    def repeat(self, n: int) -> None:
        """Each row n times in a row (row r -> rows n*r ... n*r + n-1)."""
        self.cache.batch_repeat_interleave(n)
        self.ids, self.mask = self.ids.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0)
        self.last_logits = self.last_logits.repeat_interleave(n, 0)

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.ids, self.mask, self.last_logits = self.ids[index], self.mask[index], self.last_logits[index]


# ----------------------------------------------------------------------------- helpers


def make_item(images, messages, index: int) -> Item | None:
    """The question of a request, or None when DualFocus does not apply (not one image in one user message)."""
    images, messages = normalize_request(images, messages, index)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(images) != 1 or len(turns) != 1 or turns[0]["role"] != "user" or len(system) > 1:
        return None
    image = load_image(images[0]) if isinstance(images[0], (str, os.PathLike)) else images[0].convert("RGB")
    return Item(image, system, messages, split_prompt(turns[0]["content"]))


def greedy_processors(model, gen_kwargs: dict) -> LogitsProcessorList | None:
    """The logits processors that greedy `generate` runs with gen_kwargs, when they are only the caller's
    `logits_processor`; None when gen_kwargs or the model's generation config (a repetition penalty, ...) ask for
    more (then `generate` runs). transformers builds that list in GenerationMixin._get_logits_processor."""
    if set(gen_kwargs) - {"logits_processor"}:
        return None
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    try:
        if len(model._get_logits_processor(config, device=model.device)):
            return None
    except (AttributeError, TypeError, ValueError):  # a private method: if it changes, generate's loop runs
        return None
    return LogitsProcessorList(gen_kwargs.get("logits_processor") or [])


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) at every supervised position: logits [L, V] predict targets [L] (IGNORE_INDEX: skipped)."""
    keep = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
