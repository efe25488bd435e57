"""Conversation templates: chat messages -> prompt string -> (input_ids, labels).

Messages are ``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` with literal
``"<image>"`` placeholders in user content. A leading system message replaces the template's default
system prompt; after it, roles alternate user / assistant, starting with user.

Each template renders a conversation as a sequence of ``(text, supervised)`` segments
(``Template.segments``). ``render`` joins them; ``encode`` tokenizes them **piecewise** (spec
llava_base.md §2.1): every segment is tokenized on its own and the ids are concatenated, so the labels
are exact by construction. LLaVA instead tokenizes the whole prompt and re-derives the answer spans
by per-round length arithmetic, which silently zeroes a sample when the arithmetic is off by one
(ecosystem.md §2 item 4). Each ``<image>`` becomes ``image_seq_lens[i]`` copies of ``image_token_id``
(HF-style placeholders; the model scatters the image features into them).

Piecewise tokenization equals whole-string tokenization when every segment boundary is also a
pre-tokenizer split. The templates put their boundaries where that holds for our byte-level BPE
(``polyfocus.data.tokenizer``, which isolates newlines): a reply segment starts after ``:``/``]``
with its own leading space (vicuna ``ASSISTANT:`` | `` A cat.</s>``), after a newline
(ChatML, Llama-3, Phi-3) or after a special token, and it ends with a special end token.

Choices (record in docs):
- ``chatml`` is the Qwen/Yi family's own format: ``<|im_start|>role\\n...<|im_end|>\\n``, with a
  newline after every ``<|im_end|>`` (not supervised); default system "You are a helpful assistant.".
  ``chatml_direct`` (alias ``mistral_direct``) and ``mpt`` keep LLaVA's exact MPT-style strings, which
  have **no** newline after ``<|im_end|>``.
- ``llama3`` and ``phi3`` follow the models' published chat formats but render content verbatim
  (Llama-3's template ``trim``s it; we never alter the data). ``llama3`` uses the LLaVA vision-assistant
  system prompt (as LLaVA-NeXT's llama-3 template does [unverified]); ``phi3`` has no default system
  prompt and its tokenizer family adds no BOS [unverified: Phi-3 revisions differ].
- A system prompt that is empty is not rendered at all (LLaVA would still emit the separator).
- The BOS is not part of the rendered string (as in LLaVA's ``get_prompt``); ``encode`` prepends it
  exactly when the tokenizer itself adds one to plain text, unless the rendered string already starts
  with it (HF chat templates that write ``{{ bos_token }}``).
- Bad input raises ``TemplateError`` where LLaVA skips or zeroes the sample silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from polyfocus.config import IGNORE_INDEX  # one definition, shared with the model

IMAGE_TOKEN = "<image>"

# The anchor put in front of a piece for tokenizers with a SentencePiece "dummy prefix", see _tokenize.
_ANCHOR = "\n"


class TemplateError(ValueError):
    """A conversation that a template cannot render or encode (the message says which and why)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised


Segment = tuple[str, bool]  # (text, supervised)


