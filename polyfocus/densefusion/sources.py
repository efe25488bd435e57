"""Where the engine's images come from: a folder of images, or a list of records (JSONL / JSON list: DenseFusion's
release format, our downloader's manifest, LLaVA / messages training files, img2dataset's metadata), or a text
file of URLs (one per line, optionally "URL<TAB>alt-text"; those must be downloaded first).

Per record: image_id = `image_id` | `id` | `key` (img2dataset) | the image path without suffix | a hash of the url;
image_path = `image` | `image_path` | `images[0]` (relative to the image root; `image` first, as the reference
downloader and ours set it next to the release's `image_path`); url = `url`; alt-text = the field
named by `alt_text_field` (default `alt_text`), else a LLaVA / messages record's first answer (a caption dataset's
caption). Ids must be unique: they name the output records and make a resumed run exact.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from polyfocus.data.formats import DataError, read_records
from polyfocus.experts.base import Item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def url_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def read_items(source: str | os.PathLike, alt_text_field: str = "alt_text",
               limit: int | None = None) -> list[Item]:
    """The items of a folder, record file or URL list, in a stable order (sorted paths; file order)."""
    source = Path(source)
    if source.is_dir():
        items = [Item(p.relative_to(source).with_suffix("").as_posix(), p.relative_to(source).as_posix())
                 for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif not source.is_file():
        raise FileNotFoundError(f"{source}: no such image folder or list")
    elif source.suffix == ".txt":
        items = [_url_item(line, source, n) for n, line in enumerate(source.read_text().splitlines(), 1)
                 if line.strip() and not line.startswith("#")]
    else:
        items = [_record_item(record, source, where, alt_text_field)
                 for where, record in read_records(str(source), None)]
    items = items[:limit] if limit is not None else items
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.image_id in seen:
            raise DataError(f"{source}: image_id {item.image_id!r} appears twice (items {seen[item.image_id]} and {i})")
        seen[item.image_id] = i
    return items


def _url_item(line: str, source: Path, n: int) -> Item:
    url, _, alt = line.strip().partition("\t")
    if not url.startswith(("http://", "https://")):
        raise DataError(f"{source}:{n}: not an http(s) URL: {url!r:.80}")
    return Item(url_id(url), url=url, alt_text=alt or None)


def _record_item(record, source: Path, where: str, alt_text_field: str) -> Item:
    if not isinstance(record, dict):
        raise DataError(f"{source}: {where}: a record must be a JSON object")
    image = record.get("image") or record.get("image_path") or (record.get("images") or [None])[0]
    if isinstance(image, list):
        image = image[0] if image else None
    url = record.get("url")
    if image is None and url is None:
        raise DataError(f"{source}: {where}: the record has no image (image_path / image / images) and no url")
    image_id = next((record[k] for k in ("image_id", "id", "key") if record.get(k) is not None), None)
    if image_id is None:
        image_id = Path(image).with_suffix("").as_posix() if image else url_id(url)
    alt = record.get(alt_text_field)
    if alt is None:
        alt = _first_answer(record)
    if alt is not None and not isinstance(alt, str):
        raise DataError(f"{source}: {where}: {alt_text_field!r} must be a string, got {alt!r:.80}")
    return Item(str(image_id), image, url, alt)


def _first_answer(record: dict) -> str | None:
    for key, role_key, text_key, role in (("conversations", "from", "value", "gpt"),
                                          ("messages", "role", "content", "assistant")):
        for turn in record.get(key) or []:
            if isinstance(turn, dict) and turn.get(role_key) == role and isinstance(turn.get(text_key), str):
                return turn[text_key]
    return None
