"""Do VW-LMM's visual words name what a patch shows? One JSON line per trained model.

Over the patches of synthworld's held-out scenes whose centre lies in an object's box, the fraction whose argmax
visual word is the object's shape, its colour, or either (`patch_word_agreement`). Next to it, chance as a model
that ignores the image could reach it: the best single word said on every patch.

    python bench/visual_word_agreement.py --data polyfocus_demo/data --split test \
        --model runs/science/runs/vw_lmm-visual_words-seed0/stage2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from polyfocus.data.synthworld import COLOURS, SHAPES, Scene
from polyfocus.infer.pipeline import load_image_processor, load_tokenizer
from polyfocus.model.convert import load_model
from polyfocus.model.visual_words import patch_boxes, patch_word_agreement, word_agreement_counts

ATTRIBUTES = ("either", "shape", "colour")


def best_constant_word(scenes: list[Scene], image_processor, side: int) -> dict[str, float]:
    """Per attribute, the agreement of the single word that does best when said on every patch."""
    best = {}
    for attribute in ATTRIBUTES:
        scores = []
        for word in (*SHAPES, *COLOURS):
            hits = total = 0
            for scene in scenes:
                boxes = patch_boxes((scene.image_size, scene.image_size), side, image_processor)
                h, t = word_agreement_counts(scene, [[word] * side] * side, boxes, attribute)
                hits, total = hits + h, total + t
            scores.append(hits / total if total else 0.0)
        best[attribute] = max(scores)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="trained model directories with a visual-word head")
    p.add_argument("--data", required=True, help="a synthworld export (scenes.jsonl)")
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", type=int, default=100, help="at most this many scenes of the split")
    args = p.parse_args(argv)

    records = [json.loads(line) for line in (Path(args.data) / "scenes.jsonl").read_text().splitlines()]
    scenes = [Scene.from_dict(r) for r in records if r.get("split") == args.split][: args.scenes]
    chance = None
    for model_dir in args.model:
        model = load_model(model_dir).eval()
        tokenizer, processor = load_tokenizer(model_dir), load_image_processor(model_dir, model.config)
        with torch.no_grad():
            agreement = {a: patch_word_agreement(model, tokenizer, processor, scenes, a) for a in ATTRIBUTES}
        if chance is None:
            side = model.config.vision_config.image_size // model.config.vision_config.patch_size
            chance = best_constant_word(scenes, processor, side)
        print(json.dumps({"bench": "visual_word_agreement", "model": model_dir, "scenes": len(scenes),
                          "agreement": {a: round(v, 4) for a, v in agreement.items()},
                          "best_constant_word": {a: round(v, 4) for a, v in chance.items()}}), flush=True)


if __name__ == "__main__":
    main()
