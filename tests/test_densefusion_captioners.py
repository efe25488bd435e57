"""DenseFusion's captioners (polyfocus/densefusion/captioners.py): a local polyfocus model, any OpenAI-compatible
endpoint (our own `polyfocus serve` on loopback, and a scripted endpoint for retries, timeouts and concurrency),
and existing captions from a file."""

import base64
import http.server
import io
import json
import threading
import time

import pytest
from PIL import Image

from polyfocus.densefusion.captioners import FileCaptioner, build_captioner
from polyfocus.experts import Item

from test_densefusion_helpers import http_server, tiny_captioner  # noqa: E402

COLOURS = [(220, 30, 30), (30, 40, 220), (40, 160, 60)]


def items(n=3, size=(56, 40)):
    return [Item(f"img{i}", f"images/img{i}.png", image=Image.new("RGB", size, COLOURS[i % 3])) for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("captioner"))


# ---- local ----------------------------------------------------------------------------------------------------


def test_local_captioner_is_the_pipelines_batched_generation(model_dir):
    from polyfocus.infer.pipeline import Pipeline

    batch = items()
    prompts = ["Describe this image in detail.", "What is it?", "Describe this image in detail."]
    captioner = build_captioner(f"local:{model_dir}", {"batch_size": 2, "max_new_tokens": 12})
    got = captioner(batch, prompts)
    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    want = pipe.generate([(i.image, p) for i, p in zip(batch, prompts)], max_new_tokens=12, batch_size=2)
    assert [c.text for c in got] == want and all(c.error is None for c in got)


def test_local_captioner_records_a_failing_image_and_captions_the_rest(model_dir):
    batch = items()
    too_long = "word " * 5000  # beyond the model's 4096-token context
    captions = build_captioner(f"local:{model_dir}", {"max_new_tokens": 4})(batch, ["Hi.", too_long, "Hi."])
    assert captions[0].text and captions[2].text
    assert captions[1].text is None and "exceeds the model's context" in captions[1].error


# ---- OpenAI-compatible: polyfocus serve ----------------------------------------------------------------------------


def test_openai_captioner_against_polyfocus_serve_matches_local_generation(model_dir):
    """The engine's endpoint path end to end: the same greedy captions as the model run in-process."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from polyfocus.infer.pipeline import Pipeline
    from polyfocus.infer.server import ServeSettings, create_app

    from serve_helpers import running_server

    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    batch = items(4)
    prompts = [f"Describe image {i} in detail." for i in range(4)]
    with running_server(create_app(pipe, ServeSettings(model_name="engine", max_batch_size=4))) as base:
        captioner = build_captioner(f"openai:{base}/v1", {"model": "engine", "concurrency": 2, "max_tokens": 10})
        got = captioner(batch, prompts)
    want = [pipe.generate([(i.image, p)], max_new_tokens=10)[0] for i, p in zip(batch, prompts)]
    assert [c.text for c in got] == want


# ---- OpenAI-compatible: a scripted endpoint ------------------------------------------------------------------------


class ScriptedEndpoint(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions answering "<width>x<height> <first word of the prompt>" of the request's image; images
    named by their size in `script` fail first: {"40x40": [503, 503]} answers 503 twice, then succeeds."""

    script: dict = {}
    delay_s = 0.0
    lock = threading.Lock()
    attempts: dict = {}
    in_flight = 0
    most_in_flight = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["messages"][0]["content"]
        image_part, text_part = parts  # the image first, as LLaVA and our server read it
        data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
        key = "{}x{}".format(*Image.open(io.BytesIO(data)).size)
        cls = type(self)
        with cls.lock:
            cls.attempts[key] = cls.attempts.get(key, 0) + 1
            attempt = cls.attempts[key]
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        try:
            time.sleep(cls.delay_s)
            failures = cls.script.get(key, [])
            if attempt <= len(failures):
                self.send_response(failures[attempt - 1])
                self.send_header("retry-after-ms", "5")  # the openai client honours it: a fast test
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant",
                                              "content": f"{key} {text_part['text'].split()[0]}"}}]}
            payload = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass
        finally:
            with cls.lock:
                cls.in_flight -= 1


