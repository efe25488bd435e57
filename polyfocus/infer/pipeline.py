"""Chat and batched generation: one `Pipeline` object holding model, tokenizer, image processor and template.

    pipe = Pipeline.from_pretrained("./polyfocus_demo/stage2")  # a local directory
    pipe.generate([(["a.png"], "What colour is the star?"), ([], "Say hi.")])      # batched, left-padded
    history = []
    pipe.chat("a.png", "What is in the image?", history)                           # multi-turn
    for piece in pipe.chat("a.png", "And where?", history, stream=True): print(piece, end="")

As LLaVA's CLI (spec llava_base.md §5): the image goes in the first user turn only ("<image>\\n" + question)
and every turn re-encodes the whole conversation, so the second prompt starts with the first turn's ids.
Unlike LLaVA's CLI and worker (batch size 1), requests are batched: each `<image>` is already expanded to
`num_image_tokens` ids at tokenization, so prompts are left-padded like any LM's and `generate` is
transformers' own. Generation stops at the tokenizer's EOS and at the template's stop string, which is
stripped from the answer (the worker trims it too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Thread

import torch
from PIL import Image
from transformers import AutoTokenizer, TextIteratorStreamer

from polyfocus.data.boxes import BoxRecord, ObjectBoxes, indexed
from polyfocus.data.files import require_local
from polyfocus.data.images import CONFIG_NAME, ImageProcessor, load_image
from polyfocus.data.templates import (
    AUTO_NAMES,
    IMAGE_TOKEN,
    TEMPLATES,
    Template,
    TemplateError,
    TokenizerTemplate,
    encode,
    get_template,
)
from polyfocus.experts.detectors import model_detector
from polyfocus.infer.requests import ImageInput, Request, normalize_request
from polyfocus.infer.stops import answer_text, until_stop
from polyfocus.infer.strategies import get_strategy
from polyfocus.model.vision import FeatureCache

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)


class Pipeline:
    """Model + tokenizer + image processor + conversation template; `generate` (batched) and `chat`."""

    def __init__(self, model, tokenizer, image_processor: ImageProcessor,
                 template: str | Template | TokenizerTemplate | None = None, object_boxes: ObjectBoxes | None = None,
                 feature_cache_bytes: int = 2**30):
        """feature_cache_bytes: the tower's features of recently seen images are kept (up to this size; 0: no cache
        added, a model's own is kept), so an image asked several questions (a benchmark's, a chat's turns) goes
        through the tower once, as vLLM's encoder cache does. The model's weights must not change while the Pipeline
        is used (gradients are never taken through it); `pipe.model.vision_feature_cache.entries.clear()` after
        changing them."""
        self.model = model  # from_pretrained gives it in eval mode
        if feature_cache_bytes and getattr(model, "vision_feature_cache", False) is None:
            model.vision_feature_cache = FeatureCache(feature_cache_bytes)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = resolve_template(template, tokenizer)
        self.stop = stop_string(self.template)
        # MG-LLaVA's object tokens: each image's boxes, from the request or the model's detector (config.box_detector)
        self.object_boxes = object_boxes
        if object_boxes is None and getattr(model.config, "object_tokens", False):
            self.object_boxes = ObjectBoxes.for_model(model.config, image_processor, required=False,
                                                      detector=model_detector(model.config))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, template: str | None = None, device: str | None = None,
                        dtype: torch.dtype | str | None = None, feature_cache_bytes: int = 2**30) -> Pipeline:
        """Model (any checkpoint `load_model` reads), tokenizer and image processor from one directory.

        template: a built-in template name; default "auto" = the tokenizer's chat_template (a training run
        saves the tokenizer with its template's Jinja as chat_template).
        """
        from polyfocus.checkpoints import load_model

        model = load_model(path, **({"dtype": dtype} if dtype is not None else {}))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = load_tokenizer(path)
        return cls(model.to(device), tokenizer, load_image_processor(path, model.config), template,
                   feature_cache_bytes=feature_cache_bytes)

    # ---- batched generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, strategy: str = "plain", **gen_kwargs) -> list[str]:
        """Answer every request; batches of `batch_size`, left-padded. Greedy when temperature <= 0.001.

        strategy: "plain" (one generation) or "dualfocus" (macro, box, zoomed micro answer, pick by perplexity;
        polyfocus/infer/strategies.py). gen_kwargs go to transformers' `generate` (num_beams, repetition_penalty,
        logits_processor, ...).
        """
        if strategy != "plain":
            return get_strategy(strategy).generate(self, requests, max_new_tokens, temperature, top_p, batch_size,
                                                   **gen_kwargs)[0]
        answers = []
        for start in range(0, len(requests), batch_size):
            inputs = self.prepare(requests[start:start + batch_size], first_index=start)
            kwargs = self._generation_kwargs(inputs, max_new_tokens, temperature, top_p, gen_kwargs)
            new_tokens = self.model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
            answers += [self.decode(ids) for ids in new_tokens]
        return answers

    def prepare(self, requests: Sequence[Request], first_index: int = 0,
                boxes: Sequence[Sequence[BoxRecord | None] | None] | None = None) -> dict[str, torch.Tensor]:
        """Requests -> input_ids / attention_mask [B, L] (left-padded) and pixel_values [n_images, 3, S, S]
        holding every request's images in order (the model fills image positions row by row).

        Models with object tokens (MG-LLaVA) also get image_boxes [K, 5]: per request, per image, the detections
        in `boxes` (in the image's own pixels), else the model's detector's."""
        encoded, images, image_boxes = [], [], []
        for i, (request_images, messages) in enumerate(requests, start=first_index):
            request_images, messages = normalize_request(request_images, messages, i)
            loaded = [load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in request_images]
            images += loaded
            object_tokens = None
            if self.object_boxes is not None:
                given = (boxes[i - first_index] if boxes is not None else None) or [None] * len(loaded)
                per_image = [self.image_boxes(image, source, record, f"request {i}")
                             for image, source, record in zip(loaded, request_images, given)]
                image_boxes += per_image
                object_tokens = [len(b) for b in per_image]
            encoded.append(self.encode(messages, len(request_images), object_tokens=object_tokens))
        length = max(len(ids) for ids in encoded)
        pad = self.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded])
        device = self.model.device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if images:
            inputs["pixel_values"] = self.image_processor(images).to(device)
        if image_boxes:
            inputs["image_boxes"] = indexed(image_boxes).to(device)
        return inputs

    def image_boxes(self, image: Image.Image, source: ImageInput, record: BoxRecord | None = None,
                    where: str = "") -> torch.Tensor:
        """One image's boxes for a model with object tokens: [N, 4] in processed pixels, from `record` (detections
        in the image's pixels), else from the model's detector (kept per image file: eval asks many questions of one
        image)."""
        if record is None:
            path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
            record = self.object_boxes.record_of(None, image, path=path)
        return self.object_boxes.for_image(image, record, where=where)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def encode(self, messages: Sequence[dict], n_images: int, add_generation_prompt: bool = True,
               object_tokens: Sequence[int] | None = None) -> list[int]:
        """Prompt ids of one conversation, each <image> expanded to num_image_tokens image ids (plus, per image,
        `object_tokens` more: MG-LLaVA's one per box)."""
        config = self.model.config
        seq_lens = [config.num_image_tokens + extra for extra in (object_tokens or [0] * n_images)]
        return encode(messages, self.tokenizer, self.template, config.image_token_id,
                      seq_lens, add_generation_prompt=add_generation_prompt).input_ids

    def decode(self, ids: torch.Tensor) -> str:
        """New tokens -> answer: special tokens (EOS, padding) dropped, cut at the stop string, stripped."""
        return answer_text(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)

    def _generation_kwargs(self, inputs: dict, max_new_tokens: int, temperature: float, top_p: float,
                           extra: dict) -> dict:
        prompt_len = inputs["input_ids"].shape[1]
        context = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if context is not None:  # as LLaVA's worker: never ask for more than the context holds
            if prompt_len >= context:
                raise ValueError(f"prompt of {prompt_len} tokens exceeds the model's context of {context} tokens")
            max_new_tokens = min(max_new_tokens, context - prompt_len)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0.001,
                  "pad_token_id": self.pad_token_id, **self._stop_kwargs()}
        if kwargs["do_sample"]:
            kwargs.update(temperature=temperature, top_p=top_p)
        return {**kwargs, **extra}

    def _stop_kwargs(self) -> dict:
        """EOS ids (the tokenizer's, plus the stop string when it is a single token) and, for a stop string that
        is ordinary text (plain's "\\n"), transformers' stop_strings, which also catch it inside a longer token."""
        eos = [self.tokenizer.eos_token_id]
        if not self.stop:
            return {"eos_token_id": eos}
        stop_ids = self.tokenizer.encode(self.stop, add_special_tokens=False)
        if len(stop_ids) == 1 and stop_ids[0] not in eos:
            eos.append(stop_ids[0])
        if self.stop in {t.content for t in self.tokenizer.added_tokens_decoder.values()}:  # never merges
            return {"eos_token_id": eos}
        return {"eos_token_id": eos, "stop_strings": [self.stop], "tokenizer": self.tokenizer}

    # ---- chat ----------------------------------------------------------------------------------------

    def chat(self, image: ImageInput | None, question: str, history: list[dict] | None = None, stream: bool = False,
             max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, strategy: str = "plain",
             **gen_kwargs) -> str | Iterator[str]:
        """One turn about `image`. `history` (a list of messages, start with []) is extended in place with the
        question and the answer; pass it back for the next turn. The image is put in the first user turn only
        and is re-encoded every turn, as in LLaVA's CLI.

        stream=False: the answer. stream=True: an iterator of text pieces (generation runs in a thread);
        their concatenation is the answer, and `history` is extended once the iterator is exhausted.
        strategy="dualfocus" answers one question about the image (an empty history), greedily, not streamed.
        """
        history = [] if history is None else history
        if strategy != "plain" and (history or stream or image is None):
            raise ValueError(f"strategy {strategy!r} answers a single question about an image: no history, no stream")
        user = {"role": "user", "content": question}
        if image is not None and not any(m["role"] == "user" for m in history):
            user["content"] = IMAGE_TOKEN + "\n" + question
        messages = [*history, user]
        images = [] if image is None else [image]
        if stream:  # prepared here, so that a bad image fails at the call rather than at the first piece
            inputs = self.prepare([(images, messages)])
            kwargs = self._generation_kwargs(inputs, max_new_tokens, temperature, top_p, gen_kwargs)
            return self._stream(inputs, kwargs, user, history)
        answer = self.generate([(images, messages)], max_new_tokens, temperature, top_p, strategy=strategy,
                               **gen_kwargs)[0]
        history += [user, {"role": "assistant", "content": answer}]
        return answer

    def _stream(self, inputs: dict, kwargs: dict, user: dict, history: list[dict]) -> Iterator[str]:
        # The streamer decodes as `decode` does, so the pieces add up to the non-streamed answer.
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        pieces = []
        for piece in until_stop(generate_in_thread(self.model, streamer, {**inputs, **kwargs}), self.stop):
            pieces.append(piece)
            yield piece
        history += [user, {"role": "assistant", "content": "".join(pieces)}]


