"""Annotation files: LLaVA JSON and OpenAI/LLaMA-Factory `messages`, read into one canonical `Sample`.

LLaVA (a JSON list, or JSONL):
    {"id": "0001", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"],        # optional; text-only samples have none
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
     ...any other fields}
messages (LLaMA-Factory / TRL / OpenAI style):
    {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
     "images": ["coco/1.jpg"], ...any other fields}
DenseFusion-1M's release (and polyfocus densefusion's output), read as one captioning turn (docs/densefusion.md):
    {"image_id": "1002078010534", "url": "...", "caption": "...", "image_path": "DenseFusion-1M/000045/....png"}
    -> user "<image>\\n" + DENSE_CAPTION_PROMPT, assistant the caption; the image is `image` (the reference
    downloader's local file) if present, else `image_path`.

The format is detected per record ("conversations" vs "messages" vs "caption"). Every other field (record level
and turn level) is kept verbatim, so llava -> messages -> llava gives back the input exactly. Records without an
`id` are named by their position ("record #3" in a JSON list, "line 4" in JSONL) in error messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

from polyfocus.data.files import write_atomic

ROLES = ("system", "user", "assistant")
LLAVA_TO_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
ROLE_TO_LLAVA = {v: k for k, v in LLAVA_TO_ROLE.items()}
TURN_KEYS = ("from", "value", "role", "content")
# Written to a messages record only when a LLaVA record held its `image` as a list of 0 or 1 paths (a plain
# string is the usual form); without it the round trip could not tell ["a.jpg"] from "a.jpg".
IMAGE_LIST_KEY = "llava_image_list"
# The user turn of a DenseFusion record (the release has captions only). Stages 1-2 train with the plain template,
# which drops the user's text, so the wording only matters under a chat template.
DENSE_CAPTION_PROMPT = "Describe this image in detail."


class DataError(ValueError):
    """Bad input data. The message names the file and the sample; `reason` is a short key for skip counters."""

    def __init__(self, message: str, reason: str = "bad_record", sample: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.sample = sample


@dataclass
class Sample:
    id: str | int | None
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str, ...other turn fields}]
    images: list[str] = field(default_factory=list)  # relative to the image root, in <image> order
    extra: dict = field(default_factory=dict)  # every other record field, verbatim
    image_as_list: bool = False  # LLaVA `image` was a list although it held fewer than 2 paths
    where: str = field(default="", compare=False)  # position in its file, to name id-less records

    @property
    def name(self) -> str:
        """How error messages refer to this sample."""
        return f"id {self.id!r}" if self.id is not None else (self.where or "record without id")


# ---- record <-> Sample -------------------------------------------------------------------------------------


def _turns(turns, role_key: str, text_key: str, to_role: dict, name: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"sample {name}: conversation must be a non-empty list, got {turns!r:.80}", sample=name)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"sample {name}: turn {i} is not an object: {turn!r:.80}", sample=name)
        role, text = turn.get(role_key), turn.get(text_key)
        if role not in to_role:
            raise DataError(
                f"sample {name}: turn {i} has unknown {role_key} {role!r} (expected one of {sorted(to_role)})",
                sample=name,
            )
        if not isinstance(text, str):
            raise DataError(f"sample {name}: turn {i} {text_key!r} must be a string, got {text!r:.80}", sample=name)
        other = {k: v for k, v in turn.items() if k not in (role_key, text_key)}
        clash = [k for k in other if k in TURN_KEYS]
        if clash:
            raise DataError(f"sample {name}: turn {i} mixes {role_key!r}/{text_key!r} with {clash}", sample=name)
        messages.append({"role": to_role[role], "content": text, **other})
    return messages


def _paths(value, key: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise DataError(f"sample {name}: {key!r} must be a string or a list of strings, got {value!r:.80}", sample=name)
    return value


def sample_from_record(record: dict, where: str = "") -> Sample:
    """Parse one LLaVA or messages record. Raises DataError naming the sample (not the file; see load_samples)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}", sample=where)
    record = dict(record)
    sample_id = record.pop("id", None)
    name = f"id {sample_id!r}" if sample_id is not None else where
    if "conversations" in record:
        messages = _turns(record.pop("conversations"), "from", "value", LLAVA_TO_ROLE, name)
        image = record.pop("image", None)
        image_as_list = isinstance(image, list) and len(image) < 2
        images = [] if image is None else [image] if isinstance(image, str) else _paths(image, "image", name)
    elif "messages" in record:
        messages = _turns(record.pop("messages"), "role", "content", {r: r for r in ROLES}, name)
        images = _paths(record.pop("images", []), "images", name)
        image_as_list = bool(record.pop(IMAGE_LIST_KEY, False))
    elif "caption" in record and ("image" in record or "image_path" in record):  # DenseFusion's jsonl
        caption = record.pop("caption")
        image = record.pop("image") if "image" in record else record.pop("image_path")
        for field_name, value in (("caption", caption), ("image", image)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"sample {name}: {field_name!r} must be a non-empty string, got {value!r:.80}",
                                sample=name)
        messages = [{"role": "user", "content": "<image>\n" + DENSE_CAPTION_PROMPT},
                    {"role": "assistant", "content": caption}]
        images, image_as_list = [image], False
    else:
        raise DataError(f"sample {name}: no 'conversations' (LLaVA), 'messages' or 'caption' + 'image_path' "
                        "(DenseFusion) field", sample=name)
    return Sample(sample_id, messages, list(images), record, image_as_list, where)


