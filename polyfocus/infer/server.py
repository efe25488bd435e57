"""An OpenAI-compatible server (`polyfocus serve`): /v1/chat/completions, /v1/models, /health and a web page at /.

    polyfocus serve --model runs/demo --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}'

The request and response shapes are OpenAI's chat completions (what vLLM, SGLang, LLaMA-Factory's api and
lmms-eval's openai backend speak, spec ecosystem.md §0.4): content parts {"type": "text"} and
{"type": "image_url", "image_url": {"url": ...}}, streaming as server-sent events of chat.completion.chunk
objects ending with `data: [DONE]`, errors as {"error": {"message", "type", "param", "code"}}.

A user message's images go first, each as "<image>\\n", then its text parts joined by newlines (as vLLM does for
LLaVA, and as LLaVA puts the image before the question). Everything about a request is checked before it is
queued (size, JSON, fields and types, images, token counts), so bad input costs one 4xx and nothing else.
Concurrent requests are batched by the scheduler `make_scheduler` picks (continuous batching, infer/continuous.py;
or per window, infer/batcher.py).

Image URLs: data: (base64) always; local files (file:// or a path) only under --allowed-local-media-path;
http(s) only with --allow-remote-images (off by default: the server would fetch any URL a client names). Every image
is held to one size limit however it arrives (`max_image_bytes`). Downloads run on the event loop, a bounded number
at once (`max_downloads`), each within a total deadline (`remote_timeout_s`): a URL that sends a byte now and then
holds one download slot until its deadline, never a thread that other requests need.

Browsers: a web page the user opens elsewhere can POST to a loopback server (a "simple" cross-origin request, e.g.
text/plain, needs no preflight), so a request whose Origin is not the server's own is refused unless
--allowed-origins names it. With --api-key, /v1/* needs `Authorization: Bearer <key>` (as OpenAI and vLLM).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import math
import re
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from PIL import Image

from polyfocus.data.templates import IMAGE_TOKEN, TemplateError
from polyfocus.infer.batcher import Event, Job
from polyfocus.infer.continuous import make_scheduler
from polyfocus.infer.strategies import STRATEGIES, get_strategy

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra
    raise ImportError("polyfocus serve needs FastAPI and uvicorn: pip install 'polyfocus[serve]'") from e

DETECTOR_LOCK = threading.Lock()
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may try to decode; nothing exotic
# The image processor pads to a max(w, h) square ("pad") or scales the short side to the input size ("square"):
# a 1 x 16M-pixel image passes a pixel limit and would then need terabytes. So the aspect ratio is bounded (as
# Qwen2-VL's processor does) and a side over sqrt(max_image_pixels) is scaled down before the image is queued.
MAX_ASPECT_RATIO = 200


@dataclass
class ServeSettings:
    model_name: str = "polyfocus"  # the `model` that requests must name
    max_batch_size: int = 16
    max_waiting: int = 256  # requests queued for the next batch; more are refused with 503 (backpressure)
    batch_window_ms: float = 10.0  # how long the scheduler waits for more requests after the first (when idle)
    scheduler: str = "continuous"  # or "window" (infer/continuous.py's make_scheduler)
    max_tokens_in_flight: int = 65536  # continuous: prompt + max_tokens of the running requests, at most
    prefix_cache_mb: float = 1024.0  # KV of recent prompts, answers (0: off); visual tokens, tower features: 1/4 each
    max_model_len: int | None = None  # prompt + completion tokens; default: the LLM's max_position_embeddings
    default_max_tokens: int = 512  # when a request names none (capped by what the context has left)
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4  # per request
    max_image_pixels: int = 4096 * 4096  # checked on the header, before anything is decoded
    max_image_bytes: int = 20 * 2**20  # one limit however an image arrives: a data: URL, a local file, a download
    allowed_local_media_path: str | None = None
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0  # one download in total: waiting for a slot, connecting, redirects, every byte
    max_downloads: int = 8  # image downloads at once, over all requests
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own that may call it; "*": any
    api_key: str | None = None  # set: /v1/* needs "Authorization: Bearer <api_key>"


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ---- request schema (OpenAI's chat completions; unknown fields are errors, types are strict) ---------------


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(Schema):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # accepted for compatibility; images go in at the model's size


class ContentPart(Schema):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_its_payload(self):
        payload = {"text": self.text, "image_url": self.image_url}
        if any((value is not None) != (name == self.type) for name, value in payload.items()):
            raise ValueError(f"a {self.type!r} part needs the field {self.type!r}, and no other payload")
        return self


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for system
    content: str | list[ContentPart]
    name: str | None = None  # OpenAI's participant name: accepted, unused (as vLLM)


class StreamOptions(Schema):
    include_usage: bool = False


class ChatRequest(Schema):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default (LLaVA's CLI and web page use 0.2)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None  # accepted, unused
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)
    strategy: str = "plain"  # how the answer is produced: see STRATEGIES

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """OpenAI's optional fields are nullable, and null means "the default" (the API and vLLM take
        {"temperature": null}; the openai client sends null for an explicit None)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULLABLE_FIELDS)}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("at most 4 stop strings, none empty")
        return stops

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name):
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; this server knows {sorted(STRATEGIES)}")
        return name