@dataclass(frozen=True)
class Template:
    """A conversation format. ``{system}`` / ``{content}`` mark where the text goes in each format."""

    name: str
    system: str = ""  # default system prompt; a leading system message replaces it
    system_format: str = "{system}"  # how a non-empty system prompt is rendered
    system_in_user: bool = False  # Llama-2: the rendered system prompt opens the first user message
    user_format: str = "{content}"
    first_user_format: str | None = None  # Llama-2: the first [INST] has no "<s>" (the BOS stands in)
    assistant_prompt: str = ""  # opens an assistant turn = the generation prompt; not supervised
    reply_format: str = "{content}"  # supervised: the reply and the end-of-turn token that closes it
    reply_suffix: str = ""  # after the end-of-turn token; not supervised (ChatML's "\n")
    images_only: bool = False  # plain (stage 1): the user text is replaced by its images
    bos: bool = True  # this model family's tokenizer prepends a BOS (build_tokenizer follows it)

    @property
    def stop(self) -> str:
        """The end-of-turn string that generation stops at ("</s>", "<|im_end|>", "\\n" for plain)."""
        after = self.reply_format.split("{content}")[1]
        return after.strip() or after

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> Iterator[Segment]:
        """The one rendering function: (text, supervised) pieces whose concatenation is the prompt."""
        system, turns = _check_messages(messages, add_generation_prompt, self.system)
        if self.images_only:
            _check_plain(turns)
            system = ""  # like LLaVA's preprocess_plain, stage 1 sees only image(s) + caption
        if system and not self.system_in_user:
            yield self.system_format.replace("{system}", system), False
        for i, message in enumerate(turns):
            content = message["content"]
            if message["role"] == "user":
                if self.images_only:
                    content = IMAGE_TOKEN * content.count(IMAGE_TOKEN)  # the instruction is dropped
                if i == 0 and system and self.system_in_user:
                    content = self.system_format.replace("{system}", system) + content
                fmt = self.first_user_format if i == 0 and self.first_user_format is not None else self.user_format
                yield fmt.replace("{content}", content), False
            else:
                yield self.assistant_prompt, False
                yield self.reply_format.replace("{content}", content), True
                yield self.reply_suffix, False
        if add_generation_prompt:
            yield self.assistant_prompt, False

    def to_jinja(self) -> str:
        """An HF ``chat_template`` rendering exactly what ``render`` renders (for the same messages).

        It also takes OpenAI-style list content (``[{"type": "image"}, {"type": "text", "text": ...}]``, what
        transformers' processors and vLLM pass): a message's images first, ``"<image>\\n"`` each, then its text
        parts joined by newlines, as the server (infer/server.py) and llava-hf's own templates lay them out."""
        q = _jinja_literal
        sys_pre, sys_post = self.system_format.split("{system}")
        user_pre, user_post = self.user_format.split("{content}")
        first_pre, first_post = (self.first_user_format or self.user_format).split("{content}")
        reply_pre, reply_post = self.reply_format.split("{content}")
        lines = [
            "{%- macro flat(content) -%}",
            "{%- if content is string -%}{{ content }}",
            "{%- else -%}{{ " + q(IMAGE_TOKEN + "\n")
            + " * (content | selectattr('type', 'in', ['image', 'image_url']) | list | length) }}"
            "{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') }}",
            "{%- endif -%}",
            "{%- endmacro -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = flat(messages[0]['content']) -%}{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            "{%- set system = " + q(self.system) + " -%}{%- set turns = messages -%}",
            "{%- endif -%}",
        ]
        if not self.system_in_user and not self.images_only:
            lines.append("{%- if system -%}{{ " + q(sys_pre) + " + system + " + q(sys_post) + " }}{%- endif -%}")
        lines += [
            "{%- for message in turns -%}",
            "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}",
            "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}",
            "{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
        ]
        if self.images_only:
            image = q(IMAGE_TOKEN)
            lines.append("{%- set content = " + image + " * flat(message['content']).count(" + image + ") -%}")
        else:
            lines.append("{%- set content = flat(message['content']) -%}")
        if self.system_in_user:
            lines.append(
                "{%- if loop.first and system -%}{%- set content = "
                + q(sys_pre) + " + system + " + q(sys_post) + " + content -%}{%- endif -%}"
            )
        lines += [
            "{%- if loop.first -%}{{ " + q(first_pre) + " + content + " + q(first_post) + " }}",
            "{%- else -%}{{ " + q(user_pre) + " + content + " + q(user_post) + " }}{%- endif -%}",
            "{%- else -%}",
            "{{ " + q(self.assistant_prompt + reply_pre) + " + flat(message['content']) + "
            + q(reply_post + self.reply_suffix) + " }}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{ " + q(self.assistant_prompt) + " }}{%- endif -%}",
        ]
        return "\n".join(lines)  # every tag trims the whitespace around it, so the newlines never render


def _jinja_literal(text: str) -> str:
    # Jinja decodes string literals with Python's unicode-escape, which reads JSON's escapes.
    return json.dumps(text)