def endpoint(script=None, delay_s=0.0):
    handler = type("Endpoint", (ScriptedEndpoint,), {"script": script or {}, "delay_s": delay_s, "attempts": {},
                                                     "lock": threading.Lock()})
    return handler, http_server(handler)


def sized_items(sizes):
    return [Item(f"i{k}", f"i{k}.png", image=Image.new("RGB", s, (90, 90, 90))) for k, s in enumerate(sizes)]


def test_openai_captioner_retries_with_backoff_and_records_what_still_fails():
    pytest.importorskip("openai")
    handler, server = endpoint({"40x40": [503, 502], "50x50": [500] * 10, "60x60": [404]})
    with server as base:
        captioner = build_captioner(f"openai:{base}/v1", {"model": "m", "max_retries": 3, "timeout": 10})
        got = captioner(sized_items([(30, 30), (40, 40), (50, 50), (60, 60)]), ["Describe it."] * 4)
    assert got[0].text == "30x30 Describe" and handler.attempts["30x30"] == 1
    assert got[1].text == "40x40 Describe" and handler.attempts["40x40"] == 3  # two retries, then the answer
    assert got[2].text is None and "InternalServerError" in got[2].error and handler.attempts["50x50"] == 4
    assert got[3].text is None and "NotFoundError" in got[3].error and handler.attempts["60x60"] == 1  # no retry


def test_openai_captioner_timeout_is_recorded_per_image():
    pytest.importorskip("openai")
    handler, server = endpoint(delay_s=1.5)
    with server as base:
        captioner = build_captioner(f"openai:{base}/v1", {"model": "m", "max_retries": 0, "timeout": 0.3})
        got = captioner(sized_items([(30, 30)]), ["Describe it."])
    assert got[0].text is None and "Timeout" in got[0].error


def test_openai_captioner_keeps_to_its_concurrency_limit():
    pytest.importorskip("openai")
    handler, server = endpoint(delay_s=0.15)
    with server as base:
        captioner = build_captioner(f"openai:{base}/v1", {"model": "m", "concurrency": 2})
        got = captioner(sized_items([(20 + k, 20) for k in range(6)]), ["Go."] * 6)
    assert [c.text for c in got] == [f"{20 + k}x20 Go." for k in range(6)]  # in input order
    assert handler.most_in_flight == 2


class NoChoicesEndpoint(ScriptedEndpoint):
    """A 200 reply with an empty `choices` list for 40x40 images (some servers answer errors that way)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = base64.b64decode(body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
        key = "{}x{}".format(*Image.open(io.BytesIO(data)).size)
        choices = [] if key == "40x40" else [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": key}}]
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                              "choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_openai_captioner_records_a_reply_without_choices_for_its_image_only():
    pytest.importorskip("openai")
    with http_server(NoChoicesEndpoint) as base:
        got = build_captioner(f"openai:{base}/v1", {"model": "m"})(sized_items([(30, 30), (40, 40)]), ["Go."] * 2)
    assert got[0].text == "30x30" and got[1].text is None and "IndexError" in got[1].error


# ---- existing captions ----------------------------------------------------------------------------------------


def test_file_captioner_reads_densefusion_and_llava_files(tmp_path):
    densefusion = tmp_path / "df.jsonl"
    densefusion.write_text(json.dumps({"image_id": "img0", "caption": "A red square.", "image_path": "x/0.png"}) + "\n")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "s1", "image": "images/img1.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A blue square."}]}]))
    batch = items()
    assert [c.text for c in FileCaptioner(str(densefusion))(batch, [""] * 3)] == ["A red square.", None, None]
    got = build_captioner(f"file:{llava}")(batch, [""] * 3)
    assert got[1].text == "A blue square." and "no caption for this image" in got[0].error


def test_bad_captioner_spec():
    with pytest.raises(ValueError, match="write local:MODEL_DIR"):
        build_captioner("gpt4v")
