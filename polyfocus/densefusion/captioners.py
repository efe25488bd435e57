"""Captioners: the model that fuses an image and its hint prompt into a dense caption (spec densefusion.md §5).

- `local:DIR`   a polyfocus checkpoint (the caption engine: any model `polyfocus train` saved), batched generation
                through polyfocus.infer.pipeline;
- `openai:URL`  any OpenAI-compatible chat-completions endpoint (GPT-4V for the meta captions, vLLM / SGLang /
                `polyfocus serve` for an engine): requests in parallel up to `concurrency`, each with a `timeout`,
                retried `max_retries` times with exponential backoff by the `openai` client (0.5 s doubling to 8 s,
                with jitter; it honours Retry-After) on connection errors, timeouts, 408, 409, 429 and 5xx;
- `file:PATH`   captions that already exist, looked up by image (a DenseFusion jsonl's `caption`, or a LLaVA /
                messages file's first answer): to pair released GPT-4V captions (DenseFusion-4V-100K) or
                synthworld's true dense captions with freshly computed hints, as the engine's training set.

A captioner returns one `Caption` per item, in order: its text, or the error that stopped it. Errors are per image
and recorded by the engine; nothing is dropped silently.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from polyfocus.experts.base import Item


@dataclass
class Caption:
    text: str | None = None
    error: str | None = None


def checked(text: str) -> Caption:
    return Caption(text) if text and text.strip() else Caption(error="empty caption")


class Captioner:
    name = ""

    def __call__(self, items: list[Item], prompts: list[str]) -> list[Caption]:
        raise NotImplementedError


class LocalCaptioner(Captioner):
    name = "local"

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 512, temperature: float = 0.0,
                 device: str | None = None, dtype: str | None = None, template: str | None = None):
        from polyfocus.infer.pipeline import Pipeline

        self.pipe = Pipeline.from_pretrained(model, template=template, device=device, dtype=dtype)
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.temperature = float(temperature)

    def _generate(self, requests):
        return self.pipe.generate(requests, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  batch_size=self.batch_size)

    def __call__(self, items: list[Item], prompts: list[str]) -> list[Caption]:
        requests = [(item.image, prompt) for item, prompt in zip(items, prompts)]
        try:
            return [checked(text) for text in self._generate(requests)]
        except Exception:  # noqa: BLE001 - one bad request fails its batch: find it by captioning one by one
            captions = []
            for request in requests:
                try:
                    captions.append(checked(self._generate([request])[0]))
                except Exception as e:  # noqa: BLE001 - recorded for this image
                    captions.append(Caption(error=f"{type(e).__name__}: {e}"))
            return captions


class OpenAICaptioner(Captioner):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 3, max_tokens: int = 1024, temperature: float = 0.0):
        try:
            import openai
        except ImportError as e:
            raise ImportError("the openai captioner needs the openai client: "
                              "pip install 'polyfocus[densefusion]'") from e
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                    timeout=float(timeout), max_retries=int(max_retries))
        self.model, self.concurrency = model, int(concurrency)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)

    def _one(self, item: Item, prompt: str) -> Caption:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(item.image)}},
                   {"type": "text", "text": prompt}]
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], max_tokens=self.max_tokens,
                temperature=self.temperature)
            text = reply.choices[0].message.content or ""  # a 200 with no choices (some servers) fails this image only
        except Exception as e:  # noqa: BLE001 - after the client's retries: recorded for this image
            return Caption(error=f"{type(e).__name__}: {e}")
        return checked(text)

    def __call__(self, items: list[Item], prompts: list[str]) -> list[Caption]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, items, prompts))


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class FileCaptioner(Captioner):
    name = "file"

    def __init__(self, path: str):
        from polyfocus.data.formats import read_records
        from polyfocus.densefusion.sources import _first_answer

        self.path = path
        self.captions: dict[str, str] = {}
        for _, record in read_records(path, None):
            text = record.get("caption") if isinstance(record.get("caption"), str) else _first_answer(record)
            if text is None:
                continue
            for key in ("image_path", "image", "image_id", "id"):
                if isinstance(record.get(key), (str, int)):
                    self.captions.setdefault(str(record[key]), text)

    def __call__(self, items: list[Item], prompts: list[str]) -> list[Caption]:
        out = []
        for item in items:
            text = self.captions.get(item.image_path or "") or self.captions.get(item.image_id)
            out.append(Caption(text) if text else Caption(error=f"no caption for this image in {self.path}"))
        return out


CAPTIONERS = {"local": LocalCaptioner, "openai": OpenAICaptioner, "file": FileCaptioner}


def build_captioner(spec: str, options: dict | None = None) -> Captioner:
    """`local:DIR`, `openai:URL` (needs the option model=NAME) or `file:PATH`, with keyword options."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in CAPTIONERS or not target:
        raise ValueError(f"captioner {spec!r}: write local:MODEL_DIR, openai:BASE_URL or file:CAPTIONS_FILE")
    first = {"local": "model", "openai": "base_url", "file": "path"}[kind]
    return CAPTIONERS[kind](**{first: target, **(options or {})})