_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_V1_SYSTEM = (  # LLaVA's CLI/run_llava default: "human" where the training template says "user"
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VISION_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
_LLAMA2_SYS = "<<SYS>>\n{system}\n<</SYS>>\n\n"


def _vicuna(name: str, system: str) -> Template:
    # LLaVA's SeparatorStyle.TWO: sep " ", sep2 "</s>"; the open turn renders "ASSISTANT:" and the
    # reply brings its own leading space, so "ASSISTANT:" | " A cat.</s>" splits where BPE does.
    return Template(name, system=system, system_format="{system} ", user_format="USER: {content} ",
                    assistant_prompt="ASSISTANT:", reply_format=" {content}</s>")


def _mpt(name: str, system: str) -> Template:
    # LLaVA's SeparatorStyle.MPT, exactly: no newline after <|im_end|>.
    return Template(name, system=system, system_format="<|im_start|>system\n{system}<|im_end|>",
                    user_format="<|im_start|>user\n{content}<|im_end|>", assistant_prompt="<|im_start|>assistant\n",
                    reply_format="{content}<|im_end|>", bos=False)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # Stage 1 (LLaVA's preprocess_plain): "<image>" + caption + "\n", caption + "\n" supervised, no EOS.
        Template("plain", reply_format="{content}\n", images_only=True),
        _vicuna("vicuna_v1", _V1_SYSTEM),
        _vicuna("llava_v1", _LLAVA_V1_SYSTEM),
        # LLaVA's SeparatorStyle.LLAMA_2 with sep "<s>", sep2 "</s>": every [INST] but the first is
        # preceded by "<s>" (LLaVA lstrips the first; the tokenizer's BOS takes its place), and the reply
        # is " answer </s>" (the space before </s> is supervised, as in LLaVA).
        Template("llava_llama_2", system=_VISION_SYSTEM, system_format=_LLAMA2_SYS, system_in_user=True,
                 user_format="<s>[INST] {content} [/INST]", first_user_format="[INST] {content} [/INST]",
                 reply_format=" {content} </s>"),
        # Same style with sep "" and no default system prompt, hence no <<SYS>> block.
        Template("mistral_instruct", system_format=_LLAMA2_SYS, system_in_user=True,
                 user_format="[INST] {content} [/INST]", reply_format=" {content} </s>"),
        Template("chatml", system="You are a helpful assistant.",
                 system_format="<|im_start|>system\n{system}<|im_end|>\n",
                 user_format="<|im_start|>user\n{content}<|im_end|>\n", assistant_prompt="<|im_start|>assistant\n",
                 reply_format="{content}<|im_end|>", reply_suffix="\n", bos=False),
        _mpt("chatml_direct", "Answer the questions."),
        _mpt("mpt", "A conversation between a user and an LLM-based AI assistant. "
                    "The assistant gives helpful and honest answers."),
        Template("llama3", system=_VISION_SYSTEM,
                 system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                 assistant_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
                 reply_format="{content}<|eot_id|>"),
        Template("phi3", system_format="<|system|>\n{system}<|end|>\n", user_format="<|user|>\n{content}<|end|>\n",
                 assistant_prompt="<|assistant|>\n", reply_format="{content}<|end|>", reply_suffix="\n", bos=False),
    ]
}
ALIASES = {"v1": "vicuna_v1", "v0_plain": "plain", "mistral_direct": "chatml_direct"}
AUTO_NAMES = ("auto", "tokenizer")  # use the tokenizer's own chat_template


@dataclass(frozen=True, eq=False)
class TokenizerTemplate:
    """Any HF LLM's own ``chat_template``, rendered with ``apply_chat_template``.

    Labels come from rendering prefixes: the reply to ``messages[:i]`` is what
    ``messages[:i + 1]`` adds to ``messages[:i]`` rendered with the generation prompt. Whitespace that
    follows the reply's final special token (ChatML's "\\n" after ``<|im_end|>``) is not supervised,
    matching the built-in templates.
    """

    tokenizer: Any
    chat_template: str | None = None  # None: the tokenizer's own
    name: str = "tokenizer"

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> Iterator[Segment]:
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(f"{type(self.tokenizer).__name__} has no chat_template; name a built-in template "
                                f"({', '.join(TEMPLATES)})")
        _check_messages(messages, add_generation_prompt, "")
        messages = [dict(m) for m in messages]
        head = 1 if messages[0]["role"] == "system" else 0
        special = [t.content for t in self.tokenizer.added_tokens_decoder.values()]
        done = ""  # the text yielded so far
        for i in range(head, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"chat template of {self.tokenizer.name_or_path or type(self.tokenizer).__name__!r} renders "
                    f"message {i} differently depending on what follows it, so replies cannot be located by "
                    "prefix rendering; use a built-in template")
            reply = full[len(prompt):]
            body = reply.rstrip()
            if body != reply and not any(body.endswith(s) for s in special):
                body = reply
            yield prompt[len(done):], False
            yield body, True
            yield reply[len(body):], False
            done = full
        final = self._render(messages, add_generation_prompt)
        if not final.startswith(done):
            raise TemplateError("chat template renders the conversation differently from its prefixes")
        yield final[len(done):], False


