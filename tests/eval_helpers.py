"""Shared by the eval tests: a tiny saved checkpoint, a scripted stand-in for the pipeline, a fake OpenAI-compatible
judge on loopback, and small file writers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer
from polyfocus.model.presets import tiny_config


def save_tiny_checkpoint(path: Path) -> Path:
    """Random tiny model + its tokenizer (vicuna_v1 chat template) + a 56 px image processor, saved in `path`."""
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    PolyfocusForConditionalGeneration(tiny_config(image_token_id=image_id)).eval().save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=56).save_pretrained(path)
    return path


class Scripted:
    """Answers requests with a fixed list, in order (the runner keeps the benchmark's order), and records them."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.requests = []
        self.model = SimpleNamespace(name_or_path="scripted")

    def generate(self, requests, max_new_tokens=128, temperature=0.0, batch_size=8, **kwargs):
        self.requests += list(requests)
        return [self.answers.pop(0) for _ in requests]


def png(path: Path, size=(40, 30), colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class FakeOpenAI:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1: `reply(body) -> str` makes the answer, `fail` is a list
    of HTTP statuses to answer the next requests with, `requests` records every request body."""

    def __init__(self, reply=lambda body: "0.0"):
        self.reply, self.fail, self.requests = reply, [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({**body, "authorization": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                if fake.fail:
                    return self.send(fake.fail.pop(0), {"error": {"message": "injected failure"}})
                self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": fake.reply(body)}}]})

            def send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
