"""Where an answer ends: the text of generated tokens cut at the template's (or a request's) stop string and stripped,
the same way whether it is decoded whole (`answer_text`), streamed (`until_stop`), or streamed row by row inside a
server batch (`visible_text`), so that the streamed pieces always add up to the whole answer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


def answer_text(text: str, stop: str) -> str:
    """The decoded new tokens up to the stop string, stripped (as LLaVA's CLI strips its outputs)."""
    return (text[: text.index(stop)] if stop and stop in text else text).strip()


def until_stop(pieces: Iterable[str], stop: str) -> Iterator[str]:
    """Stream `answer_text("".join(pieces), stop)`: the text up to the first `stop`, without surrounding whitespace.
    A tail that may be the start of `stop` or trailing whitespace is held back until the next piece decides it.
    Pieces after the stop are still consumed, so the producer finishes."""
    held, started, stopped = "", False, False
    for piece in pieces:
        if stopped:
            continue
        held += piece
        if stop and stop in held:
            held, stopped, keep = held[: held.index(stop)].rstrip(), True, 0
        else:
            keep = prefix_overlap(held, stop)
            head = held[: len(held) - keep]
            keep += len(head) - len(head.rstrip())  # whitespace before it may turn out to be trailing
        if not started:  # leading whitespace is dropped
            held = held.lstrip()
            started = bool(held)
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep:]
    if held.strip() and not stopped:
        yield held.rstrip()


def visible_text(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """(the answer so far, whether a stop string was found). The answer is `text` up to the first stop string,
    stripped (`Pipeline.decode`'s rule). Unless `final`, a tail that may yet become a stop string, trailing
    whitespace and an incomplete character are held back, so every result is a prefix of the final one."""
    cuts = [text.index(s) for s in stops if s in text]
    if cuts:
        return text[: min(cuts)].strip(), True
    if not final:
        held = max((prefix_overlap(text, s) for s in stops), default=0)
        text = text[: len(text) - held].rstrip("\ufffd").rstrip()
    return text.strip(), False


def prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
