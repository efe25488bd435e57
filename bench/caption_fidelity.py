"""How close are pretraining captions to the scenes' true dense captions? One JSON line per captions file.

synthworld knows the truth: each pretraining scene's dense caption (pretrain.json). For the captions of the same
images (DenseFusion's engine output, the short alt-text captions, any LLaVA/DenseFusion captioning file), matched by
image path: the fraction identical to the truth, the bag-of-words F1, the fraction of the truth's sentences said
word for word, the object F1 of synthworld's caption scorer (the colour+shape kinds named, and the label codes
quoted), the same F1 over the kinds alone, and the mean length in words. --exclude drops images
(e.g. those the caption engine was trained on).

    python bench/caption_fidelity.py --truth runs/science/shared/112-3000-2000-100-3/data/pretrain.json \
        --captions $S/densefusion/captions/captions.jsonl $S/densefusion/short_captions.json \
        --exclude $S/densefusion/meta/captions.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter

from polyfocus.data.formats import load_samples
from polyfocus.synthworld.scorer import caption_score, mentions


def captions_by_image(path: str) -> dict[str, str]:
    """{image path: the sample's last reply} of a captioning file."""
    return {s.images[0]: s.messages[-1]["content"] for s in load_samples(path) if s.images}


def words(text: str) -> Counter:
    return Counter(re.findall(r"[a-z0-9]+", text.lower()))


def sentences(text: str) -> set[str]:
    return {s.strip() for s in text.split(".") if s.strip()}


def word_f1(truth: str, caption: str) -> float:
    t, c = words(truth), words(caption)
    return 2 * sum((t & c).values()) / (sum(t.values()) + sum(c.values()))


def kind_f1(truth: str, caption: str) -> float:
    """F1 over the 'colour shape' kinds two captions name, label codes left out (a kind has a space, a code none)."""
    t, c = ({m for m in mentions(text) if " " in m} for text in (truth, caption))
    return 2 * len(t & c) / (len(t) + len(c)) if t or c else 1.0


def fidelity(truth: dict[str, str], captions: dict[str, str]) -> dict[str, float]:
    pairs = [(truth[image], caption) for image, caption in captions.items() if image in truth]
    if not pairs:
        raise ValueError("no captioned image is among the truth's images (they are matched by image path)")
    return {"images": len(pairs),
            "identical": round(statistics.mean(float(t == c) for t, c in pairs), 4),
            "word_f1": round(statistics.mean(word_f1(t, c) for t, c in pairs), 4),
            "sentences_recalled": round(statistics.mean(len(sentences(t) & sentences(c)) / len(sentences(t))
                                                        for t, c in pairs), 4),
            "object_f1": round(statistics.mean(caption_score(t, c) for t, c in pairs), 4),
            "kind_f1": round(statistics.mean(kind_f1(t, c) for t, c in pairs), 4),
            "words": round(statistics.mean(sum(words(c).values()) for _, c in pairs), 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True, help="the true dense captions (synthworld's pretrain.json)")
    p.add_argument("--captions", nargs="+", required=True)
    p.add_argument("--exclude", nargs="*", default=[], help="captioning files whose images are left out")
    args = p.parse_args(argv)

    truth = captions_by_image(args.truth)
    excluded = {image for path in args.exclude for image in captions_by_image(path)}
    truth = {image: text for image, text in truth.items() if image not in excluded}
    for path in args.captions:
        print(json.dumps({"bench": "caption_fidelity", "captions": path, "excluded": len(excluded),
                          **fidelity(truth, captions_by_image(path))}), flush=True)


if __name__ == "__main__":
    main()