def get_template(name: str, tokenizer: Any = None) -> Template | TokenizerTemplate:
    """A built-in template by name (or alias); "auto"/"tokenizer" wraps ``tokenizer.chat_template``."""
    if name in AUTO_NAMES:
        if tokenizer is None:
            raise TemplateError(f"template {name!r} uses the tokenizer's chat_template: pass tokenizer=")
        return TokenizerTemplate(tokenizer)
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = sorted([*TEMPLATES, *ALIASES, *AUTO_NAMES])
        raise TemplateError(f"unknown conversation template {name!r}; known: {', '.join(known)}")
    return TEMPLATES[key]


def template_from_tokenizer(tokenizer: Any, chat_template: str | None = None) -> TokenizerTemplate:
    """A template that renders with ``tokenizer.apply_chat_template`` (any HF LLM; ecosystem.md §2 #15)."""
    return TokenizerTemplate(tokenizer, chat_template)


def render(messages: Sequence[dict], template: str | Template | TokenizerTemplate,
           add_generation_prompt: bool = False, tokenizer: Any = None) -> str:
    """The full prompt string, with literal "<image>" placeholders and without the BOS."""
    template = _resolve(template, tokenizer)
    return "".join(text for text, _ in template.segments(messages, add_generation_prompt))


def encode(messages: Sequence[dict], tokenizer: Any, template: str | Template | TokenizerTemplate,
           image_token_id: int, image_seq_lens: Sequence[int] = (), add_generation_prompt: bool = False) -> Encoded:
    """Token ids and labels of a conversation; only the replies and their end tokens are supervised.

    The i-th ``<image>`` (in order of appearance) becomes ``image_seq_lens[i]`` copies of
    ``image_token_id``, never supervised.
    """
    template = _resolve(template, tokenizer)
    segments = list(template.segments(messages, add_generation_prompt))
    # Split into text pieces and images (None). Adjacent segments with the same supervision are
    # joined first, so that pieces break only where supervision changes or at an image.
    pieces: list[tuple[str | None, bool]] = []
    for text, supervised in _join_alike(segments):
        for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if j:
                pieces.append((None, False))
            if chunk:
                pieces.append((chunk, supervised))
    n_images = sum(text is None for text, _ in pieces)
    if n_images != len(image_seq_lens):
        raise TemplateError(f"conversation has {n_images} {IMAGE_TOKEN} placeholder(s) but "
                            f"{len(image_seq_lens)} image sequence length(s) were given")
    if any(not isinstance(n, int) or n < 1 for n in image_seq_lens):
        raise TemplateError(f"image sequence lengths must be positive ints, got {list(image_seq_lens)}")

    texts = [text for text, _ in pieces if text is not None]
    at_start = bool(pieces) and pieces[0][0] is not None
    token_lists = iter(_tokenize(tokenizer, texts, at_start))
    input_ids: list[int] = []
    labels: list[int] = []
    bos = _bos_id(tokenizer)
    if bos is not None and not "".join(t for t, _ in segments).startswith(tokenizer.bos_token):
        input_ids.append(bos)
        labels.append(IGNORE_INDEX)
    images = iter(image_seq_lens)
    for text, supervised in pieces:
        ids = [image_token_id] * next(images) if text is None else next(token_lists)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return Encoded(input_ids, labels)


