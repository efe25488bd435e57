"""`--option KEY=VALUE` flags, shared by the verbs that take them (eval, densefusion)."""

from __future__ import annotations

import json


def option_value(text: str):
    """An option's value: JSON where it parses (true, 3, [1, 2], "x"), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str], flag: str, dotted: bool = False) -> dict:
    """["model=x", ...] -> {"model": "x"}, or with dotted names ["ocr.scale=3"] -> {"ocr": {"scale": 3}}; a pair
    that is not KEY=VALUE is a usage error naming the flag."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, dot, option = key.partition(".")
        if not sep or (dotted and not (dot and name and option)):
            raise SystemExit(f"{flag} {pair!r}: expected {'EXPERT.KEY' if dotted else 'KEY'}=VALUE")
        if dotted:
            options.setdefault(name, {})[option] = option_value(value)
        else:
            options[key] = option_value(value)
    return options
