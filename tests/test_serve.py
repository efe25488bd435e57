"""`polyfocus serve`: the OpenAI-compatible server on loopback, driven by the real `openai` client and raw HTTP.

One server for the module (tiny random model, context 256 tokens, small limits so that each limit is cheap to hit).
"""

import functools
import http.server
import json
import random
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from polyfocus.cli import main  # noqa: E402
from polyfocus.infer import batcher as batcher_module  # noqa: E402
from polyfocus.infer.pipeline import Pipeline  # noqa: E402
from polyfocus.infer.server import ServeSettings, create_app, decode_image  # noqa: E402
from polyfocus.infer.stops import (
    answer_text,
    visible_text,  # noqa: E402
)

from serve_helpers import data_url, png_bytes, running_server, save_tiny_checkpoint  # noqa: E402

MODEL = "tiny"
CONTEXT = 256  # 16 tokens per image, about 30 per question
QUESTION = "What colour is the star?"
RED, BLUE = png_bytes((80, 60), (220, 30, 30)), png_bytes((40, 70), (20, 40, 230))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    media = path / "media"
    media.mkdir()
    (media / "red.png").write_bytes(RED)
    return path


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(ckpt, pipe):
    settings = ServeSettings(model_name=MODEL, max_batch_size=8, batch_window_ms=5, max_model_len=CONTEXT,
                             max_body_bytes=200_000, max_images=2, max_image_pixels=256 * 256,
                             allowed_local_media_path=str(ckpt / "media"))
    app = create_app(pipe, settings)
    with running_server(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def batcher(server):
    return server[1].state.batcher


@pytest.fixture
def settings(server):
    return server[1].state.settings


def user(text=QUESTION, *images: bytes | str) -> list[dict]:
    """One user message: image_url parts (bytes as data URLs, strings as given), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(x) if isinstance(x, bytes) else x}} for x in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def ask(client, messages, **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def pil(data: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(data))


def all_at_once(batcher, calls):
    """Run the calls concurrently, with the scheduler waiting until all of them are queued: one batch.
    Returns their results and the sizes of the batches run meanwhile."""
    saved = batcher.max_batch_size, batcher.window_s
    batcher.max_batch_size, batcher.window_s = len(calls), 30.0  # the batch starts once all have arrived
    before = len(batcher.batch_sizes)
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            results = [f.result() for f in [pool.submit(call) for call in calls]]
    finally:
        batcher.max_batch_size, batcher.window_s = saved
    return results, list(batcher.batch_sizes)[before:]


# ---- answers ---------------------------------------------------------------------------------------------


def test_openai_client_text_and_image_equal_the_pipeline(client, pipe):
    reply = ask(client, user(QUESTION, RED))
    expected = pipe.generate([([pil(RED)], QUESTION)], max_new_tokens=8)[0]
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion" and reply.model == MODEL
    prompt = pipe.encode([{"role": "user", "content": "<image>\n" + QUESTION}], 1)
    assert reply.usage.prompt_tokens == len(prompt)  # image tokens included, as vLLM counts them
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (8, "length")
    assert reply.usage.total_tokens == len(prompt) + 8

    text = ask(client, [{"role": "user", "content": "Say hi."}], max_completion_tokens=5)
    assert text.choices[0].message.content == pipe.generate([([], "Say hi.")], max_new_tokens=5)[0]
    assert text.usage.completion_tokens == 5


def test_stream_chunks_add_up_to_the_answer(client, server):
    messages = user(QUESTION, BLUE)
    whole = ask(client, messages, max_tokens=10)
    chunks = list(ask(client, messages, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    body = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert "usage" not in json.loads(events[-3][6:])  # only with stream_options.include_usage


def test_concurrent_requests_run_as_one_batch_with_the_single_answers(client, pipe, batcher):
    requests = [(user(QUESTION, RED), 8), (user("Say hi."), 5), (user("Compare them.", BLUE, RED), 9),
                (user("How many objects are there?", BLUE), 6)]
    singles = [ask(client, messages, max_tokens=n) for messages, n in requests]
    replies, batches = all_at_once(batcher, [functools.partial(ask, client, m, max_tokens=n)
                                                          for m, n in requests])
    assert batches == [len(requests)]  # one forward batch served all of them
    contents = [r.choices[0].message.content for r in replies]
    assert contents == [s.choices[0].message.content for s in singles] and len(set(contents)) == len(contents)
    pipeline_requests = [([pil(RED)], QUESTION), ([], "Say hi."), ([pil(BLUE), pil(RED)], "Compare them."),
                         ([pil(BLUE)], "How many objects are there?")]
    for reply, (_, n), request in zip(replies, requests, pipeline_requests):
        assert reply.choices[0].message.content == pipe.generate([request], max_new_tokens=n)[0]
        assert reply.usage.completion_tokens == n and reply.choices[0].finish_reason == "length"


def test_max_batch_size_splits_the_queue(client, batcher):
    calls = [functools.partial(ask, client, user(f"Question {i}?"), max_tokens=2) for i in range(5)]
    saved = batcher.max_batch_size, batcher.window_s
    batcher.max_batch_size, batcher.window_s = 3, 30.0
    before = len(batcher.batch_sizes)
    try:
        with ThreadPoolExecutor(5) as pool:
            first = [pool.submit(call) for call in calls[:3]]
            [f.result() for f in first]  # a full batch of 3 goes at once
            batcher.max_batch_size = 2
            [f.result() for f in [pool.submit(call) for call in calls[3:]]]
    finally:
        batcher.max_batch_size, batcher.window_s = saved
    assert list(batcher.batch_sizes)[before:] == [3, 2]


def test_streaming_inside_a_batch(client, batcher):
    streamed = functools.partial(ask, client, user(QUESTION, RED), max_tokens=10, stream=True)
    plain = functools.partial(ask, client, user("Say hi."), max_tokens=4)
    (chunks, other), batches = all_at_once(batcher, [lambda: list(streamed()), plain])
    assert batches == [2]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    whole = ask(client, user(QUESTION, RED), max_tokens=10).choices[0].message.content
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert other.choices[0].message.content == ask(client, user("Say hi."), max_tokens=4).choices[0].message.content


def test_seeded_sampling_is_the_same_alone_and_batched(client, batcher):
    sampled = functools.partial(ask, client, user(QUESTION, RED), max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = sampled().choices[0].message.content
    assert sampled().choices[0].message.content == alone
    others = [functools.partial(ask, client, user("Say hi."), max_tokens=6, temperature=1.0, seed=8),
              functools.partial(ask, client, user("Compare them.", BLUE), max_tokens=15),
              functools.partial(ask, client, user(QUESTION, RED), max_tokens=12, temperature=1.0, top_p=0.9, seed=9)]
    replies, batches = all_at_once(batcher, [others[0], sampled, others[1], others[2]])
    assert batches == [4]
    assert replies[1].choices[0].message.content == alone
    assert replies[3].choices[0].message.content != alone  # another seed, another answer
    greedy = ask(client, user(QUESTION, RED), max_tokens=12).choices[0].message.content
    assert alone != greedy


def test_stop_strings_and_finish_reasons(client, pipe, monkeypatch):
    messages = user(QUESTION, RED)
    full = ask(client, messages, max_tokens=12).choices[0].message.content
    word = full.split()[2]
    cut = ask(client, messages, max_tokens=12, stop=["zzz", word])
    assert cut.choices[0].message.content == full[: full.index(word)].strip()
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 12
    streamed = ask(client, messages, max_tokens=12, stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content

    # EOS: pretend the model's 4th token is the EOS; ignore_eos runs on to max_tokens regardless.
    prompt = pipe.prepare([([pil(RED)], QUESTION)])
    fourth = pipe.model.generate(**prompt, max_new_tokens=4, do_sample=False)[0, -1].item()
    monkeypatch.setattr(batcher_module, "eos_ids", lambda pipe: [fourth])
    eos = ask(client, messages, max_tokens=12)
    assert (eos.choices[0].finish_reason, eos.usage.completion_tokens) == ("stop", 4)
    three = pipe.model.generate(**prompt, max_new_tokens=3, do_sample=False)[0, -3:]
    assert eos.choices[0].message.content == pipe.decode(three)
    ignored = ask(client, messages, max_tokens=12, extra_body={"ignore_eos": True})
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", 12)


@pytest.fixture
def slow_steps(pipe, monkeypatch) -> list:
    """The LLM's forward made 10 ms a step (200 steps would take 2 s); returns the list that counts the steps."""
    steps, forward = [], pipe.model.language_model.forward

    def counted_forward(*args, **kwargs):
        steps.append(1)
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.model.language_model, "forward", counted_forward)
    return steps