# ---- loading ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    path = require_local(path, "model")  # never a hub lookup for a missing directory
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: cannot load a tokenizer from this directory ({e})") from e


def load_image_processor(path: str | os.PathLike | None, config) -> ImageProcessor:
    """The directory's preprocessor_config.json, else one built from the model config (tower input size, the
    config's aspect ratio; SigLIP's 0.5 mean/std for SigLIP towers, CLIP's otherwise)."""
    if path and (Path(path) / CONFIG_NAME).is_file():
        return ImageProcessor.from_pretrained(path)
    vision = config.vision_config
    norm = {"image_mean": SIGLIP_MEAN_STD, "image_std": SIGLIP_MEAN_STD} if "siglip" in vision.model_type else {}
    return ImageProcessor(image_size=config.image_input_size, aspect_ratio=config.image_aspect_ratio, **norm)


def resolve_template(template, tokenizer) -> Template | TokenizerTemplate:
    """A template name (default "auto": the tokenizer's chat_template) or template object."""
    if template is None or isinstance(template, str):
        name = template or "auto"
        if name in AUTO_NAMES and not getattr(tokenizer, "chat_template", None):
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise TemplateError(f"{where}: the tokenizer has no chat_template; pass a template name "
                                f"({', '.join(TEMPLATES)})")
        return get_template(name, tokenizer)
    return template


def stop_string(template: Template | TokenizerTemplate) -> str:
    """What closes a reply: Template.stop, or for a tokenizer's chat_template, the supervised text after a
    probe reply (the same rule: the end token, stripped of surrounding whitespace)."""
    if isinstance(template, Template):
        return template.stop
    probe = "PROBE"
    segments = template.segments([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    reply = "".join(text for text, supervised in segments if supervised)
    after = reply.split(probe, 1)[1] if probe in reply else ""
    return after.strip() or after


# ---- streaming -------------------------------------------------------------------------------------------


def generate_in_thread(model, streamer: TextIteratorStreamer, kwargs: dict) -> Iterator[str]:
    """Run model.generate in a thread and yield the streamer's text; an error in the thread is re-raised here
    (after ending the stream, so the loop never waits on a queue that nothing will fill)."""
    errors = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**kwargs, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