NULLABLE_FIELDS = {"stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
                   "seed", "n", "user"}


def parse_request(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


_TYPE_LABEL = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")  # pydantic's union members


def validation_error(e: ValidationError) -> APIError:
    """The deepest error, with its field as a dotted path (messages[0].content[1].image_url.url)."""
    errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return APIError(f"the body is not valid JSON: {errors[0]['msg']}", code="invalid_json")

    def param(err) -> str:
        loc, path = err["loc"], ""
        for i, part in enumerate(loc):
            if isinstance(part, int):
                path += f"[{part}]"
            # union labels ("str", "list[ContentPart]") are pydantic's, except an unknown field's own name
            elif not _TYPE_LABEL.match(part) or (err["type"] == "extra_forbidden" and i == len(loc) - 1):
                path += ("." if path else "") + part
        return path

    deepest = max(errors, key=lambda err: len(param(err)))
    where = param(deepest)
    if deepest["type"] == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {where}", param=where, code="unknown_field")
    # Alternatives of a union (content: a string or a list) fail at the same place: report them together.
    messages = dict.fromkeys(err["msg"].removeprefix("Value error, ") for err in errors if param(err) == where)
    return APIError(f"{where or 'body'}: {' or '.join(messages)}", param=where or None, code="invalid_value")


# ---- request -> job --------------------------------------------------------------------------------------


def check_request(chat: ChatRequest, settings: ServeSettings) -> None:
    """The checks that need neither the model nor the images (before any image is fetched)."""
    if chat.model != settings.model_name:
        raise APIError(f"The model `{chat.model}` does not exist; this server serves `{settings.model_name}`.",
                       param="model", code="model_not_found", status=404)
    n_images = sum(isinstance(m.content, list) and sum(p.type == "image_url" for p in m.content)
                   for m in chat.messages)
    if n_images > settings.max_images:
        raise APIError(f"{n_images} images in one request; this server accepts at most {settings.max_images}",
                       param="messages", code="too_many_images")
    if chat.messages[-1].role != "user":
        raise APIError("the last message must be the user's", param=f"messages[{len(chat.messages) - 1}].role")


def build_job(chat: ChatRequest, pipe, settings: ServeSettings, fetched: dict[str, bytes] | None = None) -> Job:
    """Check a parsed request against the model and the limits, decode its images: a Job for the batcher.
    fetched: the request's http(s) images, downloaded beforehand (ImageDownloads.fetch_all), by URL."""
    check_request(chat, settings)
    messages, images = [], []
    for i, message in enumerate(chat.messages):
        text, message_images = message_content(message, f"messages[{i}]", settings, fetched or {})
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
        images += message_images
    refusal = get_strategy(chat.strategy).refusal(pipe.model.config, images, messages)
    if refusal:
        raise APIError(refusal[0], param=refusal[1])
    boxes, object_tokens = None, None
    if getattr(pipe, "object_boxes", None) is not None:  # MG-LLaVA: detect here, so the count has the object tokens
        with DETECTOR_LOCK:  # request threads share the detector (and its fast tokenizer: "Already borrowed")
            boxes = [pipe.object_boxes.record_of(None, image) for image in images]
        object_tokens = [len(pipe.image_boxes(image, None, record)) for image, record in zip(images, boxes)]
    try:
        prompt_tokens = len(pipe.encode(messages, len(images), object_tokens=object_tokens))
    except TemplateError as e:  # e.g. roles that do not alternate
        raise APIError(f"messages: {e}", param="messages") from None
    max_tokens = completion_budget(chat, prompt_tokens, context_length(pipe, settings), settings)
    return Job(images=images, messages=messages, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
               temperature=chat.temperature, top_p=chat.top_p, stop=chat.stop or [], seed=chat.seed,
               ignore_eos=chat.ignore_eos, boxes=boxes, stream=chat.stream)


def message_content(message: Message, where: str, settings: ServeSettings,
                    fetched: dict[str, bytes]) -> tuple[str, list[Image.Image]]:
    """A message's content as template text ("<image>\\n" per image, then the text parts) and its images."""
    parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    texts, images = [], []
    for j, part in enumerate(parts):
        at = f"{where}.content" + ("" if isinstance(message.content, str) else f"[{j}]")
        if part.type == "text":
            if IMAGE_TOKEN in part.text:  # it would claim image positions that no image fills
                raise APIError(f"{at}: the text holds {IMAGE_TOKEN}; send images as image_url parts", param=at)
            texts.append(part.text)
        elif message.role != "user":
            raise APIError(f"{at}: images are accepted in user messages only", param=at)
        else:
            images.append(load_image_url(part.image_url.url, f"{at}.image_url.url", settings, fetched))
    return (IMAGE_TOKEN + "\n") * len(images) + "\n".join(texts), images


def context_length(pipe, settings: ServeSettings) -> int:
    if settings.max_model_len is not None:
        return settings.max_model_len
    return getattr(pipe.model.config.text_config, "max_position_embeddings", None) or 2048


def completion_budget(chat: ChatRequest, prompt_tokens: int, context: int, settings: ServeSettings) -> int:
    """max_tokens of the request (or the default), checked against what the context holds, as vLLM does."""
    asked = chat.max_completion_tokens or chat.max_tokens
    param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
    if prompt_tokens >= context:
        raise APIError(f"This model's maximum context length is {context} tokens; the messages take "
                       f"{prompt_tokens} tokens (images included).", param="messages", code="context_length_exceeded")
    if asked is None:
        return min(settings.default_max_tokens, context - prompt_tokens)
    if prompt_tokens + asked > context:
        raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion).",
                       param=param, code="context_length_exceeded")
    return asked


