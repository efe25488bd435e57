"""DenseFusion's vision experts (polyfocus/experts): each one alone, against hand-made images, the
synthworld metadata, or a naive computation with the same model."""

import os
import shutil

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from polyfocus.experts import Detection, Hints, Item, build_experts, expert_class
from polyfocus.synthworld.scenes import make_scene, render

from test_densefusion_helpers import tiny_clip, tiny_owlv2  # noqa: E402

TAGS = ["red star", "blue circle", "green square", "cat", "text"]


def items_of(*images, **fields):
    return [Item(str(i), f"{i}.png", image=image, **fields) for i, image in enumerate(images)]


# ---- OCR (tesseract) ---------------------------------------------------------------------------------------------

# CI installs tesseract (.ci/run) and sets POLYFOCUS_REQUIRE_TESSERACT: there a missing tesseract fails, not skips.
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None and not os.environ.get("POLYFOCUS_REQUIRE_TESSERACT"),
    reason="tesseract is not installed (apt-get install tesseract-ocr)")


@needs_tesseract
def test_ocr_reads_rendered_text_line_by_line():
    image = Image.new("RGB", (480, 200), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=36)
    draw.text((20, 30), "DENSE FUSION 2024", fill=(0, 0, 0), font=font)
    draw.text((60, 120), "Merging experts", fill=(20, 20, 90), font=font)
    blank = Image.new("RGB", (200, 120), (180, 200, 220))
    items = items_of(image, blank)
    (ocr,) = build_experts(["ocr"])
    ocr(items)
    assert items[0].hints.ocr == ["DENSE FUSION 2024", "Merging experts"]
    assert items[1].hints.ocr == []


@needs_tesseract
def test_ocr_scale_makes_small_text_readable():
    image = Image.new("RGB", (200, 40), (255, 255, 255))
    ImageDraw.Draw(image).text((5, 12), "LOOPBACK 7", fill=(0, 0, 0), font=ImageFont.load_default(size=11))
    (ocr,) = build_experts(["ocr"], {"ocr": {"scale": 3}})
    assert ocr.read(image) == ["LOOPBACK 7"]


