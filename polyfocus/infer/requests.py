"""A generation request as chat, eval, DualFocus and the server pass it around: (images, messages)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image

from polyfocus.data.templates import IMAGE_TOKEN

ImageInput = str | os.PathLike | Image.Image
# A request: (images, messages). messages is a chat ([{"role", "content"}, ...] with one "<image>" per image)
# or a plain question string, to which the images are prepended as "<image>\n" when it names none.
Request = tuple[Sequence[ImageInput] | ImageInput | None, Sequence[dict] | str]


def normalize_request(images, messages, index: int) -> tuple[list[ImageInput], list[dict]]:
    """(images, messages) with images as a list and messages as a chat; the <image> count must match."""
    if images is None:
        images = []
    elif isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    images = list(images)
    if isinstance(messages, str):
        content = messages if IMAGE_TOKEN in messages else (IMAGE_TOKEN + "\n") * len(images) + messages
        messages = [{"role": "user", "content": content}]
    n_tags = sum(m.get("content", "").count(IMAGE_TOKEN) for m in messages if isinstance(m, dict))
    if n_tags != len(images):
        names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__}>" for x in images]
        raise ValueError(f"request {index}: the messages hold {n_tags} {IMAGE_TOKEN} tag(s) but {len(images)} "
                         f"image(s) were given {names}")
    return images, list(messages)