# ---- images ----------------------------------------------------------------------------------------------


def load_image_url(url: str, param: str, settings: ServeSettings, fetched: dict[str, bytes]) -> Image.Image:
    if url.startswith("data:"):
        data = decode_data_url(url, param, settings.max_image_bytes)
    elif url.startswith(("http://", "https://")):
        check_remote_allowed(param, settings)
        data = fetched[url]  # downloaded before the job was built, on the event loop (ImageDownloads)
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", url) and not url.startswith("file:"):
        raise APIError(f"{param}: unsupported URL scheme {url.split(':', 1)[0]!r} (data:, file:, http(s):)",
                       param=param, code="invalid_image_url")
    else:
        data = read_local_file(url, param, settings)
    return decode_image(data, param, settings.max_image_pixels)


def check_image_bytes(size: int, param: str, limit: int) -> None:
    """The one size limit of an image, however it arrives."""
    if size > limit:
        raise APIError(f"{param}: the image is over {limit} bytes (the server's limit for an image)", param=param,
                       code="image_too_large")


def check_remote_allowed(param: str, settings: ServeSettings) -> None:
    if not settings.allow_remote_images:
        raise APIError(f"{param}: remote image URLs are off on this server (start it with --allow-remote-images);"
                       " send the image as a data: URL", param=param, code="remote_images_disabled")