# ---- image tagging (CLIP) ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_tags_are_the_models_own_zero_shot_ranking(clip_dir):
    """Probabilities equal CLIPModel's own logits_per_image softmaxed (its forward: a separate code path), the tags
    are the top k of them above the floor, best first."""
    from transformers import AutoTokenizer, CLIPModel

    from polyfocus.experts.base import hf_image_processor

    images = [Image.new("RGB", (40, 30), c) for c in ((220, 30, 30), (30, 40, 220), (250, 250, 250))]
    items = items_of(*images)
    (tagger,) = build_experts(["tags"], {"tags": {"model": str(clip_dir), "vocabulary": TAGS, "top_k": 3,
                                                  "min_probability": 0.0}})
    got = tagger.probabilities(images)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    texts = AutoTokenizer.from_pretrained(clip_dir)([f"a photo of a {t}." for t in TAGS], padding=True,
                                                    return_tensors="pt")
    pixels = hf_image_processor(str(clip_dir))(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(**texts, pixel_values=pixels).logits_per_image.softmax(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    tagger(items)
    for item, p in zip(items, got):  # (a random CLIP's probabilities are near-uniform: rank by the same numbers)
        assert item.hints.tags == [TAGS[i] for i in p.argsort(descending=True)[:3].tolist()]


def test_clip_tag_floor_and_vocabulary_file(clip_dir, tmp_path):
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("# tags\nred star\n\nblue circle\ncat\n")
    (tagger,) = build_experts(["tags"], {"tags": {"model": str(clip_dir), "vocabulary": str(vocabulary),
                                                  "min_probability": 0.99}})
    assert tagger.tags == ["red star", "blue circle", "cat"]
    items = items_of(Image.new("RGB", (32, 32)))
    tagger(items)
    assert items[0].hints.tags == []  # no tag is that sure on a random model
    with pytest.raises(ValueError, match="distinct, non-empty"):
        build_experts(["tags"], {"tags": {"model": str(clip_dir), "vocabulary": ["cat", "cat"]}})


# ---- open-vocabulary detection (OWLv2) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


def naive_owlv2(owl_dir, image, queries, threshold, nms_iou, max_detections):
    """One image at a time, no query padding: best query per predicted box, sigmoid score, centre -> corners in the
    square-padded frame (OWLv2 pads right/bottom), then greedy per-label NMS in a Python loop."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    from polyfocus.experts.base import hf_image_processor

    model = Owlv2ForObjectDetection.from_pretrained(owl_dir).eval()
    tokens = AutoTokenizer.from_pretrained(owl_dir)([f"a photo of {q}" for q in queries], padding="max_length",
                                                    max_length=16, return_tensors="pt")
    pixels = hf_image_processor(str(owl_dir))(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
    side = max(image.size)
    found = []
    for logits, (cx, cy, w, h) in zip(out.logits[0], out.pred_boxes[0].tolist()):
        score, label = torch.sigmoid(logits.max()).item(), int(logits.argmax())
        if score > threshold:
            box = [(cx - w / 2) * side, (cy - h / 2) * side, (cx + w / 2) * side, (cy + h / 2) * side]
            found.append((score, queries[label], box))

    def iou(a, b):
        ix, iy = max(0, min(a[2], b[2]) - max(a[0], b[0])), max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
        return ix * iy / union if union > 0 else 0.0  # a random box head draws empty boxes: never suppressed

    kept = []
    for score, label, box in sorted(found, key=lambda f: -f[0]):
        if all(other[1] != label or iou(other[2], box) <= nms_iou for other in kept):
            kept.append((score, label, box))
    width, height = image.size
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return [(label, [clip(box[0] / width), clip(box[1] / height), clip(box[2] / width), clip(box[3] / height)],
             score) for score, label, box in kept[:max_detections]]


def test_owlv2_detections_match_a_naive_per_image_computation(owl_dir, clip_dir):
    """Two images with 2 and 3 queries in one batch (padding queries masked) give each image's own detections."""
    images = [Image.new("RGB", (80, 48), (200, 40, 40)), Image.new("RGB", (50, 90), (40, 40, 200))]
    ImageDraw.Draw(images[0]).rectangle((10, 10, 40, 30), fill=(250, 250, 250))
    queries = [["red star", "cat"], ["blue circle", "green square", "text"]]
    items = items_of(*images)
    for item, q in zip(items, queries):
        item.hints.tags = q
    owl = expert_class("owlv2")(model=str(owl_dir), threshold=0.3, nms_iou=0.3, max_detections=5)
    owl(items)  # queried with the tags set above (in a run: the tagger's)
    for item, image, q in zip(items, images, queries):
        want = naive_owlv2(owl_dir, image, q, 0.3, 0.3, 5)
        got = [(d.label, list(d.box), d.score) for d in item.hints.detections]
        assert [g[0] for g in got] == [w[0] for w in want] and len(want) > 0
        for g, w in zip(got, want):
            assert g[1] == pytest.approx(w[1], abs=1e-5) and g[2] == pytest.approx(w[2], abs=1e-5)
        assert all(d.expert == "owlv2" and set(d.label.split()) <= set(" ".join(q).split())
                   for d in item.hints.detections)


def test_owlv2_needs_tags_or_queries(owl_dir, clip_dir):
    with pytest.raises(ValueError, match="list tags before owlv2"):
        build_experts(["owlv2", "tags"], {"owlv2": {"model": str(owl_dir)},
                                          "tags": {"model": str(clip_dir), "vocabulary": TAGS}})
    (owl,) = build_experts(["owlv2"], {"owlv2": {"model": str(owl_dir), "queries": ["cat"]}})
    items = items_of(Image.new("RGB", (64, 64)))
    owl(items)  # fixed queries: no tagger needed
    assert all(d.label == "cat" for d in items[0].hints.detections)


def test_tags_then_owlv2_chain(owl_dir, clip_dir):
    """The detector is queried with the tagger's tags of each image."""
    experts = build_experts(["tags", "owlv2"], {"tags": {"model": str(clip_dir), "vocabulary": TAGS, "top_k": 2,
                                                         "min_probability": 0.0},
                                                "owlv2": {"model": str(owl_dir), "threshold": 0.0}})
    items = items_of(Image.new("RGB", (64, 64), (250, 20, 20)))
    for expert in experts:
        expert(items)
    assert len(items[0].hints.tags) == 2
    assert items[0].hints.detections and {d.label for d in items[0].hints.detections} <= set(items[0].hints.tags)


# ---- synthworld's detector and the alt-text -----------------------------------------------------------------------


def test_synthworld_expert_boxes_are_the_scenes_normalised():
    scenes = [make_scene(f"expert/{i}", 112, max_objects=4) for i in range(6)]
    items = items_of(*(render(s) for s in scenes))
    (detector,) = build_experts(["synthworld"])
    detector(items)
    for scene, item in zip(scenes, items):
        got = {(d.label, d.box) for d in item.hints.detections}
        assert got == {(o.kind, scene.norm(o.box)) for o in scene.objects}
        assert all(d.expert == "synthworld" and 0.5 <= d.score <= 1 for d in item.hints.detections)


def test_alt_text_is_kept_with_whitespace_tidied():
    items = [Item("a", "a.png", alt_text="  Cheap   flights\nto Paris!  "), Item("b", "b.png")]
    build_experts(["alt_text"])[0](items)
    assert [i.hints.alt_text for i in items] == ["Cheap flights to Paris!", None]


def test_unknown_expert_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="unknown expert 'ram'"):
        build_experts(["ram"])
    with pytest.raises(ValueError, match=r"has no option\(s\) \['thresh'\]"):
        build_experts(["synthworld"], {"synthworld": {"thresh": 1}})
    with pytest.raises(ValueError, match="not used"):
        build_experts(["alt_text"], {"ocr": {"scale": 2}})


def test_hints_round_trip_and_pixel_boxes():
    d = Detection.from_pixels("dog", (-5, 10, 50, 120), (100, 100), 0.9, "owlv2")
    assert d.box == (0.0, 0.1, 0.5, 1.0)  # clipped to the image
    hints = Hints("alt", ["dog"], [d], ["STOP"])
    assert Hints.from_dict(hints.to_dict()) == hints
