"""Continuous batching (infer/continuous.py), the prefix and feature caches (infer/prefix_cache.py) and jump-forward
in the scheduler, driven directly (no HTTP: tests/test_serve.py runs the server on this scheduler)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from PIL import Image

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.infer.batcher import Batcher, Job
from polyfocus.infer.continuous import ContinuousBatcher, make_scheduler
from polyfocus.infer.pipeline import Pipeline
from polyfocus.infer.prefix_cache import BLOCK, PrefixCache, image_digest
from polyfocus.model.presets import tiny_config
from polyfocus.model.vision import TensorLRU as FeatureCache

RED, BLUE = Image.new("RGB", (80, 60), (220, 30, 30)), Image.new("RGB", (40, 70), (20, 40, 230))


def chat(question: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": "<image>\n" * n_images + question}]


class Ask:
    """A job and what the scheduler told it."""

    def __init__(self, pipe, images, messages, max_tokens, **settings):
        self.events, self.finished = [], threading.Event()
        self.request = (images, messages)
        self.job = Job(images=images, messages=messages, prompt_tokens=len(pipe.encode(messages, len(images))),
                       max_tokens=max_tokens, emit=self._emit, **settings)

    def _emit(self, event):
        self.events.append(event)
        if event.kind != "delta":
            self.finished_at = time.monotonic()
            self.finished.set()

    def result(self, timeout: float = 60):
        assert self.finished.wait(timeout), "the job did not finish"
        assert self.events[-1].kind == "finish", self.events[-1].text
        return self.events[-1]


@pytest.fixture
def scheduler(pipe):
    made = []

    def make(**kwargs):
        made.append(ContinuousBatcher(pipe, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def greedy_ids(pipe, request, n: int) -> list[int]:
    """One-at-a-time greedy generation of n tokens, EOS ignored (as ignore_eos)."""
    inputs = pipe.prepare([request])
    out = pipe.model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=pipe.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture
def slow_steps(pipe, monkeypatch):
    """Every LLM forward 5 ms slower, so that requests can arrive while another decodes."""
    forward = pipe.model.language_model.forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.model.language_model, "forward", slow)


# ---- continuous batching -----------------------------------------------------------------------------------------


def test_requests_arriving_mid_decode_join_and_get_the_one_at_a_time_answers(pipe, scheduler, slow_steps):
    """A long answer decodes; three requests (two images; none; one) arrive while it runs, join its batch at the next
    step, finish long before it, and every answer is one-at-a-time greedy generation's, token for token."""
    s = scheduler(max_batch_size=8)
    long = Ask(pipe, [RED], chat("Describe the image."), 60, ignore_eos=True)
    s.submit(long.job)
    wait_for(lambda: len(long.job.ids) >= 5)
    others = [Ask(pipe, [BLUE, RED], chat("Compare them.", 2), 7), Ask(pipe, [], chat("Say hi.", 0), 3),
              Ask(pipe, [BLUE], chat("How many objects are there?"), 12)]
    for ask in others:
        s.submit(ask.job)
    for ask in others:
        finish = ask.result()
        assert finish.text == pipe.generate([ask.request], max_new_tokens=ask.job.max_tokens)[0]
    assert long.result().completion_tokens == 60
    assert all(ask.finished_at < long.finished_at for ask in others)  # they left while the long one went on
    assert long.job.ids == greedy_ids(pipe, long.request, 60)
    assert max(s.step_sizes) >= 2 and s.batch_sizes[0] == 1  # they shared steps, admitted after it began
    assert s.running == 0 and s.batch.cache is None  # every row left, and its KV with it