def decode_data_url(url: str, param: str, limit: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(f"{param}: a data URL must look like data:image/png;base64,<data>", param=param,
                       code="invalid_image_url")
    check_image_bytes(len(payload) // 4 * 3 - payload[-2:].count("="), param, limit)  # before decoding it
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(f"{param}: invalid base64 ({e})", param=param, code="invalid_base64") from None
    check_image_bytes(len(data), param, limit)
    return data


def read_local_file(url: str, param: str, settings: ServeSettings) -> bytes:
    """A file:// URL or a path (relative ones under the allowed directory), which must resolve inside it."""
    if settings.allowed_local_media_path is None:
        raise APIError(f"{param}: local image files are off on this server (start it with "
                       "--allowed-local-media-path DIR); send the image as a data: URL", param=param,
                       code="local_images_disabled")
    root = Path(settings.allowed_local_media_path).resolve()
    name = unquote(urlparse(url).path) if url.startswith("file:") else url
    try:  # a NUL byte, a name too long, a file that cannot be read: the client's path, so a 400
        path = (root / name).resolve()  # follows symlinks and "..", so neither can leave the directory
        if not path.is_relative_to(root):
            raise APIError(f"{param}: {name} is outside the allowed directory", param=param,
                           code="path_not_allowed", status=403)
        if not path.is_file():
            raise APIError(f"{param}: no such file: {name}", param=param, code="image_not_found")
        check_image_bytes(path.stat().st_size, param, settings.max_image_bytes)
        return path.read_bytes()
    except (OSError, ValueError) as e:
        raise APIError(f"{param}: cannot read the local file {name[:200]!r}: {type(e).__name__}: "
                       f"{getattr(e, 'strerror', None) or e}", param=param, code="invalid_image_url") from None


class ImageDownloads:
    """The http(s) images of requests (--allow-remote-images), fetched on the event loop before a request's job is
    built: at most `max_downloads` at once over all requests, each within `remote_timeout_s` in total (waiting for
    a slot included). A download holds a slot, never a thread: the request threads decode and tokenize for every
    other request, and a URL that sends a byte every half second once held one for a minute."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.max_downloads)
        self.client = None  # httpx.AsyncClient, made on the first download

    async def fetch_all(self, chat: ChatRequest) -> dict[str, bytes]:
        """The bytes of every http(s) image in the request's user messages, by URL."""
        wanted: dict[str, str] = {}  # url -> where it first appears
        for i, message in enumerate(chat.messages):
            if message.role != "user" or isinstance(message.content, str):
                continue  # an image elsewhere is refused when the job is built
            for j, part in enumerate(message.content):
                if part.type == "image_url" and part.image_url.url.startswith(("http://", "https://")):
                    param = f"messages[{i}].content[{j}].image_url.url"
                    check_remote_allowed(param, self.settings)
                    wanted.setdefault(part.image_url.url, param)
        tasks = [asyncio.ensure_future(self.fetch(url, param)) for url, param in wanted.items()]
        try:
            return dict(zip(wanted, await asyncio.gather(*tasks)))
        finally:  # one failed: the others stop too, and free their slots
            for task in tasks:
                task.cancel()

    async def fetch(self, url: str, param: str) -> bytes:
        import httpx  # only with --allow-remote-images

        deadline = self.settings.remote_timeout_s
        try:
            return await asyncio.wait_for(self._download(url, param), deadline)
        except asyncio.TimeoutError:
            raise APIError(f"{param}: the image did not arrive within {deadline:g} s", param=param,
                           code="image_fetch_timeout") from None
        except (httpx.HTTPError, httpx.InvalidURL) as e:  # InvalidURL is not an HTTPError
            raise APIError(f"{param}: cannot fetch the image ({type(e).__name__}: {e})", param=param,
                           code="image_fetch_failed") from None

    async def _download(self, url: str, param: str) -> bytes:
        import httpx

        async with self.slots:
            if self.client is None:
                self.client = httpx.AsyncClient(follow_redirects=True, timeout=self.settings.remote_timeout_s)
            async with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(f"{param}: fetching the image gave HTTP {response.status_code}", param=param,
                                   code="image_fetch_failed")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    check_image_bytes(len(data), param, self.settings.max_image_bytes)
                return bytes(data)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Decode to RGB. The size in the header is checked first, so a decompression bomb is never decoded; a side
    longer than sqrt(max_pixels) is then scaled down, so that the padded square stays within max_pixels too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise APIError(f"{param}: the image is {width}x{height} = {width * height} "
                               f"pixels; this server accepts at most {max_pixels}", param=param, code="image_too_large")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise APIError(f"{param}: the image is {width}x{height}; this server accepts an aspect ratio of at "
                               f"most {MAX_ASPECT_RATIO}:1", param=param, code="image_too_large")
            image.load()
            image = image.convert("RGB")
            side = math.isqrt(max_pixels)
            if max(width, height) > side:
                image.thumbnail((side, side), Image.Resampling.BICUBIC)
            return image
    except Image.DecompressionBombError as e:
        raise APIError(f"{param}: {e}", param=param, code="image_too_large") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image" or "broken image"
        raise APIError(f"{param}: not a readable image ({', '.join(IMAGE_FORMATS)}): {type(e).__name__}: {e}",
                       param=param, code="invalid_image") from None


# ---- the app ---------------------------------------------------------------------------------------------


def create_app(pipe, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    context = context_length(pipe, settings)
    if getattr(pipe, "object_boxes", None) is not None and pipe.object_boxes.detector is None:
        raise ValueError("this model has MG-LLaVA's object tokens but no box_detector: the server detects each "
                         "image's boxes, so set box_detector (synthworld, or a local OWLv2 / Grounding DINO "
                         "directory) and box_queries in its config.json")
    # Settle the fast tokenizer's padding/truncation state now: transformers changes it on the first call when a
    # tokenizer.json holds other settings, and such a change racing another thread's call fails ("Already borrowed").
    pipe.encode([{"role": "user", "content": "Hi"}], 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cache_bytes = int(settings.prefix_cache_mb * 2**20)
        app.state.batcher = make_scheduler(pipe, settings.scheduler, settings.max_batch_size,
                                           settings.batch_window_ms / 1000,
                                           max_tokens_in_flight=settings.max_tokens_in_flight,
                                           prefix_cache_bytes=cache_bytes, feature_cache_bytes=cache_bytes // 4)
        app.state.downloads = ImageDownloads(settings)
        yield
        await app.state.downloads.close()
        app.state.batcher.close()

    app = FastAPI(title="polyfocus", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.add_middleware(RequestGuard, settings=settings)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(f"{request.method} {request.url.path}: {e.detail}", code=code, status=e.status_code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "polyfocus", "max_model_len": context}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("polyfocus.infer").joinpath("static/index.html").read_text("utf-8"),
                            headers={"Content-Security-Policy": PAGE_POLICY})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await read_body(request, settings.max_body_bytes))
        waiting = request.app.state.batcher.waiting
        if waiting >= settings.max_waiting:  # refuse before decoding images: an overload must not grow memory
            raise APIError(f"the server is overloaded: {waiting} requests are waiting for a batch; retry later",
                           code="overloaded", status=503, type="server_error")
        check_request(chat, settings)
        fetched = await request.app.state.downloads.fetch_all(chat)  # on the loop: no request thread waits on one
        job = await run_in_threadpool(build_job, chat, pipe, settings, fetched)  # image decoding off the event loop
        events = get_strategy(chat.strategy).serve(request.app.state.batcher, job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(sse_chunks(events, meta, job, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await until_disconnected(request, completion(events, meta, job), job)

    return app


class RequestGuard:
    """ASGI middleware, before any route: browsers' cross-origin requests and the API key.

    A request whose Origin is neither the server's own (scheme and Host) nor in `allowed_origins` is refused with 403
    before it runs: a browser sends a "simple" cross-origin POST (text/plain) without asking first, so CORS headers
    alone would only hide the answer from the page, not stop the generation. Allowed origins get CORS headers and
    their preflight answered. Clients that are not browsers send no Origin and are not affected. With an API key,
    /v1/* needs `Authorization: Bearer <key>` (preflights excepted: browsers send them without credentials)."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        origin, cors = request.headers.get("origin"), []
        if origin is not None and origin.lower() != f"{scope['scheme']}://{request.headers.get('host', '')}".lower():
            if origin not in self.settings.allowed_origins and "*" not in self.settings.allowed_origins:
                error = APIError(f"cross-origin requests from {origin} are refused; start the server with "
                                 f"--allowed-origins {origin} to allow them", code="origin_not_allowed", status=403)
                return await error.response()(scope, receive, send)
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            if request.method == "OPTIONS" and "access-control-request-method" in request.headers:  # a preflight
                asked = request.headers.get("access-control-request-headers", "authorization, content-type")
                preflight = Response(status_code=204, headers={
                    "Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Max-Age": "600",
                    "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Allow-Headers": asked})
                return await preflight(scope, receive, send)
        if self.settings.api_key and scope["path"].startswith("/v1/") and not self.authorized(request):
            error = APIError("Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key", status=401)
            response = error.response()
            response.headers.update({k.decode(): v.decode() for k, v in cors})
            return await response(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def authorized(self, request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.settings.api_key.encode())


async def until_disconnected(request: Request, work, job: Job, poll_s: float = 0.25):
    """Await `work` (a non-streamed answer); if the client hangs up first (a timeout, a killed eval), cancel it
    and free the job's row at the next step, as vLLM does, rather than generating to max_tokens for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise APIError("the client closed the connection", code="client_closed", status=499)
    finally:
        task.cancel()


# The page fetches nothing from elsewhere: its own script and styles, images as data:/blob: URLs.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'")


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(f"the request body is over {limit} bytes", code="request_too_large", status=413)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


async def completion(events: AsyncIterator[Event], meta: dict, job: Job) -> dict:
    async for event in events:
        if event.kind == "error":
            raise APIError(event.text, status=500, type="server_error")
        if event.kind == "finish":
            choice = {"index": 0, "message": {"role": "assistant", "content": event.text}, "logprobs": None,
                      "finish_reason": event.finish_reason}
            return {**meta, "object": "chat.completion", "choices": [choice],
                    "usage": usage(job, event.completion_tokens)}
    raise APIError("the answer ended without finishing", status=500, type="server_error")


async def sse_chunks(events: AsyncIterator[Event], meta: dict, job: Job, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a chunk with finish_reason, [usage], then [DONE]."""
    import json

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        body = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        if event.kind == "delta":
            yield chunk({"content": event.text})
        elif event.kind == "finish":
            yield chunk({}, event.finish_reason)
            if include_usage:
                body = {**meta, "object": "chat.completion.chunk", "choices": [],
                        "usage": usage(job, event.completion_tokens)}
                yield f"data: {json.dumps(body)}\n\n"
        else:  # an error after the stream began: the status is already sent, so it goes in the stream (as vLLM)
            error = {"message": event.text, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
    yield "data: [DONE]\n\n"


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, template: str | None = None,
          device: str | None = None, settings: ServeSettings | None = None, log_level: str = "info") -> None:
    """Load the checkpoint and serve it until interrupted."""
    import uvicorn

    from polyfocus.infer.pipeline import Pipeline

    settings = settings or ServeSettings(model_name=Path(model).resolve().name)
    # The tower's features per image (Pipeline) within the server's cache budget, as the batcher's visual tokens.
    pipe = Pipeline.from_pretrained(model, template=template, device=device,
                                    feature_cache_bytes=int(settings.prefix_cache_mb * 2**20) // 4)
    uvicorn.run(create_app(pipe, settings), host=host, port=port, log_level=log_level)
