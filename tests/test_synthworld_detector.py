"""The pixel-based synthworld detector (polyfocus/synthworld/detector.py): its boxes, colours and shapes against
the scenes' own metadata."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from polyfocus.synthworld.detector import detect
from polyfocus.synthworld.scenes import COLOURS, Scene, SceneObject, make_scene, render


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("size,n_scenes", [(112, 150), (384, 40)])
def test_boxes_colours_and_shapes_match_the_scenes(size, n_scenes):
    """Every object found once, its box at IoU >= 0.9 with the scene's (in fact equal), its colour and shape right;
    nothing else found. The scenes include label plates and textured backgrounds."""
    plates = textures = 0
    for i in range(n_scenes):
        scene = make_scene(f"detector/{i}", size, max_objects=6)
        detections = detect(render(scene))
        assert len(detections) == len(scene.objects), scene.id
        for obj in scene.objects:
            box, colour, shape, score = max(detections, key=lambda d: iou(d[0], obj.box))
            assert iou(box, obj.box) >= 0.9, (scene.id, obj, box)
            assert box == obj.box and (colour, shape) == (obj.colour, obj.shape), (scene.id, obj, colour, shape)
            assert 0.75 < score <= 1.0
            plates += obj.code is not None
        textures += scene.texture != "plain"
    assert plates > 10 and textures > 10  # the hard cases were there


def test_clean_objects_score_one_and_come_in_reading_order():
    objects = [SceneObject("star", "red", "large", (60, 10, 100, 48)),
               SceneObject("ring", "blue", "medium", (8, 30, 40, 62)),
               SceneObject("triangle", "blue", "medium", (50, 70, 80, 96))]
    scene = Scene("hand", 0, 112, "beige", "mottled", 7, objects)
    detections = detect(np.asarray(render(scene)))  # an array works as well as an image
    assert [(d[0], d[1], d[2]) for d in detections] == [((60, 10, 100, 48), "red", "star"),
                                                        ((8, 30, 40, 62), "blue", "ring"),
                                                        ((50, 70, 80, 96), "blue", "triangle")]
    assert all(d[3] == 1.0 for d in detections)


def test_a_plate_cutting_a_shape_does_not_split_it():
    """A plate drawn right across a square: two halves of one colour, joined through the plate's pixels."""
    image = Image.new("RGB", (100, 100), (188, 188, 184))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 59, 59), fill=COLOURS["green"])
    draw.rectangle((10, 36, 69, 43), fill=(246, 242, 228))  # wider than the square: its halves do not touch
    detections = detect(image)
    assert len(detections) == 1 and detections[0][:3] == ((20, 20, 60, 60), "green", "square")


def test_empty_background_has_no_objects():
    assert detect(Image.new("RGB", (64, 64), (212, 201, 176))) == []