def test_streaming_seeds_and_stop_strings_work_as_in_the_window_batcher(pipe, scheduler):
    s = scheduler()
    streamed = Ask(pipe, [RED], chat("Describe the image."), 12)
    s.submit(streamed.job)
    finish = streamed.result()
    pieces = [e.text for e in streamed.events if e.kind == "delta"]
    assert len(pieces) > 1 and "".join(pieces) == finish.text
    word = finish.text.split()[2]
    cut = Ask(pipe, [RED], chat("Describe the image."), 12, stop=[word])
    s.submit(cut.job)
    assert cut.result().text == finish.text[: finish.text.index(word)].strip()
    assert cut.result().finish_reason == "stop"

    def sampled(seed):
        return Ask(pipe, [RED], chat("Describe the image."), 10, temperature=1.0, top_p=0.9, seed=seed)

    alone = sampled(7)
    s.submit(alone.job)
    together = [sampled(7), sampled(8), Ask(pipe, [BLUE], chat("Hi"), 6)]
    for ask in together:
        s.submit(ask.job)
    assert together[0].result().text == alone.result().text != together[1].result().text
    window = Batcher(pipe, max_batch_size=1)  # the same seed through the window batcher: the same draws
    try:
        again = sampled(7)
        window.submit(again.job)
        assert again.result().text == alone.result().text
    finally:
        window.close()


def test_cancelling_a_job_frees_its_row(pipe, scheduler, slow_steps):
    s = scheduler()
    ask = Ask(pipe, [RED], chat("Describe the image."), 200, ignore_eos=True)
    s.submit(ask.job)
    wait_for(lambda: len(ask.job.ids) >= 3)
    ask.job.cancelled = True  # what the server does when the client goes away
    wait_for(lambda: s.running == 0)
    assert s.batch.cache is None and len(ask.job.ids) < 50 and not ask.finished.is_set()
    after = Ask(pipe, [BLUE], chat("Hi"), 2)
    s.submit(after.job)
    assert after.result().completion_tokens == 2


def test_bounds_on_rows_and_tokens_in_flight(pipe, scheduler, slow_steps):
    s = scheduler(max_batch_size=2, max_tokens_in_flight=10_000)
    asks = [Ask(pipe, [], chat(f"Question {i}?", 0), 6, ignore_eos=True) for i in range(5)]
    for ask in asks:
        s.submit(ask.job)
    for ask in asks:
        ask.result()
    assert max(s.step_sizes) == 2
    prompt = asks[0].job.prompt_tokens
    tight = scheduler(max_batch_size=8, max_tokens_in_flight=2 * (prompt + 6) + 1)  # room for two at a time
    asks = [Ask(pipe, [], chat(f"Question {i}?", 0), 6, ignore_eos=True) for i in range(5)]
    for ask in asks:
        tight.submit(ask.job)
    assert [ask.result().completion_tokens for ask in asks] == [6] * 5
    assert max(tight.step_sizes) == 2


def test_a_draft_is_verified_so_the_answer_is_greedy_decodings(pipe, scheduler):
    """Jump-forward in the scheduler: a right draft (greedy's own next tokens) takes fewer steps, a wrong one changes
    nothing; the answer is the one without a draft."""
    request = ([RED], chat("Describe the image."))
    truth = greedy_ids(pipe, request, 16)

    def right(ids):
        return truth[len(ids):len(ids) + 4]

    def wrong(ids):
        return [(t + 1) % 100 + 10 for t in truth[len(ids):len(ids) + 4]]

    steps = {}
    for name, draft in (("none", None), ("right", right), ("wrong", wrong)):
        s = scheduler()
        ask = Ask(pipe, *request, 16, ignore_eos=True, draft=draft)
        s.submit(ask.job)
        ask.result()
        assert ask.job.ids == truth, name
        steps[name] = len(s.step_sizes)
    assert steps["right"] <= steps["none"] // 4 and steps["wrong"] == steps["none"] == 15


def test_a_model_whose_cache_cannot_be_managed_by_rows_batches_per_window(pipe, caplog):
    config = tiny_config(text="mistral")
    config.text_config.sliding_window = 8
    sliding = Pipeline(PolyfocusForConditionalGeneration(config).eval(), pipe.tokenizer, pipe.image_processor,
                       "vicuna_v1")
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        ContinuousBatcher(sliding)
    with caplog.at_level(logging.WARNING):
        fallback = make_scheduler(sliding, "continuous")
    try:
        assert type(fallback) is Batcher and "batching per window" in caplog.text
        ask = Ask(sliding, [RED], chat("Hi"), 4)
        fallback.submit(ask.job)
        assert ask.result().text == sliding.generate([ask.request], max_new_tokens=4)[0]
    finally:
        fallback.close()


