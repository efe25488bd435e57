"""Has a model learnt a question family, or does it answer from the question alone? One JSON line per model.

For each family, on held-out and on training questions: the accuracy, and the share of answers that equal the
model's most common answer to that question form (`modal_share`). A form is the choice a question offers ("above
or below", "to the left or to the right"; one form for every other question). A modal share of 1 means one fixed
answer per form, whatever the image: the answer prior. The same on training questions means the model underfits
the family rather than overfits it.

    python bench/answer_priors.py --data polyfocus_demo/data --families existence spatial \
        --model runs/science/runs/mg_llava-*-seed*/stage2
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from polyfocus.data.formats import load_samples
from polyfocus.infer.pipeline import Pipeline
from polyfocus.synthworld.scorer import question_of

FORMS = ("above or below", "to the left or to the right")


def question_form(question: str) -> str:
    return next((form for form in FORMS if form in question), "")


def modal_share(answers: list[str], forms: list[str]) -> float:
    """The share of answers equal to the most common answer among the questions of their form."""
    per_form = {}
    for answer, form in zip(answers, forms):
        per_form.setdefault(form, Counter())[answer] += 1
    return sum(counts.most_common(1)[0][1] for counts in per_form.values()) / len(answers)


def family_report(pipe, data: Path, samples, family: str, limit: int) -> dict:
    chosen = [s for s in samples if s.extra.get("family") == family][:limit]
    requests = [([str(data / p) for p in s.images], question_of(s)) for s in chosen]
    answers = [a.strip().lower() for a in pipe.generate(requests, max_new_tokens=8, batch_size=32)]
    truth = [s.messages[-1]["content"].strip().lower() for s in chosen]
    forms = [question_form(s.messages[0]["content"]) for s in chosen]
    return {"questions": len(chosen), "accuracy": round(sum(a == t for a, t in zip(answers, truth)) / len(chosen), 3),
            "modal_share": round(modal_share(answers, forms), 3), "top_answers": Counter(answers).most_common(3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="trained model directories")
    p.add_argument("--data", required=True, help="a synthworld export (train.json, test.json)")
    p.add_argument("--families", nargs="+", default=["existence", "spatial"])
    p.add_argument("--questions", type=int, default=100, help="at most this many per family and split")
    args = p.parse_args(argv)

    data = Path(args.data)
    splits = {split: load_samples(data / f"{split}.json") for split in ("test", "train")}
    for model_dir in args.model:
        pipe = Pipeline.from_pretrained(model_dir)
        report = {f"{split}_{family}": family_report(pipe, data, samples, family, args.questions)
                  for split, samples in splits.items() for family in args.families}
        print(json.dumps({"bench": "answer_priors", "model": model_dir, **report}), flush=True)


if __name__ == "__main__":
    main()