def test_a_client_that_goes_away_frees_its_row(server, client, slow_steps):
    body = {"model": MODEL, "messages": HI, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation has begun; then the client hangs up
    assert ask(client, HI, max_tokens=2).usage.completion_tokens == 2
    assert len(slow_steps) < 100  # the abandoned row stopped long before its 200 tokens


def test_a_non_streaming_client_that_goes_away_frees_its_row(server, client, slow_steps):
    body = {"model": MODEL, "messages": HI, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=0.5)
    assert ask(client, HI, max_tokens=2).usage.completion_tokens == 2
    assert len(slow_steps) < 150  # the abandoned row stopped long before its 200 tokens


def test_visible_text_streams_prefixes_of_the_answer():
    rng = random.Random(0)
    alphabet = [" ", "\n", "a", "b", "</s>", "<", "/", "s", ">", "\ufffd", "ab"]
    for stops in (["</s>"], ["\n", "ab"], ["b a"], []):
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            final, _ = visible_text(text, stops, final=True)
            if len(stops) == 1:
                assert final == answer_text(text, stops[0])
            for end in range(len(text) + 1):
                partial, stopped = visible_text(text[:end], stops, final=False)
                assert final.startswith(partial), (text, end, stops)
                if stopped:
                    assert partial == final


# ---- models, health, page --------------------------------------------------------------------------------


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0] + "/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert "/v1/chat/completions" in page.text and "://" not in page.text  # nothing fetched from elsewhere