# ---- prefix reuse --------------------------------------------------------------------------------------------------


def test_a_cached_prefix_gives_a_cold_prefills_logits(pipe, scheduler):
    """Another question on the same image, and the next turn of the conversation: each prefills only what follows
    the longest cached prefix (the image's visual tokens are not computed again), with the logits of a cold prefill
    and of the model's own forward; the answers are one-at-a-time generation's."""
    s = scheduler()
    cold = scheduler(prefix_cache_bytes=0, feature_cache_bytes=0)
    system = {"role": "system", "content": "You are a careful observer."}
    first = Ask(pipe, [RED], [system, *chat("What colour is the star?")], 6)
    s.submit(first.job)
    answer = first.result().text
    wait_for(lambda: s.running == 0)  # its KV goes to the cache as it leaves, just after its answer
    first_ids = pipe.encode(first.job.messages, 1)
    turns = [[system, *chat("How many objects are there?")],  # another question: the system prompt and image shared
             [system, *chat("What colour is the star?"), {"role": "assistant", "content": answer},
              {"role": "user", "content": "And the circle?"}]]  # the next turn: the first prompt and answer shared
    towers = []
    tower = pipe.model.vision_tower.forward
    pipe.model.vision_tower.forward = lambda *a, **k: towers.append(1) or tower(*a, **k)
    try:
        for messages, shared in zip(turns, (first_ids.index(pipe.model.config.image_token_id)
                                            + pipe.model.config.num_image_tokens, len(first_ids))):
            ask = Ask(pipe, [RED], messages, 6)
            hits, hit_tokens, before = s.prefixes.hits, s.prefixes.hit_tokens, len(towers)
            warm, *_ = s.prompt(ask.job)
            assert s.prefixes.hits == hits + 1 and s.prefixes.hit_tokens - hit_tokens >= shared
            assert len(towers) == before  # the image's visual tokens came from the cache
            cold_logits, *_ = cold.prompt(ask.job)
            full = pipe.model(**pipe.prepare([ask.request])).logits[0, -1].float()
            torch.testing.assert_close(warm, cold_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(warm, full, atol=1e-5, rtol=0)
            s.submit(ask.job)
            assert ask.result().text == pipe.generate([ask.request], max_new_tokens=6)[0]
            wait_for(lambda: s.running == 0)
    finally:
        pipe.model.vision_tower.forward = tower
    assert cold.prefixes.hits == 0 and s.features.hits == 0  # the prefixes held the image: no features needed


def test_images_tell_prefixes_apart(pipe, scheduler):
    """Every image is the same token id; the key holds its digest, so another image's prefix is not reused."""
    s = scheduler()
    first = Ask(pipe, [RED], chat("What colour is the star?"), 4)
    s.submit(first.job)
    first.result()
    wait_for(lambda: s.running == 0)
    other = Ask(pipe, [BLUE], chat("What colour is the star?"), 4)
    hit_tokens = s.prefixes.hit_tokens
    _, _, _, ids = s.prompt(other.job)
    assert s.prefixes.hit_tokens - hit_tokens == ids.index(pipe.model.config.image_token_id)  # the text before it
    s.submit(other.job)
    assert other.result().text == pipe.generate([other.request], max_new_tokens=4)[0]
    assert image_digest(RED) != image_digest(BLUE) == image_digest(BLUE.copy())
    assert image_digest(RED) != image_digest(RED, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def kv(n: int, value: float = 0.0):
    return [(torch.full((1, 1, n, 4), value), torch.full((1, 1, n, 4), value)) for _ in range(2)]  # 2 layers


def test_the_prefix_cache_is_bounded_lru_and_exact():
    entry_bytes = 2 * 2 * 32 * 4 * 4  # layers x (keys, values) x tokens x head_dim x float32
    cache = PrefixCache(capacity_bytes=2 * entry_bytes + entry_bytes // 2 + 10)  # two entries and a half
    a, b, c = ([tag] * 8 + list(range(24)) for tag in ("a", "b", "c"))  # 32 tokens each, a distinct first block
    cache.insert(a, kv(32, 1.0))
    cache.insert(b, kv(32, 2.0))
    assert cache.match(a + [99])[1] == 32  # a is now the most recently used
    cache.insert(c, kv(32, 3.0))  # over capacity: b, the least recently used, goes
    assert cache.size <= cache.capacity and len(cache) == 2
    assert cache.match(b)[0] is None and cache.match(c)[1] == 32
    entry, n = cache.match(a[:20] + [7, 7])
    assert n == 20 and float(entry.layers[0][0][0, 0, 0, 0]) == 1.0  # the exact token, across a block's end
    longer = a + [5] * BLOCK
    cache.insert(longer, kv(len(longer)))  # extends a whole (1.5 entries): replaces it, and c still fits
    assert len(cache) == 2 and cache.match(a)[0].key == longer
    cache.insert(a[:20], kv(20))  # held whole by an entry: not stored again
    assert len(cache) == 2 and cache.size <= cache.capacity
    cache.insert(list(range(1000)), kv(1000))  # larger than the whole cache: not stored, nothing evicted
    assert len(cache) == 2
    features = FeatureCache(capacity_bytes=3 * 64 * 4)
    for i in range(5):
        features.put(str(i), torch.zeros(4, 16))
    assert features.size <= features.capacity and list(features.entries) == ["2", "3", "4"]


def test_a_long_run_of_abandoned_jobs_is_skipped(pipe, scheduler):
    s = scheduler()
    for _ in range(3000):
        s.submit(Job(images=[], messages=chat("Hi", 0), prompt_tokens=1, max_tokens=1, cancelled=True))
    live = Ask(pipe, [], chat("Hi", 0), 2)
    s.submit(live.job)
    assert live.result().completion_tokens == 2 and s.batch_sizes[-1] == 1


def test_an_image_seen_recently_skips_the_tower(pipe, scheduler):
    """The same image under another system prompt: no prefix holds it, its visual tokens come from the feature
    cache; the answer is one-at-a-time generation's."""
    s = scheduler()
    first = Ask(pipe, [BLUE], [{"role": "system", "content": "Be brief."}, *chat("What is it?")], 4)
    s.submit(first.job)
    first.result()
    towers, tower = [], pipe.model.vision_tower.forward
    pipe.model.vision_tower.forward = lambda *a, **k: towers.append(1) or tower(*a, **k)
    try:
        other = Ask(pipe, [BLUE], [{"role": "system", "content": "Answer at length."}, *chat("What is it?")], 4)
        s.submit(other.job)
        assert other.result().text and not towers and s.features.hits == 1
    finally:
        pipe.model.vision_tower.forward = tower
    assert other.result().text == pipe.generate([other.request], max_new_tokens=4)[0]


@pytest.mark.parametrize("method", [{"fusion": "mmfuser"}, {"visual_words": True, "pseudo_image_features": True}])
def test_methods_whose_visual_tokens_differ_run_continuously(pipe, method):
    """MMFuser's fused features and VW-LMM's PIF mixtures come from the model's own embed_inputs (MG-LLaVA's object
    tokens: tests/test_mg_llava_boxes.py, through the server): the answers are one-at-a-time generation's."""
    torch.manual_seed(0)
    config = tiny_config(image_token_id=pipe.model.config.image_token_id, **method)
    other = Pipeline(PolyfocusForConditionalGeneration(config).eval(), pipe.tokenizer, pipe.image_processor,
                     "vicuna_v1")
    s = ContinuousBatcher(other)
    try:
        asks = [Ask(other, [RED], chat("What colour is the star?"), 6), Ask(other, [BLUE, RED], chat("Compare.", 2), 5)]
        for ask in asks:
            s.submit(ask.job)
        for ask in asks:
            assert ask.result().text == other.generate([ask.request], max_new_tokens=ask.job.max_tokens)[0]
    finally:
        s.close()
