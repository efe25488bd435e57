"""synthworld: a small procedural world of coloured shapes, for training and measuring on a CPU.

Nothing can be downloaded at run time, so polyfocus carries its own world. A *scene* is a square
picture on a plain or lightly textured background holding 1..K flat shapes (circle, square,
triangle, diamond, star, hexagon, cross, ring) in nine well-separated colours and three size
classes. Medium and large objects may carry a label plate with a three-character code ("K7Q")
printed so small that the low-res vision encoder cannot read it, while a high-res copy or a zoomed
crop can (see TEXT SIZE below). That gap is what DualFocus, MG-LLaVA and S2 are supposed to close,
so the world can show whether they do.

A scene is only metadata (`Scene`): the background and, per object, its shape, colour, size class,
code and integer pixel box at `scene.image_size`. Pixels come from `render(scene, size)`, at any
size, from the same metadata; boxes at another size come from `scene.resized(size)`.

Coordinates: boxes are (x1, y1, x2, y2), half-open: the object's pixels are columns x1..x2-1 and
rows y1..y2-1, so the normalised box is simply box / size and doubling the size doubles the box
exactly. Every object's drawing touches all four sides of its box; boxes never overlap (objects are
reject-sampled with a gap), so a box encloses exactly one object.

Determinism: `make_scene(seed)` uses only `random.Random(seed)` (ints or strings) and `render` only
PIL primitives and the Pillow-bundled font, so one seed gives byte-identical metadata and pixels.

`export(out_dir, n)` writes the world in LLaVA's training format (images/ + <split>.json +
scenes.jsonl); the questions themselves live in synthworld_tasks.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from polyfocus.data.files import write_atomic

# ----------------------------------------------------------------------------- vocabulary

# Far apart in RGB and far from every background, so "what colour" is answerable from pixels.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 35),
    "green": (40, 160, 60),
    "cyan": (30, 190, 200),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
# Box width as a fraction of the image side; the classes are ~1.5x apart so size is visible.
SIZES = {"small": (0.07, 0.085), "medium": (0.11, 0.13), "large": (0.16, 0.19)}

# Skewed priors make some kinds of object "popular", which POPE's popular negatives rely on.
COLOUR_WEIGHTS = {"red": 8, "blue": 7, "green": 6, "yellow": 5, "white": 4, "black": 4,
                  "orange": 3, "purple": 3, "cyan": 2}
SHAPE_WEIGHTS = {"circle": 8, "square": 7, "triangle": 6, "star": 5, "diamond": 4,
                 "hexagon": 3, "cross": 3, "ring": 2}
# How a new object relates to those already placed: groups of one shape or one colour make
# counting non-trivial and give POPE's adversarial negatives real co-occurrence to exploit.
P_SAME_SHAPE, P_SAME_COLOUR = 0.3, 0.2

BACKGROUNDS = {
    "grey": (188, 188, 184),
    "beige": (212, 201, 176),
    "pale blue": (182, 196, 212),
    "pale green": (188, 206, 182),
}
TEXTURES = ("plain", "gradient", "mottled")

MARGIN = 0.02  # free border, fraction of the side
GAP = 0.02     # minimum free space between two boxes

# TEXT SIZE. The plate is 2.5% of the image side tall and the font 75% of that, so a capital is
# about 1/75 of the side: 5 px in a 384 px scene. LLaVA-1.5's encoder sees the image at 336 px in
# 14 px patches: there a capital is ~4 px of blurred strokes and the whole code (~16 px wide) falls
# into one or two patch tokens -- not readable. A 768 px render (MG-LLaVA's hi-res branch) prints
# it 10 px tall, and a DualFocus crop (a ~60-120 px region scaled up to 336) shows the native
# 5 px glyphs 3-5x magnified -- both readable. (Checked by eye; test_synthworld measures heights.)
CODE_ALPHABET = "ACDEFHJKLNPRTUVXY34679"  # no look-alikes (0/O, 1/I, 2/Z, 5/S, 8/B), no wide M/W
CODE_LENGTH = 3
P_CODE = 0.4  # chance that a medium or large object carries a code
PLATE_W, PLATE_H = 0.06, 0.025
FONT_TO_PLATE = 0.75
PLATE_RGB, INK_RGB = (246, 242, 228), (12, 12, 30)


def _regular_polygon(n: int, inner: float | None = None, start_deg: float = -90.0):
    """Vertices of a regular n-gon (or n-pointed star when `inner` is the inner radius)."""
    k = 2 * n if inner else n
    radii = [1.0 if (i % 2 == 0 or not inner) else inner for i in range(k)]
    angles = [math.radians(start_deg + 360.0 * i / k) for i in range(k)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _unit_polygon(points):
    """Scale points into the unit box [0,1]^2; return them and the natural height/width ratio."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    return [((x - min(xs)) / w, (y - min(ys)) / h) for x, y in points], h / w