# ---- image sources ---------------------------------------------------------------------------------------


def test_local_files_under_the_allowed_directory(client, ckpt):
    expected = ask(client, user(QUESTION, RED)).choices[0].message.content
    for url in ("red.png", str(ckpt / "media" / "red.png"), (ckpt / "media" / "red.png").as_uri()):
        assert ask(client, user(QUESTION, url)).choices[0].message.content == expected, url


@pytest.fixture
def image_site(ckpt):
    """A loopback HTTP server serving the media directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ckpt / "media"))
    handler.log_message = lambda *args: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_remote_urls_only_when_allowed(client, server, settings, image_site, monkeypatch):
    url = image_site + "/red.png"
    off = post(server, {"messages": user(QUESTION, url)})
    assert off.status_code == 400 and off.json()["error"]["code"] == "remote_images_disabled"
    monkeypatch.setattr(settings, "allow_remote_images", True)
    expected = ask(client, user(QUESTION, RED)).choices[0].message.content
    assert ask(client, user(QUESTION, url)).choices[0].message.content == expected
    missing = post(server, {"messages": user(QUESTION, image_site + "/nope.png")})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
    invalid = post(server, {"messages": user(QUESTION, "http://[::1")})  # httpx.InvalidURL: not an HTTPError
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "image_fetch_failed", invalid.text


class Drip(http.server.BaseHTTPRequestHandler):
    """Sends an "image" one byte every `server.every_s` for `server.for_s` seconds. Counts the open downloads, and
    their peak until `server.ended` (once the server gives up on one, it may still drip for a moment while the next
    one starts)."""

    def do_GET(self):
        site = self.server
        with site.lock:
            site.active += 1
            if not site.ended:
                site.peak = max(site.peak, site.active)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            end = time.monotonic() + site.for_s
            while time.monotonic() < end:
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(site.every_s)
        except OSError:  # the server gave up on it
            pass
        finally:
            with site.lock:
                site.active -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def drip_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    site.lock, site.active, site.peak, site.ended, site.every_s, site.for_s = threading.Lock(), 0, 0, False, 0.1, 12.0
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{site.server_address[1]}/slow.png"
    site.shutdown()


def test_slow_downloads_meet_a_deadline_in_their_own_pool_and_starve_no_one(pipe, drip_site):
    """45 image URLs that send a byte every 0.1 s (more than the server's request threads): at most max_downloads of
    them are fetched at once, each request is refused at the deadline set here (the drip would go on three times
    longer), and a text request sent while all of them wait is answered before any of them ends."""
    site, url = drip_site
    settings = ServeSettings(model_name=MODEL, max_model_len=CONTEXT, allow_remote_images=True, remote_timeout_s=4.0,
                             max_downloads=4)
    ended = []

    def slow():
        body = {"model": MODEL, "max_tokens": 2, "messages": user(QUESTION, url)}
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        ended.append("image")
        return response

    with running_server(create_app(pipe, settings)) as base, ThreadPoolExecutor(45) as pool:
        futures = [pool.submit(slow) for _ in range(45)]
        waited = time.monotonic() + 60
        while site.active < settings.max_downloads and time.monotonic() < waited:  # every slot taken
            time.sleep(0.01)
        text = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": HI},
                          timeout=60)
        ended.append("text")
        with site.lock:  # the downloads open while every one of them was still waiting for its image
            site.ended, peak = True, site.peak
        responses = [f.result() for f in futures]
    assert text.status_code == 200, text.text
    assert ended[0] == "text"  # served while the 45 downloads were still in flight or waiting for a slot
    assert peak == settings.max_downloads
    assert {(r.status_code, r.json()["error"]["code"]) for r in responses} == {(400, "image_fetch_timeout")}
    assert "within 4 s" in responses[0].json()["error"]["message"]


def test_one_size_limit_for_every_way_an_image_arrives(pipe, ckpt, image_site):
    """max_image_bytes holds for a data: URL as for a local file and a download (a 20.9 MiB data URL was taken)."""
    import io

    import numpy as np

    big = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(big, "PNG")
    (ckpt / "media" / "big.png").write_bytes(big.getvalue())
    limit = len(big.getvalue()) - 1
    assert len(RED) < limit
    settings = ServeSettings(model_name=MODEL, max_model_len=CONTEXT, max_image_bytes=limit, max_body_bytes=200_000,
                             allow_remote_images=True, allowed_local_media_path=str(ckpt / "media"))
    with running_server(create_app(pipe, settings)) as base:
        def ask_about(url):
            body = {"model": MODEL, "max_tokens": 2, "messages": user(QUESTION, url)}
            return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)

        for url in (data_url(big.getvalue()), "big.png", image_site + "/big.png"):
            response = ask_about(url)
            assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_large", url[:40]
        for url in (data_url(RED), "red.png", image_site + "/red.png"):
            assert ask_about(url).status_code == 200, url[:40]


# ---- browsers and keys ------------------------------------------------------------------------------------


def test_a_cross_origin_request_is_refused_before_it_runs(server, batcher):
    """A web page elsewhere can POST text/plain to a loopback server without a preflight: refused, unanswered."""
    body = json.dumps({"model": MODEL, "max_tokens": 2, "messages": HI})
    before = len(batcher.batch_sizes)
    for origin in ("http://evil.example", "null"):
        response = httpx.post(server[0] + "/v1/chat/completions", content=body,
                              headers={"Content-Type": "text/plain", "Origin": origin}, timeout=60)
        assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in response.headers
    assert len(batcher.batch_sizes) == before  # nothing was generated
    own = httpx.post(server[0] + "/v1/chat/completions", content=body, timeout=60,  # the server's own page
                     headers={"Content-Type": "application/json", "Origin": server[0]})
    assert own.status_code == 200


def test_allowed_origins_get_cors_and_an_api_key_guards_the_api(pipe):
    settings = ServeSettings(model_name=MODEL, max_model_len=CONTEXT, allowed_origins=("http://localhost:3000",),
                             api_key="sekret")
    body = {"model": MODEL, "max_tokens": 2, "messages": HI}
    key = {"Authorization": "Bearer sekret"}
    with running_server(create_app(pipe, settings)) as base:
        url = base + "/v1/chat/completions"
        allowed = {"Origin": "http://localhost:3000"}
        preflight = httpx.options(url, headers={**allowed, "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "authorization" in preflight.headers["access-control-allow-headers"]
        answered = httpx.post(url, json=body, headers={**allowed, **key}, timeout=60)
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == allowed["Origin"]
        other = httpx.post(url, json=body, headers={"Origin": "http://localhost:4000", **key}, timeout=60)
        assert other.status_code == 403

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            refused = httpx.post(url, json=body, headers=headers, timeout=60)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers=key).status_code == 200
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/").status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert ask(client, HI, max_tokens=2).usage.completion_tokens <= 2


# ---- bad input: a 4xx in OpenAI's shape, and the server keeps serving ------------------------------------


def post(server, body: dict | bytes, **defaults):
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, "max_tokens": 2, **body}).encode()
    return httpx.post(server[0] + "/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=60)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds a few bytes: decoding it would fail, so a size error proves the
    header was checked first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


HI = [{"role": "user", "content": "Hi"}]
BAD_INPUTS = {
    # name: (body, status, param, code or None, text in the message)
    "malformed json": (b'{"model": "tiny", "messages": [', 400, None, "invalid_json", "not valid JSON"),
    "not an object": (b"[1, 2]", 400, None, "invalid_value", "object"),
    "missing messages": ({}, 400, "messages", "invalid_value", "Field required"),
    "empty messages": ({"messages": []}, 400, "messages", "invalid_value", "at least 1"),
    "unknown field": ({"messages": HI, "frequency_penaltyy": 1}, 400, "frequency_penaltyy", "unknown_field",
                      "Unrecognized request argument supplied: frequency_penaltyy"),
    "unknown field named like a type": ({"messages": HI, "Temperature": 1}, 400, "Temperature", "unknown_field",
                                        "Unrecognized request argument supplied: Temperature"),
    "unknown field in stream_options": ({"messages": HI, "stream_options": {"Usage": True}}, 400,
                                        "stream_options.Usage", "unknown_field", "supplied: stream_options.Usage"),
    "unknown nested field": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(RED), "size": 3}}]}]},
        400, "messages[0].content[0].image_url.size", "unknown_field", "image_url.size"),
    "bad role": ({"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role", "invalid_value",
                 "'user'"),
    "tool role": ({"messages": [{"role": "tool", "content": "Hi"}]}, 400, "messages[0].role", "invalid_value", ""),
    "content of wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
                              "invalid_value", "valid string or "),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "video", "text": "x"}]}]}, 400,
                          "messages[0].content[0].type", "invalid_value", "'text' or 'image_url'"),
    "part without payload": ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
                             400, "messages[0].content[0]", "invalid_value", "needs the field 'image_url'"),
    "temperature not a number": ({"messages": HI, "temperature": "hot"}, 400, "temperature", "invalid_value", ""),
    "max_tokens as a string": ({"messages": HI, "max_tokens": "8"}, 400, "max_tokens", "invalid_value", "integer"),
    "stream not a bool": ({"messages": HI, "stream": "yes"}, 400, "stream", "invalid_value", "boolean"),
    "temperature out of range": ({"messages": HI, "temperature": 3}, 400, "temperature", "invalid_value", "2"),
    "max_tokens zero": ({"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value", "1"),
    "seed out of range": ({"messages": HI, "seed": 2**64}, 400, "seed", "invalid_value", "less than"),
    "n > 1": ({"messages": HI, "n": 2}, 400, "n", "invalid_value", ""),
    "stop list of numbers": ({"messages": HI, "stop": [1]}, 400, "stop[0]", "invalid_value", "string"),
    "unknown strategy": ({"messages": HI, "strategy": "dualfocus-v9"}, 400, "strategy", "invalid_value",
                         "unknown strategy 'dualfocus-v9'"),
    "unknown model": ({"model": "gpt-4o", "messages": HI}, 404, "model", "model_not_found", "gpt-4o"),
    "bad base64": ({"messages": user(QUESTION, "data:image/png;base64,iVBOR!!!")}, 400,
                   "messages[0].content[0].image_url.url", "invalid_base64", "base64"),
    "data url without base64": ({"messages": user(QUESTION, "data:image/png,abc")}, 400,
                                "messages[0].content[0].image_url.url", "invalid_image_url", "data:image/png;base64"),
    "not an image": ({"messages": user(QUESTION, data_url(b"hello, world"))}, 400,
                     "messages[0].content[0].image_url.url", "invalid_image", "not a readable image"),
    "truncated image": ({"messages": user(QUESTION, data_url(RED[:60]))}, 400,
                        "messages[0].content[0].image_url.url", "invalid_image", "not a readable image"),
    "decompression bomb": ({"messages": user(QUESTION, data_url(png_header(20_000, 1_000)))}, 400,
                           "messages[0].content[0].image_url.url", "image_too_large", "20000x1000"),
    "too many pixels": ({"messages": user(QUESTION, png_bytes((300, 300)))}, 400,
                        "messages[0].content[0].image_url.url", "image_too_large", "at most 65536"),
    "extreme aspect ratio": ({"messages": user(QUESTION, png_bytes((1, 300)))}, 400,  # padded: 300 x 300 pixels
                             "messages[0].content[0].image_url.url", "image_too_large", "aspect ratio"),
    "too many images": ({"messages": user(QUESTION, RED, RED, BLUE)}, 400, "messages", "too_many_images",
                        "at most 2"),
    "image in an assistant turn": ({"messages": [*HI, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(RED)}}]}, *HI]}, 400, "messages[1].content[0]", None,
        "user messages only"),
    "image placeholder in text": ({"messages": [{"role": "user", "content": "look: <image>"}]}, 400,
                                  "messages[0].content", None, "<image>"),
    "last message not the user's": ({"messages": [*HI, {"role": "assistant", "content": "Hello"}]}, 400,
                                     "messages[1].role", None, "last message"),
    "roles do not alternate": ({"messages": HI + HI}, 400, "messages", None, "alternate"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "red blue " * 200}]}, 400, "messages",
                                "context_length_exceeded", "maximum context length is 256"),
    "max_tokens over the context": ({"messages": HI, "max_tokens": 250}, 400, "max_tokens",
                                    "context_length_exceeded", "you requested"),
    "remote url (off)": ({"messages": user(QUESTION, "https://example.com/a.png")}, 400,
                         "messages[0].content[0].image_url.url", "remote_images_disabled", "--allow-remote-images"),
    "local file outside the directory": ({"messages": user(QUESTION, "../config.json")}, 403,
                                         "messages[0].content[0].image_url.url", "path_not_allowed", "outside"),
    "absolute path outside": ({"messages": user(QUESTION, "file:///nonexistent/x.png")}, 403,
                           "messages[0].content[0].image_url.url", "path_not_allowed", ""),
    "NUL byte in a local path": ({"messages": user(QUESTION, "red\x00.png")}, 400,
                                 "messages[0].content[0].image_url.url", "invalid_image_url", "null byte"),
    "local path too long": ({"messages": user(QUESTION, "x" * 5000 + ".png")}, 400,
                            "messages[0].content[0].image_url.url", "invalid_image_url", "too long"),
    "missing file inside": ({"messages": user(QUESTION, "blue.png")}, 400,
                            "messages[0].content[0].image_url.url", "image_not_found", "blue.png"),
    "unsupported scheme": ({"messages": user(QUESTION, "ftp://example.com/a.png")}, 400,
                           "messages[0].content[0].image_url.url", "invalid_image_url", "'ftp'"),
    "body too large": ({"messages": user("x" * 250_000)}, 413, None, "request_too_large", "200000 bytes"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_4xx_in_openai_shape_and_serving_goes_on(server, client, name):
    body, status, param, code, text = BAD_INPUTS[name]
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and text in error["message"]
    if code is not None:
        assert error["code"] == code
    assert ask(client, HI, max_tokens=2).choices[0].finish_reason in ("length", "stop")  # still serving


def test_null_means_the_default_as_in_the_openai_api(server, client):
    """OpenAI's optional fields are nullable; the openai client sends null for an explicit None."""
    greedy = ask(client, HI, max_tokens=3)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "name": "alice"}], "max_tokens": 3,
            "temperature": 0, "top_p": None, "stop": None, "seed": None, "n": None, "stream": None,
            "stream_options": None, "user": None, "max_completion_tokens": None}
    response = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == greedy.choices[0].message.content
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=None, top_p=None,
                                           stop=None, seed=None)
    assert reply.usage.completion_tokens <= 3


