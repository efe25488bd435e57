"""The web page of `polyfocus serve`, in headless Chromium (the system's, driven by Playwright; nothing downloaded)."""

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from PIL import Image  # noqa: E402

from polyfocus.infer.pipeline import Pipeline  # noqa: E402
from polyfocus.infer.server import ServeSettings, create_app  # noqa: E402

from serve_helpers import data_url, png_bytes, running_server, save_tiny_checkpoint  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("POLYFOCUS_REQUIRE_CHROMIUM"):  # CI sets it: there, skipping is a failure
    raise RuntimeError("POLYFOCUS_REQUIRE_CHROMIUM is set but no chromium is on PATH")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (CI installs Debian's)")

QUESTION = "What colour is the star?"


def test_page_streams_the_answer_that_the_api_gives(tmp_path, monkeypatch):
    pipe = Pipeline.from_pretrained(save_tiny_checkpoint(tmp_path / "ckpt"), device="cpu")
    forward = pipe.model.language_model.forward

    def slow_forward(*args, **kwargs):  # 40 ms a step, so that the tokens reach the page over many reads
        time.sleep(0.04)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.model.language_model, "forward", slow_forward)
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((80, 60), (220, 30, 30)))
    screenshot = tmp_path / "page.png"
    with running_server(create_app(pipe, ServeSettings(model_name="tiny"))) as base:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 900, "height": 800})
            fetched, logs = [], []
            page.on("request", lambda request: fetched.append(request.url))
            page.on("console", lambda message: logs.append(f"console {message.type}: {message.text}"))
            page.on("pageerror", lambda error: logs.append(f"page error: {error}"))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model: tiny')")
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#preview[src^='data:image/png;base64,']")
            page.fill("#question", QUESTION)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.evaluate("""() => {  // count how often the answer changes: more than once means it streamed
                window.answerUpdates = 0;
                new MutationObserver(() => window.answerUpdates++).observe(document.getElementById('answer'),
                    {childList: true, characterData: true, subtree: true});
            }""")
            page.click("#ask")
            page.wait_for_selector("#answer:not([data-state=streaming])", timeout=60_000)
            state, shown = page.get_attribute("#answer", "data-state"), page.text_content("#answer")
            updates = page.evaluate("window.answerUpdates")
            status = page.text_content("#status")
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()

        # The same request through the API: the page's defaults (top_p 0.7) and the values typed in.
        content = [{"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
                   {"type": "text", "text": QUESTION}]
        body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "top_p": 0.7,
                "messages": [{"role": "user", "content": content}]}
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
        expected = reply["choices"][0]["message"]["content"]

    assert state == "done" and not logs, (status, logs)
    assert expected and shown == expected
    assert updates > 2 and status == "finished: length"
    assert all(url.startswith(base) for url in fetched)  # the page asked nothing of any other host
    assert screenshot.stat().st_size > 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as png:
        png.verify()
        assert png.width == 900 and png.height >= 800