POLYGONS, ASPECT = {}, {"circle": 1.0, "square": 1.0, "cross": 1.0, "ring": 1.0}
for _name, _points in {
    "triangle": _regular_polygon(3),                # point up
    "diamond": _regular_polygon(4),                 # square on its corner
    "star": _regular_polygon(5, inner=0.382),       # regular five-pointed star
    "hexagon": _regular_polygon(6, start_deg=0.0),  # flat top
}.items():
    POLYGONS[_name], ASPECT[_name] = _unit_polygon(_points)

# Where a label plate sits inside the box (fractions of w, h): the solid middle of the shape.
LABEL_ANCHOR = {"triangle": (0.5, 0.64), "star": (0.5, 0.56)}

# ----------------------------------------------------------------------------- scene metadata

Box = tuple[int, int, int, int]


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str                    # size class: small | medium | large
    box: Box                     # pixels at Scene.image_size, half-open
    code: str | None = None      # text printed on the label plate
    code_box: Box | None = None  # the plate, pixels at Scene.image_size

    @property
    def kind(self) -> str:
        """'red star': what POPE-style existence questions ask about."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    id: str
    seed: int | str
    image_size: int
    background: str
    texture: str
    texture_seed: int
    objects: list[SceneObject] = field(default_factory=list)

    def norm(self, box: Box) -> tuple[float, float, float, float]:
        """A pixel box of this scene normalised to [0, 1]."""
        return tuple(v / self.image_size for v in box)

    def resized(self, size: int) -> Scene:
        """The same scene with every box in pixels of a `size` image (exact for integer ratios)."""
        def scale(box):
            return None if box is None else tuple(_scale(v, self.image_size, size) for v in box)
        objects = [replace(o, box=scale(o.box), code_box=scale(o.code_box)) for o in self.objects]
        return replace(self, image_size=size, objects=objects)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("id", "seed", "image_size", "background", "texture",
                                            "texture_seed")}
        d["objects"] = [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box),
             "box_norm": list(self.norm(o.box)), "code": o.code,
             "code_box": None if o.code_box is None else list(o.code_box)}
            for o in self.objects
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = [
            SceneObject(o["shape"], o["colour"], o["size"], tuple(o["box"]), o.get("code"),
                        None if o.get("code_box") is None else tuple(o["code_box"]))
            for o in d["objects"]
        ]
        for o in objects:
            if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES:
                raise ValueError(f"scene {d.get('id')!r}: unknown object {o.kind!r} ({o.size})")
        return cls(d["id"], d["seed"], d["image_size"], d["background"], d["texture"],
                   d["texture_seed"], objects)


def _scale(v: int, src: int, dst: int) -> int:
    """round(v * dst / src) in integers, halves up: exact whenever dst / src is an integer."""
    return (2 * v * dst + src) // (2 * src)


# ----------------------------------------------------------------------------- scene generation


def make_scene(seed: int | str, image_size: int = 384, max_objects: int = 6,
               scene_id: str | None = None, sizes: tuple[str, ...] = tuple(SIZES)) -> Scene:
    """A random scene with 1..max_objects objects; the same seed always gives the same scene.
    sizes: the size classes objects are drawn from (the demo's 112 px scenes leave out "small": a small object
    there is 8 px, under one 14 px patch)."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"sizes {sizes!r}: a non-empty subset of {tuple(SIZES)}")
    rng = random.Random(seed)
    kinds = []
    for _ in range(rng.randint(1, max_objects)):
        shape, colour = _sample_kind(rng, kinds)
        kinds.append((shape, colour, rng.choice(tuple(sizes))))
    kinds.sort(key=lambda k: -SIZES[k[2]][0])  # place big objects first: fewer rejections

    objects = []
    for shape, colour, size in kinds:
        box = _place(rng, shape, size, image_size, [o.box for o in objects])
        if box is None:  # no room left: the scene simply has fewer objects
            continue
        code = code_box = None
        if size != "small" and rng.random() < P_CODE:
            code = _sample_code(rng, {o.code for o in objects})
            code_box = _plate_box(shape, box, image_size)
        objects.append(SceneObject(shape, colour, size, box, code, code_box))

    return Scene(
        id=scene_id if scene_id is not None else f"scene_{seed}",
        seed=seed,
        image_size=image_size,
        background=rng.choice(tuple(BACKGROUNDS)),
        texture=rng.choice(TEXTURES),
        texture_seed=rng.getrandbits(31),
        objects=objects,
    )


