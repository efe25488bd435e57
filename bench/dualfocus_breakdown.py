"""Where a DualFocus model's answers come from on synthworld's held-out scenes. One JSON line per model.

Per family: the macro (plain) answer's accuracy, the micro answer's, the chosen one's; how often the two differ and
how often the micro answer is then chosen; the mean IoU between the predicted box and the question's evidence
box (the best-matching one when a question has several); how often the crop holds a whole evidence box, and the
crop's mean share of the image (a crop of the whole image holds everything and zooms into nothing); when the crop
misses the evidence, how often that happened, how often the micro answer was still chosen, and how often the chosen
answer was right. The figures behind docs/results.md's DualFocus section.

    python bench/dualfocus_breakdown.py --data runs/science/shared/112-3000-2000-100-3/data \
        --model runs/science/runs/dualfocus-dualfocus-seed0/stage2
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from polyfocus.data.dualfocus import parse_box_text
from polyfocus.data.formats import load_samples
from polyfocus.data.prompts import iou
from polyfocus.infer.dualfocus import DualFocus
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scorer import family_of, question_of, score


def holds(crop: tuple, box: tuple, width: int, height: int) -> bool:
    """Does the crop (pixels) hold the whole normalised box? Half a pixel of slack for the box's rounding."""
    x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    return crop[0] <= x1 + 0.5 and crop[1] <= y1 + 0.5 and x2 - 0.5 <= crop[2] and y2 - 0.5 <= crop[3]


def breakdown(samples, results, image_sizes) -> dict[str, dict]:
    """samples: synthworld test samples (with their evidence `boxes`); results: DualFocusResult per sample;
    image_sizes: (width, height) of each sample's image."""
    counts = defaultdict(Counter)
    for sample, result, (width, height) in zip(samples, results, image_sizes):
        c = counts[family_of(sample)]
        c["questions"] += 1
        c["macro"] += score(sample, result.macro)
        c["chosen"] += score(sample, result.answer)
        if result.micro is not None:
            c["zoomed"] += 1
            c["micro"] += score(sample, result.micro)
            differ = result.macro.strip().lower() != result.micro.strip().lower()
            c["differ"] += differ
            c["micro_chosen"] += differ and result.choice == "micro"
        box, evidence = parse_box_text(result.box_text or ""), sample.extra.get("boxes") or []
        if box and evidence:
            c["iou"] += max(iou(box, e) for e in evidence)
            c["boxes"] += 1
        if result.crop_box and evidence:
            c["crops"] += 1
            held = any(holds(result.crop_box, e, width, height) for e in evidence)
            c["held"] += held
            if not held:  # where the answer comes from when the zoom misses the evidence
                c["missed"] += 1
                c["missed_micro_chosen"] += result.choice == "micro"
                c["missed_right"] += score(sample, result.answer)
            x1, y1, x2, y2 = result.crop_box
            c["crop_area"] += (x2 - x1) * (y2 - y1) / (width * height)
    return {family: {"questions": c["questions"], "macro": round(c["macro"] / c["questions"], 4),
                     "micro": round(c["micro"] / c["zoomed"], 4) if c["zoomed"] else None,
                     "chosen": round(c["chosen"] / c["questions"], 4), "zoomed": c["zoomed"],
                     "differ": c["differ"], "micro_chosen_when_differ": c["micro_chosen"],
                     "box_iou": round(c["iou"] / c["boxes"], 4) if c["boxes"] else None,
                     "evidence_in_crop": round(c["held"] / c["crops"], 4) if c["crops"] else None,
                     "crop_area": round(c["crop_area"] / c["crops"], 4) if c["crops"] else None,
                     "crop_missed": c["missed"], "micro_chosen_when_missed": c["missed_micro_chosen"],
                     "chosen_right_when_missed": round(c["missed_right"] / c["missed"], 4) if c["missed"] else None}
            for family, c in counts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="DualFocus-trained model directories")
    p.add_argument("--data", required=True, help="a synthworld export (test.json, images/)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    data = Path(args.data)
    samples = load_samples(data / "test.json")
    requests = [([str(data / p) for p in s.images], question_of(s)) for s in samples]
    sizes = [Image.open(data / s.images[0]).size for s in samples]
    for model in args.model:
        results = DualFocus(Pipeline.from_pretrained(model)).answer(requests, max_new_tokens=8,
                                                                    batch_size=args.batch_size)
        print(json.dumps({"bench": "dualfocus_breakdown", "model": model,
                          "families": breakdown(samples, results, sizes)}), flush=True)


if __name__ == "__main__":
    main()
