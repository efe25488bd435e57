"""Do VW-LMM's visual words name what a patch shows? One JSON line per trained model.

Over the patches of synthworld's held-out scenes whose centre lies in an object's box, the fraction whose argmax
visual word is the object's shape, its colour, or either (`patch_word_agreement`). Next to it, chance as a model
that ignores the image could reach it: the best single word said on every patch. And how peaked the visual words
are: the mean entropy of a patch's distribution (log V when uniform) and how many different argmax words the
scenes' patches get.

    python bench/visual_word_agreement.py --data polyfocus_demo/data --split test \
        --model runs/science/runs/vw_lmm-visual_words-seed0/stage2 ...
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from polyfocus.checkpoints import load_model
from polyfocus.infer.pipeline import load_image_processor, load_tokenizer
from polyfocus.model.visual_words import patch_boxes
from polyfocus.synthworld.scenes import COLOURS, SHAPES, Scene, read_scenes, render
from polyfocus.synthworld.scorer import patch_word_agreement, word_agreement_counts

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


@torch.no_grad()
def word_statistics(model, image_processor, scenes: list[Scene]) -> dict[str, float]:
    """Mean entropy (nats) of the patches' visual-word distributions, against log V, and the distinct argmax words."""
    entropies, argmax = [], set()
    for scene in scenes:
        features = model.get_image_features(image_processor([render(scene)]).to(model.device))  # [1, N, D]
        logp = model.vm_head(features).float().log_softmax(-1)  # [1, N, V]
        entropies.append(-(logp.exp() * logp).sum(-1).mean().item())
        argmax.update(logp.argmax(-1).flatten().tolist())
    vocab = model.vm_head.out_features
    return {"entropy": round(sum(entropies) / len(entropies), 3), "log_vocab": round(math.log(vocab), 3),
            "distinct_argmax_words": len(argmax)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="trained model directories with a visual-word head")
    p.add_argument("--data", required=True, help="a synthworld export (scenes.jsonl)")
    p.add_argument("--split", default="test")
    p.add_argument("--scenes", type=int, default=100, help="at most this many scenes of the split")
    args = p.parse_args(argv)

    scenes = read_scenes(args.data, args.split)[: args.scenes]
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
                          "best_constant_word": {a: round(v, 4) for a, v in chance.items()},
                          **word_statistics(model, processor, scenes)}), flush=True)


if __name__ == "__main__":
    main()