def _sample_kind(rng: random.Random, placed: list[tuple]) -> tuple[str, str]:
    shape = _weighted(rng, SHAPE_WEIGHTS)
    colour = _weighted(rng, COLOUR_WEIGHTS)
    if placed:
        u = rng.random()
        if u < P_SAME_SHAPE:
            shape = rng.choice(placed)[0]
        elif u < P_SAME_SHAPE + P_SAME_COLOUR:
            colour = rng.choice(placed)[1]
    return shape, colour


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(tuple(weights), weights=tuple(weights.values()))[0]


def _place(rng: random.Random, shape: str, size: str, image_size: int, taken: list[Box],
           tries: int = 40) -> Box | None:
    """Reject-sample a box that keeps MARGIN from the border and GAP from every taken box."""
    lo, hi = SIZES[size]
    w = round(rng.uniform(lo, hi) * image_size)
    h = round(w * ASPECT[shape])
    margin, gap = round(MARGIN * image_size), round(GAP * image_size)
    for _ in range(tries):
        x1 = rng.randint(margin, image_size - margin - w)
        y1 = rng.randint(margin, image_size - margin - h)
        box = (x1, y1, x1 + w, y1 + h)
        if not any(_near(box, t, gap) for t in taken):
            return box
    return None


def _near(a: Box, b: Box, gap: int) -> bool:
    """True if the boxes overlap or are closer than `gap`."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _sample_code(rng: random.Random, used: set) -> str:
    while True:  # codes are unique within a scene
        code = "".join(rng.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        if code not in used:
            return code


def _plate_box(shape: str, box: Box, image_size: int) -> Box:
    u, v = LABEL_ANCHOR.get(shape, (0.5, 0.5))
    pw, ph = round(PLATE_W * image_size), round(PLATE_H * image_size)
    cx = box[0] + round(u * (box[2] - box[0]))
    cy = box[1] + round(v * (box[3] - box[1]))
    x1, y1 = cx - pw // 2, cy - ph // 2
    return (x1, y1, x1 + pw, y1 + ph)


# ----------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` (default: scene.image_size)."""
    size = size or scene.image_size
    if size != scene.image_size:
        scene = scene.resized(size)
    image = _background(scene.background, scene.texture, scene.texture_seed, size)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
        if obj.code is not None:
            _draw_code(draw, obj.code, obj.code_box)
    return image


