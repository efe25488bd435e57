"""Questions about synthworld scenes: each task family turns a Scene into a question, an answer
and the evidence boxes a model has to look at.

Families (FAMILIES): colour, shape, count, existence (POPE), text (read the code), spatial,
mc (multiple choice A-D), grounding (box answer), caption (short), dense_caption, and chat: free-form questions
without the answer-format instruction, answered in a sentence, including "Is there a ...?" and questions the image
cannot answer ("I cannot tell from the image."), and facts (every object's colour and shape stated as the questions
name it: a stage-1 caption for experiments).

Prompts follow LLaVA-1.5: short-answer VQA ends with SHORT_ANSWER, multiple choice with
MC_ANSWER, grounding uses LLaVA's RefCOCO prompt and answers "[x1, y1, x2, y2]" normalised to
[0, 1] with two decimals (spec/dualfocus.md §2.1, the same text DualFocus parses). Answers are
lower case except codes; counts are digits.

Every question is unambiguous: an object is named by the shortest phrase of its size, colour and
shape that matches it alone in the scene ("the star", "the large red star"); when no such phrase
exists (or the family has nothing to ask) the family returns None for that scene.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import permutations

from polyfocus.data.prompts import MC_ANSWER, SHORT_ANSWER, box_text
from polyfocus.synthworld.scenes import COLOURS, SHAPES, Scene, SceneObject, make_scene

FAMILIES = ("colour", "shape", "count", "existence", "text", "spatial", "mc", "grounding",
            "caption", "dense_caption", "chat", "facts")
POPE_STRATEGIES = ("random", "popular", "adversarial")
KINDS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # every possible "red star"

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
)
DENSE_CAPTION_PROMPTS = (
    "Describe the image in detail.",
    "Describe every object in the image, with its attributes and where it is.",
    "Give a detailed description of the image, object by object.",
)
TOP_K = 3  # POPE draws popular / adversarial negatives from the top three candidates


@dataclass
class Task:
    family: str
    question: str     # the bare question
    prompt: str       # what the user says (question + answer-format instruction), without <image>
    answer: str
    boxes: list       # evidence boxes, normalised (x1, y1, x2, y2)
    meta: dict = field(default_factory=dict)  # family specifics: targets, options, strategy, ...


def make_task(scene: Scene, family: str, rng: random.Random | None = None,
              stats: WorldStats | None = None, balance: AnswerBalance | None = None,
              record: bool = True, exclude: Collection[str] = ()) -> Task | None:
    """One question of `family` about `scene`, or None if the scene offers no unambiguous one.
    Without rng the choice is seeded by (scene.seed, family), so it is reproducible. balance: the dataset's
    running answer balance (an export's), which picks the answer of the families whose answers are skewed; the task
    is recorded in it unless record is False (the caller records the tasks it keeps). exclude: answers of this
    family already asked of the scene (a family listed twice), which the balance does not pick again."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown synthworld family {family!r}; known: {list(FAMILIES)}")
    rng = rng or random.Random(f"{scene.seed}/{family}")
    wanted = balance.wanted(scene, family, exclude) if balance is not None else {}
    if family == "existence":
        task = existence_task(scene, rng, stats, **wanted)
    else:
        task = _BUILDERS[family](scene, rng, **wanted)
    if balance is not None and task is not None and record:
        balance.record(task)
    return task