def move_image_to_front(messages: Sequence[dict]) -> list[dict]:
    """LLaVA's ``preprocess_multimodal``: "question\\n<image>" -> "<image>\\nquestion" in every message.

    Returns new dicts. Unlike LLaVA, which re-adds a single "<image>" however many it removed, every
    image is kept ("<image>\\n" once per image), so multi-image samples lose nothing.
    """
    out = []
    for message in messages:
        content = message["content"]
        n = content.count(IMAGE_TOKEN)
        if n:
            content = ((IMAGE_TOKEN + "\n") * n + content.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append({**message, "content": content})
    return out


# ----------------------------------------------------------------------------- helpers


def _resolve(template, tokenizer) -> Template | TokenizerTemplate:
    return get_template(template, tokenizer) if isinstance(template, str) else template


def _check_messages(messages: Sequence[dict], add_generation_prompt: bool, default_system: str):
    """Validate the canonical format; return (system prompt, turns after the system message)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise TemplateError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise TemplateError(f"message {i}: expected {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                                f"got {m!r}")
    offset = 1 if messages[0]["role"] == "system" else 0
    system = messages[0]["content"] if offset else default_system
    turns = list(messages[offset:])
    if not turns:
        raise TemplateError("conversation has no user message")
    for i, m in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if m["role"] != expected:
            raise TemplateError(f"message {i + offset}: expected role {expected!r}, got {m['role']!r}; roles must "
                                "alternate user/assistant after an optional leading system message")
        if m["role"] == "assistant" and IMAGE_TOKEN in m["content"]:
            raise TemplateError(f"message {i + offset}: {IMAGE_TOKEN} in an assistant reply; images go in user "
                                "messages")
    if offset and IMAGE_TOKEN in system:
        raise TemplateError(f"message 0: {IMAGE_TOKEN} in the system message; images go in user messages")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise TemplateError("add_generation_prompt needs a conversation that ends with a user message, "
                            f"this one ends with {turns[-1]['role']!r}")
    return system, turns


def _check_plain(turns: list[dict]):
    if len(turns) > 2:
        raise TemplateError(f"template 'plain' (stage-1 captioning) takes exactly one user + assistant pair, "
                            f"got {len(turns)} messages")
    if IMAGE_TOKEN not in turns[0]["content"]:
        raise TemplateError(f"template 'plain': the user message must contain {IMAGE_TOKEN} (the caption "
                            "is the only supervised text and the image its only input)")


def _join_alike(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for text, supervised in segments:
        if text and out and out[-1][1] == supervised:
            out[-1] = (out[-1][0] + text, supervised)
        elif text:
            out.append((text, supervised))
    return out


def _bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one to plain text (as LLaVA's tokenizer_image_token keeps)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _tokenize(tokenizer, texts: list[str], first_at_start: bool) -> list[list[int]]:
    """Token ids of each piece, as the piece tokenizes inside the full string.

    SentencePiece-style tokenizers (Llama, Mistral, Vicuna) add a "dummy prefix" "▁" to the start of
    the text: alone, " A cat." becomes [▁, ▁A, ▁cat, .] where in context it is [▁A, ▁cat, .].
    So each piece except the one at the start of the string is tokenized behind a fixed anchor ("\\n",
    a byte token that merges with nothing) and the anchor's tokens are dropped. The piece at the start
    keeps its dummy prefix, as in the whole string. Text right after a special token gets no "▁" either:
    this matches the non-legacy Llama tokenizers (legacy=False), not LLaVA's per-chunk quirk (§1.4).
    Byte-level BPE has no dummy prefix and is tokenized directly.
    """
    if not texts:
        return []

    def ids(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=False)["input_ids"]

    probe_a, probe_na, anchor = ids(["a", _ANCHOR + "a", _ANCHOR])
    if probe_na[: len(anchor)] == anchor and probe_na[len(anchor):] == probe_a:
        return ids(texts)  # context-free: no dummy prefix
    skip = 1 if first_at_start else 0
    anchored = ids([texts[0]] * skip + [_ANCHOR + t for t in texts[skip:]])
    out = anchored[:skip]
    for text, toks in zip(texts[skip:], anchored[skip:]):
        # If the anchor merged into the piece (a vocabulary with "\n" merges), fall back to the plain piece.
        out.append(toks[len(anchor):] if toks[: len(anchor)] == anchor else ids([text])[0])
    return out