def _background(name: str, texture: str, texture_seed: int, size: int) -> Image.Image:
    """Base colour plus a faint low-frequency pattern defined on a tiny grid and upsampled, so
    the texture looks the same at every size."""
    base = np.array(BACKGROUNDS[name], dtype=np.int16)
    if texture == "plain":
        return Image.new("RGB", (size, size), tuple(int(c) for c in base))
    rng = np.random.default_rng(texture_seed)
    if texture == "gradient":  # a +-12 level ramp, top to bottom or left to right
        grid = np.array([[[-12]], [[12]]], dtype=np.int16) * int(rng.choice([-1, 1]))  # 2x1
        if rng.random() < 0.5:
            grid = grid.transpose(1, 0, 2)  # 1x2
    else:  # mottled: +-10 levels of brightness on a 6x6 grid
        grid = rng.integers(-10, 11, size=(6, 6, 1), dtype=np.int16)
    tile = np.clip(base + grid, 0, 255).astype(np.uint8)
    return Image.fromarray(tile, "RGB").resize((size, size), Image.Resampling.BILINEAR)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]):
    x1, y1, x2, y2 = box
    xr, yb = x2 - 1, y2 - 1  # PIL's coordinates are inclusive
    w = x2 - x1
    if shape == "circle":
        draw.ellipse((x1, y1, xr, yb), fill=rgb)
    elif shape == "ring":
        draw.ellipse((x1, y1, xr, yb), outline=rgb, width=max(2, round(0.18 * w)))
    elif shape == "square":
        draw.rectangle((x1, y1, xr, yb), fill=rgb)
    elif shape == "cross":
        bar = max(2, round(w / 3))
        off = (w - bar) // 2
        draw.rectangle((x1, y1 + off, xr, y1 + off + bar - 1), fill=rgb)
        draw.rectangle((x1 + off, y1, x1 + off + bar - 1, yb), fill=rgb)
    else:
        points = [(round(x1 + u * (xr - x1)), round(y1 + v * (yb - y1))) for u, v in POLYGONS[shape]]
        draw.polygon(points, fill=rgb)


def _draw_code(draw: ImageDraw.ImageDraw, code: str, plate: Box):
    x1, y1, x2, y2 = plate
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=PLATE_RGB)
    font = _font(max(1, round(FONT_TO_PLATE * (y2 - y1))))
    draw.text(((x1 + x2) / 2, (y1 + y2) / 2), code, fill=INK_RGB, font=font, anchor="mm")


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to download


# ----------------------------------------------------------------------------- export


def export(out_dir: str, n: int, seed: int = 0, image_size: int = 384,
           families: list[str] | None = None, split: str = "train",
           include_scene: bool = False, max_objects: int = 6, sizes: tuple[str, ...] = tuple(SIZES),
           balanced: bool = True, multi_turn: bool = False, scenes_of: str | None = None) -> dict:
    """Write n scenes as a LLaVA dataset and return a summary.

    Files: out_dir/images/<scene id>.png, out_dir/<split>.json (a LLaVA conversation list, one
    sample per scene and family, plus the extra keys "family", "boxes" (normalised evidence boxes),
    "scene_id", "meta" and, with include_scene, "scene") and out_dir/scenes.jsonl (one scene per
    line; lines of other splits already there are kept). split="pretrain" defaults to short
    captions only (LLaVA's stage 1). The split name is part of every scene's seed, so train/val/
    test exported with one seed hold different scenes. Deterministic in (n, seed, split, ...).
    sizes: the object size classes (make_scene). balanced: existence, multiple choice, count, colour and shape answers
    kept balanced over the export (tasks.AnswerBalance), so that their majority answer is uninformative. A family listed
    twice asks each scene a second question, drawn with its own seed (dropped when it repeats the first; a
    single-turn sample's id then ends "_<family>2"). multi_turn: one
    sample per scene, its families' questions as the turns of one conversation (in an order drawn per scene; the image
    in the first turn), as LLaVA-1.5's instruction data asks several questions of one image: every answer is then
    trained on at the cost of one pass over the image's tokens. Such a sample lists its turns' "families", "boxes"
    and "meta". scenes_of: the split whose scenes (and images) these questions are about, when not `split` (LLaVA's
    stage-1 captions of the stage-2 images: `export(..., split="pretrain", scenes_of="train")`).
    """
    # Tasks are built on top of scenes; importing them here keeps the module graph acyclic.
    from polyfocus.synthworld.tasks import FAMILIES, AnswerBalance, WorldStats, make_task

    if families is None:
        families = ["caption"] if split == "pretrain" else list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown synthworld families {unknown}; known: {list(FAMILIES)}")

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    scenes_of = scenes_of or split
    scenes = [make_scene(f"{seed}/{scenes_of}/{i}", image_size, max_objects, scene_id=f"{scenes_of}_{i:06d}",
                         sizes=sizes) for i in range(n)]
    stats = WorldStats.from_scenes(scenes)  # POPE's "popular" and "adversarial" are per dataset

    samples, counts = [], {f: 0 for f in families}
    balance = AnswerBalance() if balanced else None
    for scene in scenes:
        write_atomic(os.path.join(out_dir, _image_path(scene)), _png_bytes(render(scene)), fsync=False)
        kept, asked = [], Counter()  # kept: (task, how many of its family were asked before it)
        for family in families:
            # A family listed again asks again: its k-th question drawn with its own seed, never one already asked.
            repeat = asked[family]
            asked[family] += 1
            rng = random.Random(f"{scene.seed}/{family}/{repeat}") if repeat else None
            task = make_task(scene, family, rng=rng, stats=stats, balance=balance, record=False,
                             exclude=[t.answer for t, _ in kept if t.family == family])
            if task is None or any(t.prompt == task.prompt for t, _ in kept):  # none unambiguous, or a repeat
                continue
            if balance is not None:  # only the questions kept count towards the balance
                balance.record(task)
            kept.append((task, repeat))
            counts[family] += 1
        if multi_turn and kept:
            tasks = [task for task, _ in kept]
            random.Random(f"{scene.seed}/turns").shuffle(tasks)
            samples.append(conversation_sample(scene, tasks, include_scene))
        else:
            samples += [llava_sample(scene, task, include_scene, repeat) for task, repeat in kept]

    json_path = os.path.join(out_dir, f"{split}.json")
    write_atomic(json_path, json.dumps(samples, ensure_ascii=False))
    scenes_path = os.path.join(out_dir, "scenes.jsonl")
    _write_scenes(scenes_path, split, scenes)
    return {"split": split, "n_scenes": n, "n_samples": len(samples), "families": counts,
            "seed": seed, "image_size": image_size, "json": json_path,
            "images": os.path.join(out_dir, "images"), "scenes": scenes_path}