class AnswerBalance:
    """An export's answers kept balanced where a scene's natural answer is skewed, so that a family's majority answer
    tells nothing: existence alternates yes and no (the negatives cycling through POPE's three strategies),
    multiple choice cycles the right letter through A-D, count asks, of the counts a scene can ask about, the one
    the dataset holds fewest of so far (a scene of three objects can always be asked for 3: the objects in all; for 2
    only if two share a colour or a shape), and colour and shape ask about the object, of those a phrase can name,
    whose answer the dataset holds fewest of so far (the world draws circles four times as often as rings, red four
    times as often as cyan)."""

    def __init__(self):
        self.seen: Counter = Counter()  # (family, answer) -> samples so far
        self.asked: Counter = Counter()  # family -> questions so far

    def wanted(self, scene: Scene, family: str, exclude: Collection[str] = ()) -> dict:
        """What the next question of `family` about `scene` should have: its answer, letter or POPE strategy.
        exclude: answers not to pick (already asked of this scene)."""
        n = self.asked[family]
        if family == "existence":
            return {"strategy": "positive" if n % 2 == 0 else POPE_STRATEGIES[(n // 2) % len(POPE_STRATEGIES)]}
        if family == "mc":
            return {"letter": "ABCD"[n % 4]}
        if family == "count":
            options = [k for k in count_filters(scene) if str(k) not in exclude]
            if options:
                return {"count": min(options, key=lambda k: (self.seen["count", str(k)], k))}
        if family in ("colour", "shape"):
            values = {getattr(scene.objects[i], family) for i, _ in _referable(scene, without=family)} - set(exclude)
            if values:
                return {"answer": min(values, key=lambda v: (self.seen[family, v], v))}
        return {}

    def record(self, task: Task) -> None:
        self.asked[task.family] += 1
        self.seen[task.family, task.answer] += 1


# ----------------------------------------------------------------------------- naming objects

_REF_ATTRS = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"),
              ("colour",), ("size", "colour"), ("size",)]


def refer(scene: Scene, obj: SceneObject, without: str | None = None) -> str | None:
    """Shortest phrase ('the red star') that picks out obj alone, not using attribute `without`."""
    for attrs in _REF_ATTRS:
        if without in attrs:
            continue
        same = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if len(same) == 1:
            words = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
            words.append(obj.shape if "shape" in attrs else "object")
            return "the " + " ".join(words)
    return None


def _referable(scene: Scene, without: str | None = None, objects=None) -> list[tuple[int, str]]:
    """(index, phrase) of every object that can be named unambiguously."""
    out = []
    for i, obj in enumerate(scene.objects):
        if objects is None or obj in objects:
            phrase = refer(scene, obj, without)
            if phrase is not None:
                out.append((i, phrase))
    return out


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _question(family, question, answer, boxes, prompt_suffix=SHORT_ANSWER, **meta) -> Task:
    return Task(family, question, question + prompt_suffix, answer, boxes, meta)


# ----------------------------------------------------------------------------- attribute questions


def attribute_task(scene: Scene, rng: random.Random, attribute: str, answer: str | None = None) -> Task | None:
    """"What colour/shape is <phrase>?", where the phrase names one object without giving the answer away. answer:
    ask about an object of that colour/shape (an export's balance); None: any."""
    named = [(i, phrase) for i, phrase in _referable(scene, without=attribute)
             if answer is None or getattr(scene.objects[i], attribute) == answer]
    if not named:
        return None
    i, phrase = rng.choice(named)
    obj = scene.objects[i]
    return _question(attribute, f"What {attribute} is {phrase}?", getattr(obj, attribute), [scene.norm(obj.box)],
                     targets=[i], refs=[phrase])


def colour_task(scene: Scene, rng: random.Random, answer: str | None = None) -> Task | None:
    return attribute_task(scene, rng, "colour", answer)


def shape_task(scene: Scene, rng: random.Random, answer: str | None = None) -> Task | None:
    return attribute_task(scene, rng, "shape", answer)


def count_filters(scene: Scene) -> dict[int, list[tuple[str, str]]]:
    """What a count question can ask about, by its answer: {count: [(attribute, value), ...]}, the attributes being
    colour, shape, kind (colour and shape) and "all" (every object). Always at least one object: every count
    question has evidence."""
    filters = sorted({f for o in scene.objects for f in
                      (("colour", o.colour), ("shape", o.shape), ("kind", o.kind))})
    if scene.objects:
        filters.append(("all", ""))
    by_count: dict[int, list] = {}
    for attr, value in filters:
        by_count.setdefault(len(_matching(scene, attr, value)), []).append((attr, value))
    return by_count


def _matching(scene: Scene, attr: str, value: str) -> list[SceneObject]:
    return list(scene.objects) if attr == "all" else [o for o in scene.objects if getattr(o, attr) == value]


def count_task(scene: Scene, rng: random.Random, count: int | None = None) -> Task | None:
    """How many objects share a colour, a shape, or both, or how many there are in all. count: ask about a filter
    with that answer (an export's balance); None: any filter of the scene."""
    options = count_filters(scene)
    if not options or (count is not None and count not in options):
        return None
    # Unasked for a count, the "all" filter is left out: a scene's natural count questions (mostly 1) are kept as
    # they were; the export's balance asks for counts, and "all" is what makes 2 and 3 available.
    filters = options[count] if count is not None else sorted(f for fs in options.values() for f in fs
                                                              if f[0] != "all")
    attr, value = rng.choice(filters)
    matching = _matching(scene, attr, value)
    if attr == "all":
        question = "How many objects are there?"
    elif attr == "colour":
        question = f"How many {value} objects are there?"
    else:
        *colour, shape = value.split()
        question = f"How many {' '.join(colour + [_plural(shape)])} are there?"
    return _question("count", question, str(len(matching)), [scene.norm(o.box) for o in matching],
                     filter={attr: value})


def text_task(scene: Scene, rng: random.Random) -> Task | None:
    named = _referable(scene, objects=[o for o in scene.objects if o.code is not None])
    if not named:
        return None
    i, phrase = rng.choice(named)
    obj = scene.objects[i]
    return _question("text", f"What is the code written on {phrase}?", obj.code,
                     [scene.norm(obj.box)], targets=[i], refs=[phrase],
                     code_box=list(scene.norm(obj.code_box)))


# ----------------------------------------------------------------------------- existence (POPE)


@dataclass
class WorldStats:
    """Per-dataset statistics behind POPE's negatives: in how many scenes each kind appears
    (popular) and how often two kinds appear in the same scene (adversarial)."""
    n_scenes: int
    frequency: Counter
    cooccurrence: dict  # kind -> Counter of kinds seen in the same scenes

    @classmethod
    def from_scenes(cls, scenes) -> WorldStats:
        frequency, cooccurrence, n = Counter(), {k: Counter() for k in KINDS}, 0
        for scene in scenes:
            kinds = sorted({o.kind for o in scene.objects})
            frequency.update(kinds)
            for a, b in permutations(kinds, 2):
                cooccurrence[a][b] += 1
            n += 1
        return cls(n, frequency, cooccurrence)

    def cooccurrence_with(self, kind: str, present) -> int:
        return sum(self.cooccurrence[kind][p] for p in present)


@lru_cache(maxsize=1)
def default_stats() -> WorldStats:
    """Statistics of the world at large (2000 reference scenes), for single scenes."""
    return WorldStats.from_scenes(make_scene(f"stats/{i}") for i in range(2000))


def existence_task(scene: Scene, rng: random.Random, stats: WorldStats | None = None,
                   strategy: str | None = None) -> Task | None:
    """'Is there a red star in the image?' Half the questions are positives; negatives are drawn
    as in POPE: random (any absent kind), popular (among the TOP_K most frequent absent kinds),
    adversarial (among the TOP_K absent kinds that co-occur most with the kinds present)."""
    stats = stats or default_stats()
    if strategy is None:
        strategy = "positive" if rng.random() < 0.5 else rng.choice(POPE_STRATEGIES)
    present = sorted({o.kind for o in scene.objects})
    absent = [k for k in KINDS if k not in present]

    if strategy == "positive":
        if not present:
            return None
        kind = rng.choice(present)
        evidence = [o for o in scene.objects if o.kind == kind]
    else:
        if strategy == "random":
            kind = rng.choice(absent)
        elif strategy == "popular":
            kind = _pick_top(absent, lambda k: stats.frequency[k], rng)
        elif strategy == "adversarial":
            kind = _pick_top(absent, lambda k: stats.cooccurrence_with(k, present), rng)
        else:
            raise ValueError(f"unknown POPE strategy {strategy!r}; known: {POPE_STRATEGIES}")
        evidence = _near_misses(scene, kind)  # the evidence for "no"

    boxes = [scene.norm(o.box) for o in evidence] or [(0.0, 0.0, 1.0, 1.0)]  # else: look everywhere
    return _question("existence", f"Is there {_a(kind)} in the image?",
                     "yes" if strategy == "positive" else "no", boxes, strategy=strategy, kind=kind)


def _near_misses(scene: Scene, kind: str) -> list[SceneObject]:
    """The objects of the same colour or shape as `kind` ("red star" or "star"): where a model must look to say no."""
    words = set(kind.split())
    return [o for o in scene.objects if words & {o.colour, o.shape}]


def _pick_top(candidates: list[str], score, rng: random.Random) -> str:
    ranked = sorted(candidates, key=lambda k: (-score(k), k))
    return rng.choice(ranked[:TOP_K])


# ----------------------------------------------------------------------------- relations


def relation(a: SceneObject, b: SceneObject, axis: str | None = None) -> str | None:
    """Where a is relative to b ('left', 'right', 'above', 'below'), judged on boxes that do not
    overlap along that axis; None when they do."""
    if axis in (None, "x"):
        if a.box[2] <= b.box[0]:
            return "left"
        if a.box[0] >= b.box[2]:
            return "right"
    if axis in (None, "y"):
        if a.box[3] <= b.box[1]:
            return "above"
        if a.box[1] >= b.box[3]:
            return "below"
    return None


def spatial_task(scene: Scene, rng: random.Random) -> Task | None:
    named = _referable(scene)
    pairs = [(a, b, axis) for a, b in permutations(named, 2) for axis in ("x", "y")
             if relation(scene.objects[a[0]], scene.objects[b[0]], axis)]
    if not pairs:
        return None
    (i, phrase_a), (j, phrase_b), axis = rng.choice(pairs)
    answer = relation(scene.objects[i], scene.objects[j], axis)
    if axis == "x":
        question = f"Is {phrase_a} to the left or to the right of {phrase_b}?"
    else:
        question = f"Is {phrase_a} above or below {phrase_b}?"
    boxes = [scene.norm(scene.objects[i].box), scene.norm(scene.objects[j].box)]
    return _question("spatial", question, answer, boxes, targets=[i, j], refs=[phrase_a, phrase_b])


# ----------------------------------------------------------------------------- multiple choice


def mc_task(scene: Scene, rng: random.Random, letter: str | None = None) -> Task | None:
    """A colour, shape or count question with four options, answered by the option's letter. letter: where the
    right option goes (an export's balance); None: a random place."""
    asks = rng.choice(("colour", "shape", "count"))
    base = {"colour": colour_task, "shape": shape_task, "count": count_task}[asks](scene, rng)
    if base is None:
        return None
    vocabulary = {"colour": list(COLOURS), "shape": list(SHAPES),
                  "count": [str(k) for k in range(1, max(8, len(scene.objects) + 4))]}[asks]
    options = rng.sample([v for v in vocabulary if v != base.answer], 3) + [base.answer]
    rng.shuffle(options)
    if letter is not None:  # the right option moved to `letter`'s place, the others keep their order
        options.remove(base.answer)
        options.insert("ABCD".index(letter), base.answer)
    letter = "ABCD"[options.index(base.answer)]
    prompt = base.question + "".join(f"\n{l}. {o}" for l, o in zip("ABCD", options)) + MC_ANSWER
    return Task("mc", base.question, prompt, letter, base.boxes,
                {**base.meta, "asks": asks, "options": options, "answer_text": base.answer})


# ----------------------------------------------------------------------------- grounding


def grounding_task(scene: Scene, rng: random.Random) -> Task | None:
    named = _referable(scene)
    if not named:
        return None
    i, phrase = rng.choice(named)
    box = scene.norm(scene.objects[i].box)
    return Task("grounding", phrase, GROUNDING_PROMPT + phrase, box_text(box), [box],
                {"targets": [i], "refs": [phrase]})


# ----------------------------------------------------------------------------- captions

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_LOCATIONS = (("at the top left", "at the top", "at the top right"),
              ("on the left", "in the centre", "on the right"),
              ("at the bottom left", "at the bottom", "at the bottom right"))
_TEXTURE_WORDS = {"plain": "plain {}", "gradient": "softly shaded {}", "mottled": "lightly mottled {}"}


def _reading_order(scene: Scene) -> list[SceneObject]:
    """Top band first, left to right within a band (bands are thirds of the image)."""
    third = scene.image_size / 3
    return sorted(scene.objects, key=lambda o: (int((o.box[1] + o.box[3]) / 2 // third),
                                                o.box[0] + o.box[2]))


def _count_words(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _several(n: int, kind: str) -> str:
    """'two red stars', 'three circles'."""
    *adjectives, noun = kind.split()
    return " ".join([_count_words(n), *adjectives, _plural(noun)])


def short_caption(scene: Scene) -> str:
    """'A red star, two blue circles and a green ring on a beige background.'"""
    groups = Counter(o.kind for o in _reading_order(scene))  # keeps first-seen order
    parts = [_a(kind) if n == 1 else _several(n, kind) for kind, n in groups.items()]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{things} on {_a(scene.background)} background." if parts else \
        f"An empty {scene.background} background."
    return text[0].upper() + text[1:]


def dense_caption(scene: Scene) -> str:
    """Every object with its size, colour, shape, code, place in the image and position
    relative to the object described before it."""
    objects = _reading_order(scene)
    n = len(objects)
    background = _TEXTURE_WORDS[scene.texture].format(scene.background)
    sentences = [f"The image shows {_count_words(n)} object{'s' if n != 1 else ''} "
                 f"on {_a(background)} background."]
    third = scene.image_size / 3
    previous = None
    for obj in objects:
        row = min(2, int((obj.box[1] + obj.box[3]) / 2 // third))
        col = min(2, int((obj.box[0] + obj.box[2]) / 2 // third))
        text = f"{_LOCATIONS[row][col]} there is {_a(f'{obj.size} {obj.colour} {obj.shape}')}"
        if obj.code is not None:
            text += f' with a label reading "{obj.code}"'
        if previous is not None:
            where = relation(obj, previous)
            if where is not None:  # always, for generated scenes: their boxes never overlap
                ref = refer(scene, previous) or f"the {previous.size} {previous.kind}"
                text += f", {where if where in ('above', 'below') else f'to the {where} of'} {ref}"
        sentences.append(text[0].upper() + text[1:] + ".")
        previous = obj
    return " ".join(sentences)


def facts(scene: Scene) -> str:
    """Each object twice, named the way questions name it: by the shortest phrase without its colour, then its
    colour ("The star is red."), and by the shortest phrase without its shape, then its shape ("The red object is a
    star."). What a colour or shape question asks, stated for every object: a caption that binds each object's
    attributes to the words that pick it out."""
    sentences = []
    for obj in _reading_order(scene):
        by_shape, by_colour = refer(scene, obj, without="colour"), refer(scene, obj, without="shape")
        if by_shape is not None:
            sentences.append(f"{by_shape} is {obj.colour}.")
        if by_colour is not None:
            sentences.append(f"{by_colour} is {_a(obj.shape)}.")
    return " ".join(s[0].upper() + s[1:] for s in sentences)


FACTS_PROMPTS = ("What is each object like?", "Name the colour and the shape of every object.")


def facts_task(scene: Scene, rng: random.Random) -> Task | None:
    text = facts(scene)
    if not text:
        return None
    prompt = rng.choice(FACTS_PROMPTS)
    return Task("facts", prompt, prompt, text, [scene.norm(o.box) for o in scene.objects])


def caption_task(scene: Scene, rng: random.Random) -> Task:
    prompt = rng.choice(CAPTION_PROMPTS)
    return Task("caption", prompt, prompt, short_caption(scene),
                [scene.norm(o.box) for o in scene.objects] or [(0.0, 0.0, 1.0, 1.0)])


def dense_caption_task(scene: Scene, rng: random.Random) -> Task:
    prompt = rng.choice(DENSE_CAPTION_PROMPTS)
    return Task("dense_caption", prompt, prompt, dense_caption(scene),
                [scene.norm(o.box) for o in scene.objects] or [(0.0, 0.0, 1.0, 1.0)])


# ----------------------------------------------------------------------------- chat

CANNOT_TELL = "I cannot tell from the image."
DESCRIBE_PROMPTS = ("Describe the image.", "What do you see?", "What is in this picture?")
# Questions about an object that no picture of it can answer.
UNKNOWABLE = ("What is behind {}?", "How heavy is {}?", "What is written on the back of {}?", "Who drew {}?",
              "What is {} made of?", "How old is {}?", "What is {} used for?", "Where was {} made?",
              "What does {} smell like?", "How much does {} cost?")
CHAT_ASKS = ("colour", "shape", "count", "exists", "describe", "unknowable")


def chat_task(scene: Scene, rng: random.Random) -> Task | None:
    """A question as a user asks it in a chat, without the answer-format instruction, answered in a sentence: an
    attribute ("What colour is the star?" → "The star is red."), a count, whether a kind of object is there ("Is
    there a square?" → "Yes, there is a red square." or "No, there is no square in the image."; half of each), a
    description, or something no picture can tell ("How heavy is the star?" → "I cannot tell from the image.")."""
    ask = rng.choice(CHAT_ASKS)
    if ask in ("colour", "shape"):  # the VQA family's question, answered in a sentence
        base = attribute_task(scene, rng, ask)
        if base is None:
            return None
        phrase = base.meta["refs"][0]
        answer = f"{phrase} is {base.answer if ask == 'colour' else _a(base.answer)}."
        return _chat(base.question, answer, base.boxes, asks=ask)
    if ask == "count":
        n = len(scene.objects)
        answer = f"There {'is' if n == 1 else 'are'} {_count_words(n)} object{'s' if n != 1 else ''} in the image."
        return _chat("How many objects are there?", answer, [scene.norm(o.box) for o in scene.objects], asks=ask)
    if ask == "exists":
        return _exists_chat(scene, rng)
    if ask == "describe":
        return _chat(rng.choice(DESCRIBE_PROMPTS), short_caption(scene), [scene.norm(o.box) for o in scene.objects],
                     asks=ask)
    named = _referable(scene)
    if not named:
        return None
    i, phrase = rng.choice(named)
    return _chat(rng.choice(UNKNOWABLE).format(phrase), CANNOT_TELL, [scene.norm(scene.objects[i].box)], asks=ask)


def _exists_chat(scene: Scene, rng: random.Random) -> Task:
    """"Is there a square?" or "Is there a red square?": a kind present or absent, half each. A yes names what is
    there ("Yes, there is a red square.", "Yes, there are two squares.")."""
    by_colour = rng.random() < 0.5
    named_by = "kind" if by_colour else "shape"  # "red square" or "square"
    present = sorted({getattr(o, named_by) for o in scene.objects})
    absent = [k for k in (KINDS if by_colour else SHAPES) if k not in present]
    if present and (rng.random() < 0.5 or not absent):
        thing = rng.choice(present)
        matching = [o for o in scene.objects if getattr(o, named_by) == thing]
        answer = f"Yes, there is {_a(matching[0].kind)}." if len(matching) == 1 else \
            f"Yes, there are {_several(len(matching), thing)}."
        return _chat(f"Is there {_a(thing)}?", answer, [scene.norm(o.box) for o in matching], asks="exists")
    if by_colour:
        # A near miss where there is one (a blue square beside a red square or a blue star): to say no, the model
        # must see which colour goes with which shape.
        absent = [k for k in absent if _near_misses(scene, k)] or absent
    thing = rng.choice(absent)
    boxes = [scene.norm(o.box) for o in _near_misses(scene, thing)] or [(0.0, 0.0, 1.0, 1.0)]  # else: everywhere
    return _chat(f"Is there {_a(thing)}?", f"No, there is no {thing} in the image.", boxes, asks="exists")


def _chat(question: str, answer: str, boxes, **meta) -> Task:
    return Task("chat", question, question, answer[0].upper() + answer[1:], boxes, meta)


_BUILDERS = {
    "colour": colour_task, "shape": shape_task, "count": count_task, "existence": existence_task,
    "text": text_task, "spatial": spatial_task, "mc": mc_task, "grounding": grounding_task,
    "caption": caption_task, "dense_caption": dense_caption_task, "chat": chat_task, "facts": facts_task,
}
