"""Shared by the server tests: a tiny saved checkpoint, images as data URLs, a uvicorn server in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer
from polyfocus.model.presets import tiny_config


def save_tiny_checkpoint(path: Path) -> Path:
    """Model (random weights, seed 0) + tokenizer with the vicuna_v1 chat_template + 56 px image processor."""
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    PolyfocusForConditionalGeneration(tiny_config(image_token_id=image_id)).eval().save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=56).save_pretrained(path)
    return path


def png_bytes(size=(80, 60), colour=(220, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, timeout_s: float = 30.0):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