def test_a_long_run_of_abandoned_jobs_does_not_kill_the_scheduler():
    """Queued jobs whose clients went away are skipped; thousands in a row once overflowed the stack (recursion)."""
    ran = []

    class Recording(batcher_module.Batcher):
        def _run(self, batch):
            ran.append(batch)

    batcher = Recording(pipe=None, max_batch_size=1, window_s=0.0)
    try:
        for _ in range(3000):
            batcher.submit(batcher_module.Job(images=[], messages=[], prompt_tokens=1, max_tokens=1, cancelled=True))
        live = batcher_module.Job(images=[], messages=[], prompt_tokens=1, max_tokens=1)
        batcher.submit(live)
        deadline = time.monotonic() + 30
        while not ran and time.monotonic() < deadline and batcher._thread.is_alive():
            time.sleep(0.01)
        assert ran == [[live]]
    finally:
        if batcher._thread.is_alive():
            batcher.close()


def test_a_long_image_is_scaled_so_that_its_padded_square_stays_under_the_pixel_limit():
    image = decode_image(png_bytes((40, 1000)), "url", max_pixels=65536)  # 40,000 pixels; padded, 1,000,000
    assert image.size == (10, 256) and image.mode == "RGB"
    assert decode_image(RED, "url", max_pixels=65536).size == (80, 60)  # within the limits: untouched