LLAVA_KEYS = ("id", "image", "conversations")
MESSAGES_KEYS = ("id", "messages", "images", IMAGE_LIST_KEY)


def _record(sample: Sample, fields: dict, reserved: tuple[str, ...]) -> dict:
    # An extra field named like one of the format's own would be read back as that field: refuse it.
    clash = [k for k in reserved if k in sample.extra]
    if clash:
        raise DataError(f"sample {sample.name}: extra field(s) {clash} clash with the output format",
                        sample=sample.name)
    head = {} if sample.id is None else {"id": sample.id}
    return {**head, **fields, **sample.extra}


def to_llava(sample: Sample) -> dict:
    fields = {}
    if len(sample.images) == 1 and not sample.image_as_list:
        fields["image"] = sample.images[0]
    elif sample.images or sample.image_as_list:
        fields["image"] = list(sample.images)
    fields["conversations"] = [
        {"from": ROLE_TO_LLAVA[m["role"]], "value": m["content"], **{k: m[k] for k in m if k not in ("role", "content")}}
        for m in sample.messages
    ]
    return _record(sample, fields, LLAVA_KEYS)


def to_messages(sample: Sample) -> dict:
    fields = {"messages": [dict(m) for m in sample.messages]}
    if sample.images or sample.image_as_list:
        fields["images"] = list(sample.images)
    if sample.image_as_list and len(sample.images) < 2:
        fields[IMAGE_LIST_KEY] = True
    return _record(sample, fields, MESSAGES_KEYS)


# ---- files -------------------------------------------------------------------------------------------------


def read_records(path: str, on_error: Callable[[DataError], None] | None) -> list[tuple[str, object]]:
    """(where, record) pairs from a JSON list or a JSONL file, told apart by the first non-blank character."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    head = text.lstrip()[:1]
    if not head:
        return []
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A broken JSON list cannot be resynchronised: no sample can be trusted, so this always raises.
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}", reason="malformed_json") from None
        return [(f"record #{i}", r) for i, r in enumerate(data)]

    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit raw inside a JSON string
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            if n == 1 and head == "{" and _is_json_object(text):
                raise DataError(f"{path}: top-level JSON object; expected a JSON list of records or JSONL") from None
            err = DataError(f"{path}:{n}: malformed JSON line (column {e.colno}): {e.msg}", "malformed_json",
                            sample=f"line {n}")
            if on_error is None:
                raise err from None
            on_error(err)
    return records


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def load_samples(path: str | os.PathLike, on_error: Callable[[DataError], None] | None = None) -> list[Sample]:
    """Read a LLaVA / messages file (JSON list or JSONL; formats may be mixed per record).

    Errors name the file and the sample. Without `on_error` the first one raises; with it, each bad record
    (or malformed JSONL line) is passed to `on_error` and left out. A malformed JSON list always raises.
    """
    path = os.fspath(path)
    samples = []
    for where, record in read_records(path, on_error):
        try:
            samples.append(sample_from_record(record, where))
        except DataError as e:
            err = DataError(f"{path}: {e}", e.reason, e.sample)
            if on_error is None:
                raise err from None
            on_error(err)
    return samples


def save_samples(samples: list[Sample], path: str | os.PathLike, to: str = "llava") -> None:
    """Write `samples` as LLaVA or messages records: JSONL if `path` ends in .jsonl, else a JSON list."""
    convert = {"llava": to_llava, "messages": to_messages}.get(to)
    if convert is None:
        raise ValueError(f"to must be 'llava' or 'messages', got {to!r}")
    records = [convert(s) for s in samples]
    if os.fspath(path).endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    write_atomic(path, text)  # never leave a half-written annotation file behind


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str = "llava") -> int:
    """Convert an annotation file to LLaVA or messages format (JSON or JSONL by `dst`'s suffix). Returns the count."""
    samples = load_samples(src)
    save_samples(samples, dst, to)
    return len(samples)