def read_scenes(data_dir: str | os.PathLike, split: str) -> list[Scene]:
    """The scenes of `split` in an export's data_dir/scenes.jsonl, in order."""
    scenes_file = Path(data_dir) / "scenes.jsonl"
    if not scenes_file.is_file():
        raise FileNotFoundError(f"{scenes_file}: no synthworld scenes (export a split first: polyfocus synth / demo)")
    scenes = [Scene.from_dict(d) for d in map(json.loads, scenes_file.read_text().splitlines()) if d["split"] == split]
    if not scenes:
        raise ValueError(f"{scenes_file}: no scenes of split {split!r}")
    return scenes


def llava_sample(scene: Scene, task, include_scene: bool = False, repeat: int = 0) -> dict:
    """One LLaVA training record for a Task (see synthworld_tasks.Task); repeat: how many questions of its family the
    scene was asked before it (its id then ends "_<family>2", "_<family>3", ...)."""
    sample = {
        "id": f"{scene.id}_{task.family}{repeat + 1 if repeat else ''}",
        "image": _image_path(scene),
        "conversations": [{"from": "human", "value": "<image>\n" + task.prompt},
                          {"from": "gpt", "value": task.answer}],
        "family": task.family,
        "boxes": [[round(v, 4) for v in b] for b in task.boxes],
        "scene_id": scene.id,
        "meta": task.meta,
    }
    if include_scene:
        sample["scene"] = scene.to_dict()
    return sample


def conversation_sample(scene: Scene, tasks: list, include_scene: bool = False) -> dict:
    """One LLaVA training record asking every Task of `tasks` about the scene, one turn each."""
    turns = []
    for k, task in enumerate(tasks):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + task.prompt},
                  {"from": "gpt", "value": task.answer}]
    sample = {"id": f"{scene.id}_conversation", "image": _image_path(scene), "conversations": turns,
              "families": [t.family for t in tasks], "boxes": [[[round(v, 4) for v in b] for b in t.boxes]
                                                               for t in tasks],
              "scene_id": scene.id, "meta": [t.meta for t in tasks]}
    if include_scene:
        sample["scene"] = scene.to_dict()
    return sample


def _image_path(scene: Scene) -> str:
    return f"images/{scene.id}.png"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # flat colours compress well even at level 1
    return buf.getvalue()


def _write_scenes(path: str, split: str, scenes: list[Scene]):
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("split") != split]
    lines = [json.dumps({"split": split, **s.to_dict()}) + "\n" for s in scenes]
    write_atomic(path, "".join(kept + lines))