def test_openai_client_raises_on_bad_input(client):
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: logprobs"):
        ask(client, HI, logprobs=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)


def test_wrong_method_and_path_in_openai_shape(server):
    for response in (httpx.get(server[0] + "/v1/chat/completions"), httpx.post(server[0] + "/v1/nothing")):
        assert response.status_code in (404, 405) and set(response.json()["error"]) == {"message", "type", "param",
                                                                                         "code"}


def test_a_failed_batch_is_a_500_and_the_next_request_is_served(client, server, pipe, monkeypatch):
    real = pipe.model.forward

    def broken(**kwargs):
        monkeypatch.setattr(pipe.model, "forward", real)  # fails once
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(pipe.model, "forward", broken)
    with pytest.raises(openai.InternalServerError, match="simulated"):
        ask(client, HI)
    monkeypatch.setattr(pipe.model, "forward", broken)
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as response:
        events = response.read().decode().split("\n\n")
    assert json.loads(events[-3][6:])["error"]["message"].endswith("(simulated)") and events[-2] == "data: [DONE]"
    assert ask(client, HI, max_tokens=2).usage.completion_tokens == 2


def test_an_overloaded_server_refuses_with_503_and_serves_again(client, server, settings, batcher, pipe, monkeypatch):
    """Backpressure: with the scheduler busy and max_waiting requests queued, the next one is refused at once."""
    started, release, forward = threading.Event(), threading.Event(), pipe.model.forward

    def held(**kwargs):
        started.set()
        release.wait(30)
        return forward(**kwargs)

    monkeypatch.setattr(pipe.model, "forward", held)
    monkeypatch.setattr(settings, "max_waiting", 1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(ask, client, user("First?"), max_tokens=2)
        assert started.wait(30)  # the first request is inside a batch, the scheduler is busy
        queued = pool.submit(ask, client, user("Second?"), max_tokens=2)
        deadline = time.monotonic() + 30
        while batcher.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = post(server, {"messages": HI, "max_tokens": 2})
        release.set()
        assert [f.result().usage.completion_tokens for f in (running, queued)] == [2, 2]
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "overloaded") and "1 requests are waiting" in error["message"]
    assert ask(client, HI, max_tokens=2).usage.completion_tokens == 2  # serving again


# ---- command line ----------------------------------------------------------------------------------------


def test_cli_serve_builds_the_app_from_its_flags(ckpt, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    main(["serve", "--model", str(ckpt), "--port", "8123", "--device", "cpu", "--max-batch-size", "1",
          "--allowed-local-media-path", str(ckpt / "media"), "--allow-remote-images", "--max-image-pixels", "100",
          "--max-waiting", "7", "--max-image-mb", "2", "--remote-timeout", "3", "--max-downloads", "5",
          "--allowed-origins", "http://localhost:3000, https://app.example", "--api-key", "sekret"])
    settings = seen["app"].state.settings
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert settings.model_name == ckpt.name and settings.max_batch_size == 1 and settings.max_image_pixels == 100
    assert settings.allowed_local_media_path == str(ckpt / "media") and settings.allow_remote_images
    assert settings.max_waiting == 7
    assert settings.max_image_bytes == 2 * 2**20 and settings.remote_timeout_s == 3 and settings.max_downloads == 5
    assert settings.allowed_origins == ("http://localhost:3000", "https://app.example") and settings.api_key == "sekret"
