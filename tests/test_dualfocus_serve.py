"""`polyfocus serve` with a request's "strategy": "dualfocus": the answer is the offline DualFocus answer, streamed or
not; a request DualFocus cannot answer is a 400."""

import io
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from polyfocus.infer import dualfocus  # noqa: E402
from polyfocus.infer.dualfocus import DualFocus  # noqa: E402
from polyfocus.infer.pipeline import Pipeline  # noqa: E402
from polyfocus.infer.server import ServeSettings, create_app  # noqa: E402

from serve_helpers import data_url, png_bytes, running_server, save_tiny_checkpoint  # noqa: E402

QUESTION = "What colour is the star?"
IMAGE = png_bytes((90, 60), (200, 60, 30))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")), device="cpu")


@pytest.fixture(scope="module")
def base(pipe):
    with running_server(create_app(pipe, ServeSettings(model_name="tiny", batch_window_ms=5))) as url:
        yield url


def ask(base, stream=False, images=(IMAGE,), **extra):
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    body = {"model": "tiny", "messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
            "strategy": "dualfocus", "temperature": 0, "max_tokens": 6, "stream": stream, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("box", [None, (0.1, 0.1, 0.6, 0.6)])
def test_served_answer_is_the_offline_answer(pipe, base, monkeypatch, box):
    """The random model's box reply holds no box (the macro answer) or, with the parser pinned to a box, the whole
    procedure runs: crop, micro answer through the batcher, scoring in a worker thread."""
    if box is not None:
        monkeypatch.setattr(dualfocus, "parse_box_text", lambda text: box)
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    (expected,) = DualFocus(pipe, cached=False).answer([([image], QUESTION)], max_new_tokens=6)
    assert expected.reason == ("no_box" if box is None else "perplexity")
    reply = ask(base)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected.answer
    chunks = [json.loads(line[6:]) for line in ask(base, stream=True).text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected.answer
    (answer_only,) = DualFocus(pipe, span="answer", cached=False).answer([([image], QUESTION)], max_new_tokens=6)
    reply = ask(base, strategy="dualfocus_answer")
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == answer_only.answer


def test_requests_dualfocus_cannot_answer_are_refused(base):
    for images, strategy in (((), "dualfocus"), ((IMAGE, IMAGE), "dualfocus"), ((), "dualfocus_answer")):
        reply = ask(base, images=images, strategy=strategy)
        assert reply.status_code == 400 and strategy in reply.json()["error"]["message"]
    assert ask(base).status_code == 200  # and serving goes on
