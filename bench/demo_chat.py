"""How the demo's model answers in a chat: questions asked as a user asks them (no answer-format instruction), on
fresh scenes at the demo's settings, as the first turn and as the second (after a first question answered with its
truth). One JSON line.

The questions are synthworld's chat family (`chat_task`: an object's colour or shape, the number of objects, whether
a kind of object is there, a description, something no picture can tell), so each has one templated answer.
Reported per turn: the share answered exactly, per kind of question and over all; for colour and shape questions, the
share whose answer is about the object the question names ("What colour is the circle?" → "The circle is ..." — the
phrase copied; a wrong colour still counts); for "Is there a square?", the share whose yes or no is right; and the
number of one-word replies (the blind model's "yes").

    python bench/demo_chat.py --model polyfocus_demo/stage2 [--scenes 200]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter
from pathlib import Path

from common import emit

from polyfocus.synthworld.tasks import CHAT_ASKS


def conversations(n: int, image_dir: Path, image_size: int | None = None) -> list[tuple[str, list, object]]:
    """Two chat questions per fresh scene: (image, messages, task) for the first asked alone and for the second asked
    after the first and its true answer. image_size: the scenes' pixels (default the demo's; a model that reads more
    through S2, `polyfocus demo --render-size 224`, gets them at its input size)."""
    from polyfocus.demo import DEFAULT_IMAGE_SIZE, DEMO_SIZES
    from polyfocus.synthworld.scenes import make_scene, render
    from polyfocus.synthworld.tasks import chat_task

    out = []
    for i in range(n):
        scene = make_scene(f"chat/{i}", image_size or DEFAULT_IMAGE_SIZE, 3, sizes=DEMO_SIZES)  # no demo split's names
        image = str(image_dir / f"{i}.png")
        render(scene).save(image)
        # The questions' own seed: one equal to the scene's would replay the draws that made the scene, and tie the
        # kind of question to the number of objects (colour and shape only ever asked of one-object scenes).
        rng, tasks = random.Random(f"chat/{i}/questions"), []
        while len(tasks) < 2:  # two different questions: a repeat's truth would already be in the conversation
            if (task := chat_task(scene, rng)) and all(task.question != t.question for t in tasks):
                tasks.append(task)
        first = [{"role": "user", "content": "<image>\n" + tasks[0].question}]
        out.append((image, first, tasks[0]))
        out.append((image, [*first, {"role": "assistant", "content": tasks[0].answer},
                            {"role": "user", "content": tasks[1].question}], tasks[1]))
    return out


def names_the_object(reply: str, truth: str) -> bool:
    """Whether a reply to a colour or shape question is about the object asked: "The circle is white." names "the
    circle"; a reply starting "The triangle is" does not."""
    subject = truth.lower().rsplit(" is ", 1)[0]
    return reply.strip().lower().startswith(subject + " is ")


def first_word(text: str) -> str:
    return text.strip().split(" ", 1)[0].strip(",.").lower()


def score(turns: list[int], tasks: list, replies: list[str]) -> dict:
    """Per turn: exact-match % per kind of question and over all, % of colour/shape replies naming the object asked,
    % of "Is there ...?" replies whose yes or no is right, and the count of one-word replies."""
    exact, asked, named, attribute, one_word, yes_no = Counter(), Counter(), Counter(), Counter(), Counter(), Counter()
    for turn, task, reply in zip(turns, tasks, replies):
        kind = task.meta["asks"]
        asked[turn, kind] += 1
        exact[turn, kind] += reply.strip().lower() == task.answer.lower()
        if kind in ("colour", "shape"):
            attribute[turn] += 1
            named[turn] += names_the_object(reply, task.answer)
        if kind == "exists":
            yes_no[turn] += first_word(reply) == first_word(task.answer)
        one_word[turn] += len(reply.split()) <= 1
    result = {}
    for turn in sorted({t for t, _ in asked}):
        kinds = [k for k in CHAT_ASKS if asked[turn, k]]
        result[f"turn{turn}"] = {
            "exact": {k: round(100 * exact[turn, k] / asked[turn, k], 1) for k in kinds},
            "exact_all": round(100 * sum(exact[turn, k] for k in kinds) / sum(asked[turn, k] for k in kinds), 1),
            "names_the_object": round(100 * named[turn] / attribute[turn], 1) if attribute[turn] else None,
            "exists_yes_no": round(100 * yes_no[turn] / asked[turn, "exists"], 1) if asked[turn, "exists"] else None,
            "one_word_replies": one_word[turn],
            "questions": sum(asked[turn, k] for k in kinds),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a demo checkpoint directory, e.g. polyfocus_demo/stage2")
    p.add_argument("--scenes", type=int, default=200)
    args = p.parse_args(argv)
    from polyfocus.infer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        asked = conversations(args.scenes, Path(tmp), pipe.model.config.image_input_size)
        replies = pipe.generate(
            [([image], messages) for image, messages, _ in asked], max_new_tokens=32, batch_size=32)
    turns = [1 + i % 2 for i in range(len(asked))]
    emit({"bench": "demo_chat", "model": args.model, "scenes": args.scenes,
          **score(turns, [task for _, _, task in asked], replies)})


if __name__ == "__main__":
    main()
