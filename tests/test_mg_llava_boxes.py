"""MG-LLaVA's boxes (polyfocus/data/boxes.py; spec mg_llava.md §1, §7, §9): the box JSON (read, validated, written by
`polyfocus boxes`), class-wise NMS (torchvision's rule, without torchvision), the per-category / per-image cap, the
mapping into the processed image, the dummy box; detectors (synthworld's pixel detector, OWLv2 and Grounding DINO
through transformers on tiny random checkpoints); boxes through the dataset, the collator and the pipeline.
"""

import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from polyfocus.data.boxes import (
    BoxError, BoxPolicy, BoxRecord, ObjectBoxes, batched_nms, limit, nms, read_box_json, to_processed, write_box_json,
)
from polyfocus.data.images import ImageProcessor
from polyfocus.experts.detectors import make_detector

from test_mg_llava import TINY_HIRES, plain_and_mg  # noqa: E402

# ---- the box JSON ------------------------------------------------------------------------------------------------


def test_box_json_round_trip_and_ids_as_strings(tmp_path):
    records = {"7": BoxRecord([[1.0, 2.0, 30.0, 40.5]], [0.9], ["cat"]), "a": BoxRecord()}
    write_box_json(records, tmp_path / "b.json")
    raw = json.loads((tmp_path / "b.json").read_text())
    assert raw[0] == {"id": "7", "boxes": [[1, 2, 30, 40.5]], "scores": [0.9], "labels": ["cat"]}  # ints stay ints
    assert read_box_json(tmp_path / "b.json") == records
    (tmp_path / "c.json").write_text(json.dumps([{"id": 7, "boxes": [[0, 0, 5, 5]], "scores": [1], "labels": ["x"]}]))
    assert list(read_box_json(tmp_path / "c.json")) == ["7"]  # the reference keys by str(id)


@pytest.mark.parametrize("record,message", [
    ({"id": 1, "boxes": [[0, 0, float("nan"), 3]], "scores": [1], "labels": ["a"]}, "box 0 must be four finite"),
    ({"id": 1, "boxes": [[0, 0, 5]], "scores": [1], "labels": ["a"]}, "box 0 must be four finite"),
    ({"id": 1, "boxes": [[0, 0, 5, 5], [9, 2, 4, 8]], "scores": [1, 1], "labels": ["a", "b"]}, "box 1 .* is inverted"),
    ({"id": 1, "boxes": [[0, 0, 5, 5]], "scores": [1, 2], "labels": ["a"]}, "lists of one length"),
    ({"id": 1, "boxes": [[0, 0, 5, 5]], "scores": [float("inf")], "labels": ["a"]}, "finite score"),
    ({"boxes": []}, "record #0 has no 'id'"),
])
def test_bad_records_are_refused_naming_file_record_and_box(tmp_path, record, message):
    (tmp_path / "b.json").write_text(json.dumps([record]).replace("NaN", "NaN"))
    with pytest.raises(BoxError, match=message) as e:
        read_box_json(tmp_path / "b.json")
    assert str(tmp_path / "b.json") in str(e.value)


def test_duplicate_ids_and_malformed_json_are_refused(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"id": 1, "boxes": []}, {"id": "1", "boxes": []}]))
    with pytest.raises(BoxError, match="id '1' appears twice"):
        read_box_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("[{")
    with pytest.raises(BoxError, match=r"c.json:1:3: malformed JSON"):
        read_box_json(tmp_path / "c.json")


# ---- NMS and the cap -----------------------------------------------------------------------------------------------


def nms_reference(boxes, scores, threshold):
    """torchvision's nms_kernel, loop by loop: by decreasing score, drop j when IoU(i, j) > threshold."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    suppressed, keep = set(), []
    for a, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            x1, y1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x2, y2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            union = area(boxes[i]) + area(boxes[j]) - inter
            if union > 0 and inter / union > threshold:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9])
def test_nms_matches_torchvisions_loop(threshold):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 30], 1)
    boxes[5] = boxes[6]  # identical boxes, zero-area boxes
    boxes[7, 2:] = boxes[7, :2]
    scores = torch.rand(40, generator=g)
    assert nms(boxes, scores, threshold).tolist() == nms_reference(boxes.tolist(), scores.tolist(), threshold)


def test_batched_nms_is_class_wise_and_score_ordered():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1])
    labels = ["cat", "cat", "dog", "cat"]
    # box 0 (cat, 0.5) is suppressed by box 1 (cat, 0.9); box 2 (dog) overlaps both but is another class
    assert batched_nms(boxes, scores, labels, 0.2).tolist() == [1, 2, 3]


def test_per_category_cap():
    """More than limit_num boxes: each label keeps its top 20 (5 when limit_num < 50), grouped by label in
    first-appearance order; near the length limit, its top 1; within limit_num: all, untouched."""
    labels = ["a"] * 30 + ["b"] * 3 + ["c"] * 25
    scores = torch.arange(58, 0, -1, dtype=torch.float64)  # NMS order: decreasing score
    kept = limit(scores, labels, BoxPolicy(limit_num=52))
    assert kept == list(range(20)) + [30, 31, 32] + list(range(33, 53))
    assert limit(scores, labels, BoxPolicy(limit_num=10)) == list(range(5)) + [30, 31, 32] + list(range(33, 38))
    assert limit(scores, labels, BoxPolicy(limit_num=100)) == list(range(58))
    assert limit(scores, labels, BoxPolicy(limit_num=100), near_limit=True) == [0, 30, 33]
    assert limit(scores, labels, BoxPolicy(limit_num=None)) == list(range(58))


def test_per_image_cap():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    policy = BoxPolicy(limit_mode="per_image", limit_num=3)
    assert limit(scores, list("abcde"), policy) == [1, 4, 3]
    assert limit(scores, list("abcde"), BoxPolicy(limit_mode="per_image", limit_num=30), near_limit=True) == \
        [0, 1, 2, 3, 4]


# ---- into the processed image --------------------------------------------------------------------------------------


def test_pad_mapping_is_the_references():
    """A 400 x 250 image padded to 400 (offset 75 on y), scaled to 768: x * 1.92, (y + 75) * 1.92, rounded half to
    even (torch.round)."""
    boxes = torch.tensor([[10.0, 0.0, 110.0, 250.0], [0.25, 1.0, 1.0, 2.0]], dtype=torch.float64)
    out = to_processed(boxes, 400, 250, ImageProcessor(image_size=768, aspect_ratio="pad"))
    want = torch.round(torch.tensor([[10.0, 75, 110, 325], [0.25, 76, 1, 77]], dtype=torch.float64) * 1.92)
    assert torch.equal(out, want)
    assert out[0].tolist() == [19, 144, 211, 624]


def test_square_mapping_crops_and_drops_like_the_reference():
    """Shortest edge 250 → 768 (x 3.072), centre crop of the 1228-wide resize (start 230): boxes in the crop move,
    across it are clipped, outside it are dropped (adjust_center_crop_box)."""
    processor = ImageProcessor(image_size=768, aspect_ratio="square")
    boxes = torch.tensor([[150.0, 10.0, 200.0, 60.0], [0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 50.0, 50.0]],
                         dtype=torch.float64)
    out = to_processed(boxes, 400, 250, processor)
    scale, start = 768 / 250, (int(768 * 400 / 250) - 768) // 2
    assert start == 230
    assert out.tolist() == [[round(150 * scale) - start, round(10 * scale), round(200 * scale) - start,
                             round(60 * scale)], [0, 0, round(100 * scale) - start, round(100 * scale)]]


def test_boxes_point_at_their_objects_in_the_processed_pixels():
    """A synthworld scene on a wide canvas, through the real processor at 256: each box's centre pixel in the
    processed tensor has its object's colour."""
    from polyfocus.synthworld.scenes import COLOURS, make_scene, render

    scene = make_scene(3, 200, max_objects=4)
    canvas = Image.new("RGB", (300, 200), (188, 188, 184))
    canvas.paste(render(scene), (100, 0))
    processor = ImageProcessor(image_size=256, aspect_ratio="pad")
    pixels = processor([canvas])[0]
    rgb = (pixels * torch.tensor(processor.image_std)[:, None, None]
           + torch.tensor(processor.image_mean)[:, None, None]) * 255
    boxes = torch.tensor([[o.box[0] + 100, o.box[1], o.box[2] + 100, o.box[3]] for o in scene.objects],
                         dtype=torch.float64)
    for obj, box in zip(scene.objects, to_processed(boxes, 300, 200, processor)):
        if obj.shape in ("ring", "cross") or obj.code:  # hollow centres and label plates
            continue
        x, y = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert (rgb[:, y, x] - torch.tensor(COLOURS[obj.colour])).abs().max() < 30, obj


def test_for_image_clips_drops_outside_boxes_and_falls_back_to_the_dummy_box(caplog):
    image = Image.new("RGB", (100, 50))
    boxes = ObjectBoxes(ImageProcessor(image_size=200, aspect_ratio="resize"))
    record = BoxRecord([[-10.0, 5.0, 50.0, 60.0], [120.0, 0.0, 130.0, 10.0]], [0.9, 0.8], ["a", "b"])
    with caplog.at_level(logging.WARNING):
        out = boxes.for_image(image, record, where="sample 3")
    assert out.tolist() == [[0.0, 20.0, 100.0, 200.0]]  # clipped to the image, then x2, y4
    assert "sample 3: box 1 [120.0, 0.0, 130.0, 10.0] lies outside the 100x50 image: dropped" in caplog.text
    dummy = boxes.for_image(image, BoxRecord())
    assert dummy.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # MG-LLaVA's fallback: every image has one object token


def test_near_the_length_limit_one_box_per_label():
    boxes = ObjectBoxes(ImageProcessor(image_size=100, aspect_ratio="resize"), BoxPolicy(), max_length=200)
    record = BoxRecord([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50.0]], [0.5, 0.9, 0.7], ["a", "a", "b"])
    image = Image.new("RGB", (100, 100))
    assert len(boxes.for_image(image, record, text_tokens=140)) == 3
    assert boxes.for_image(image, record, text_tokens=150).tolist() == [[20, 20, 30, 30], [40, 40, 50, 50]]


# ---- detectors -----------------------------------------------------------------------------------------------------


def test_synthworld_detector_as_a_box_source_finds_every_object():
    from polyfocus.synthworld.scenes import make_scene, render

    scene = make_scene(11, 256, max_objects=5)
    record = make_detector("synthworld")(render(scene))
    truth = sorted((list(map(float, o.box)), o.kind) for o in scene.objects)
    assert sorted(zip(record.boxes, record.labels)) == truth
    only_red = make_detector("synthworld", ["red"])(render(scene))
    assert {label.split()[0] for label in only_red.labels} <= {"red"}


def clip_tokenizer_dir(path: Path):
    """A tiny CLIP BPE vocabulary (ids > 0 for the start token, as OWL masks queries starting with id 0)."""
    from transformers import CLIPTokenizer

    words = ["red", "circle", "blue", "square", "a", "photo", "of"]
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, **{w + "</w>": i + 3 for i, w in enumerate(words)}}
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token="!", model_max_length=16), vocab


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    root = tmp_path_factory.mktemp("owlv2")
    tokenizer, vocab = clip_tokenizer_dir(root / "tok")
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "owlv2")
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(root / "owlv2")
    return root / "owlv2"


def test_owlv2_detector_from_a_local_directory(owlv2_dir):
    """OWLv2 through transformers: queries "a photo of {tag}", every score above the threshold kept, boxes in the
    original image's pixels (OWLv2 pads to a square: target size max(W, H)), truncated to integers."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    image = Image.new("RGB", (64, 40), (200, 10, 10))
    detector = make_detector(str(owlv2_dir), ["red circle", "blue square"], threshold=0.0)
    record = detector(image)
    processor, model = AutoProcessor.from_pretrained(owlv2_dir), AutoModelForZeroShotObjectDetection.from_pretrained(
        owlv2_dir)
    inputs = processor(text=[["a photo of red circle", "a photo of blue square"]], images=image, padding=True,
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    scores, classes = out.logits[0].sigmoid().max(-1)
    cx, cy, w, h = (out.pred_boxes[0] * 64).unbind(-1)  # normalised to the 64 x 64 padded square
    want = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).int().float()
    assert len(record.boxes) == 16 and record.labels == [["red circle", "blue square"][i] for i in classes]
    torch.testing.assert_close(torch.tensor(record.boxes), want, rtol=0, atol=1.0)  # int() of nearly equal floats
    assert record.scores == pytest.approx(scores.tolist())
    assert make_detector(str(owlv2_dir), ["red circle"], threshold=1.0)(image).boxes == []


def test_grounding_dino_detector_from_a_local_directory(tmp_path):
    from transformers import (
        BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "circle", "blue", "square"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1],
                         "window_size": 2, "image_size": 32, "out_features": ["stage1", "stage2"]},
        text_config={"model_type": "bert", "vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 1, "intermediate_size": 16},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, num_feature_levels=2, encoder_n_points=1,
        decoder_n_points=1, use_timm_backbone=False)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(tmp_path / "gd")
    GroundingDinoProcessor(GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32}),
                           BertTokenizer(str(tmp_path / "vocab.txt"))).save_pretrained(tmp_path / "gd")
    record = make_detector(str(tmp_path / "gd"), ["red circle", "blue square"], threshold=0.0)(
        Image.new("RGB", (64, 40), (200, 10, 10)))
    assert len(record.boxes) == 5 and all(len(b) == 4 and b[2] >= b[0] for b in record.boxes)
    assert all(0 <= s <= 1 for s in record.scores) and all(isinstance(label, str) for label in record.labels)


def test_detector_errors_are_clear(tmp_path, owlv2_dir):
    with pytest.raises(ValueError, match="use 'synthworld' or a local OWLv2"):
        make_detector(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="needs text queries"):
        make_detector(str(owlv2_dir))
    with pytest.raises(ValueError, match="fixed queries or a tagger, not both"):
        make_detector("synthworld", ["red"], tagger=object())


class FixedTagger:
    def __init__(self, *tags):
        self.tags = list(tags)

    def tags_of(self, images):
        return [self.tags for _ in images]


def test_owlv2_asked_with_a_taggers_tags_equals_owlv2_asked_with_them_fixed(owlv2_dir):
    image = Image.new("RGB", (64, 40), (200, 10, 10))
    fixed = make_detector(str(owlv2_dir), ["red circle", "blue square"], threshold=0.0)(image)
    tagged = make_detector(str(owlv2_dir), threshold=0.0, tagger=FixedTagger("red circle", "blue square"))(image)
    assert tagged == fixed and len(fixed.boxes) == 16
    assert make_detector(str(owlv2_dir), threshold=0.0, tagger=FixedTagger())(image) == BoxRecord()  # no tags


def test_polyfocus_boxes_queries_the_detector_with_each_images_clip_tags(tmp_path):
    """--tagger: a CLIP's top tags for each image (softmax over "a photo of a {tag}." for the tag list, as
    transformers' CLIPModel scores them) are that image's queries; synthworld's detector keeps matching objects."""
    from transformers import AutoProcessor, CLIPModel

    from polyfocus.cli import main
    from polyfocus.synthworld.scenes import export

    from test_densefusion_helpers import tiny_clip

    export(str(tmp_path / "data"), 6, image_size=64, families=["colour"], max_objects=3)
    tags = ["red", "blue", "green", "star", "circle", "square"]
    (tmp_path / "tags.txt").write_text("\n".join(tags) + "\n")
    tiny_clip(tmp_path / "clip")
    main(["boxes", str(tmp_path / "data" / "train.json"), "--out", str(tmp_path / "b.json"), "--detector",
          "synthworld", "--tagger", str(tmp_path / "clip"), "--tag-list", str(tmp_path / "tags.txt"), "--top-k", "2",
          "--min-probability", "0"])
    written = read_box_json(tmp_path / "b.json")
    model, processor = CLIPModel.from_pretrained(tmp_path / "clip"), AutoProcessor.from_pretrained(tmp_path / "clip")
    samples = json.loads((tmp_path / "data" / "train.json").read_text())
    for sample in samples:
        image = Image.open(tmp_path / "data" / sample["image"])
        inputs = processor(text=[f"a photo of a {t}." for t in tags], images=image, padding=True, return_tensors="pt")
        with torch.no_grad():
            top = model(**inputs).logits_per_image[0].topk(2).indices.tolist()
        everything = make_detector("synthworld")(image)
        want = [i for i, label in enumerate(everything.labels) if any(tags[t] in label.split() for t in top)]
        assert written[str(sample["id"])].boxes == [everything.boxes[i] for i in want], sample["id"]
    assert sum(len(r.boxes) for r in written.values()) < sum(
        len(make_detector("synthworld")(Image.open(tmp_path / "data" / x["image"])).boxes) for x in samples)
    base = ["boxes", str(tmp_path / "data" / "train.json"), "--out", str(tmp_path / "c.json"), "--detector",
            "synthworld", "--tagger", str(tmp_path / "clip")]
    with pytest.raises(SystemExit, match="--tagger .* and --tag-list .* go together"):
        main(base)
    for extra in (["--queries", "red"], ["--top-k", "0"]):
        with pytest.raises(SystemExit, match="it takes no --scenes or --queries, and --top-k >= 1"):
            main(base + ["--tag-list", str(tmp_path / "tags.txt"), *extra])
    assert not (tmp_path / "c.json").exists()


# ---- `polyfocus boxes`, the dataset, the pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("mg_boxes")
    export(str(root / "data"), 4, image_size=128, families=["colour", "count"])
    build_tokenizer(save_dir=root / "tok")
    return root


def test_polyfocus_boxes_writes_the_detectors_or_the_true_boxes(synth_data, tmp_path):
    from polyfocus.cli import main

    data = synth_data / "data"
    main(["boxes", str(data / "train.json"), "--out", str(tmp_path / "det.json"), "--detector", "synthworld"])
    main(["boxes", str(data / "train.json"), "--out", str(tmp_path / "truth.json"), "--scenes",
          str(data / "scenes.jsonl")])
    detected, truth = read_box_json(tmp_path / "det.json"), read_box_json(tmp_path / "truth.json")
    samples = json.loads((data / "train.json").read_text())
    assert sorted(detected) == sorted(truth) == sorted(s["id"] for s in samples)
    scenes = {json.loads(line)["id"]: json.loads(line) for line in (data / "scenes.jsonl").read_text().splitlines()}
    for sample in samples:
        objects = scenes[sample["scene_id"]]["objects"]
        assert truth[sample["id"]].boxes == [[float(v) for v in o["box"]] for o in objects]
        assert sorted(detected[sample["id"]].boxes) == sorted(truth[sample["id"]].boxes)
    with pytest.raises(SystemExit, match="give --detector"):
        main(["boxes", str(data / "train.json"), "--out", str(tmp_path / "x.json")])


def make_dataset(synth_data, box_json=None, detector=None, max_length=2048, strict=True):
    from transformers import AutoTokenizer

    from polyfocus.data.dataset import SupervisedDataset
    from polyfocus.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(synth_data / "tok")
    processor = ImageProcessor(image_size=128, aspect_ratio="pad")
    records = read_box_json(box_json) if box_json else None
    boxes = ObjectBoxes(processor, BoxPolicy(), records, detector, max_length, str(box_json))
    return SupervisedDataset(synth_data / "data" / "train.json", None, tokenizer, get_template("v1"), processor,
                             image_token_id=5, image_seq_len=16, model_max_length=max_length, strict=strict,
                             object_boxes=boxes)


def test_one_box_json_for_several_data_files_is_read_once_and_shared(synth_data, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from polyfocus.cli import main
    from polyfocus.data import boxes as boxes_module
    from polyfocus.data.templates import get_template
    from polyfocus.train.run import build_dataset

    data = synth_data / "data"
    main(["boxes", str(data / "train.json"), "--out", str(tmp_path / "b.json"), "--detector", "synthworld"])
    reads = []
    monkeypatch.setattr(boxes_module, "read_box_json", lambda f, read=boxes_module.read_box_json: reads.append(f) or
                        read(f))
    data_args = SimpleNamespace(data_path=[str(data / "train.json")] * 2, box_json_path=[str(tmp_path / "b.json")],
                                image_folder=None, strict_data=True, validate_data=True,
                                validate_images="header")
    _, model = plain_and_mg(object_tokens=True)
    dataset = build_dataset(data_args, SimpleNamespace(model_max_length=2048), model,
                            AutoTokenizer.from_pretrained(synth_data / "tok"), get_template("v1"),
                            ImageProcessor(image_size=128, aspect_ratio="pad"))
    first, second = dataset.datasets
    assert reads == [str(tmp_path / "b.json")] and first.object_boxes is second.object_boxes
    assert len(dataset) == 2 * len(first) and dataset[len(first)]["image_boxes"].equal(dataset[0]["image_boxes"])


def test_dataset_items_hold_one_token_per_box_after_the_images(synth_data, tmp_path):
    from polyfocus.cli import main
    from polyfocus.data.dataset import DataCollator

    main(["boxes", str(synth_data / "data" / "train.json"), "--out", str(tmp_path / "b.json"), "--scenes",
          str(synth_data / "data" / "scenes.jsonl")])
    dataset = make_dataset(synth_data, box_json=tmp_path / "b.json")
    item = dataset[0]
    truth = read_box_json(tmp_path / "b.json")[str(dataset.samples[0].id)]
    assert item["image_boxes"].shape == (len(truth.boxes), 5) and not item["image_boxes"][:, 0].any()
    assert int((item["input_ids"] == 5).sum()) == 16 + len(truth.boxes)
    assert item["image_boxes"][:, 1:].tolist() == [[float(v) for v in b] for b in truth.boxes]  # 128 px: same frame
    batch = DataCollator(pad_token_id=0)([dataset[0], dataset[1], dataset[2]])
    assert batch["image_boxes"][:, 0].tolist() == [0.0] * len(item["image_boxes"]) + \
        [1.0] * len(dataset[1]["image_boxes"]) + [2.0] * len(dataset[2]["image_boxes"])
    calls = []
    synthworld = make_detector("synthworld")
    detecting = make_dataset(synth_data, detector=lambda image: calls.append(1) or synthworld(image))
    assert sorted(detecting[0]["image_boxes"].tolist()) == sorted(item["image_boxes"].tolist())
    for _ in range(2):
        for i in range(len(detecting)):
            detecting[i]
    assert len(calls) == len({s.images[0] for s in detecting.samples})  # once per image file, not per sample


def test_a_sample_missing_from_the_box_json_is_named(synth_data, tmp_path):
    samples = json.loads((synth_data / "data" / "train.json").read_text())
    write_box_json({samples[0]["id"]: BoxRecord()}, tmp_path / "b.json")
    from polyfocus.data.formats import DataError

    dataset = make_dataset(synth_data, box_json=tmp_path / "b.json")
    assert dataset[0]["image_boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0]]  # no detections: the dummy box
    with pytest.raises(DataError, match=rf"train.json: sample id '{samples[1]['id']}': no boxes for this sample in"):
        dataset.validate()
    lenient = make_dataset(synth_data, box_json=tmp_path / "b.json", strict=False)
    lenient.validate()
    assert len(lenient) == 1 and len(lenient.skipped["boxes"]) == len(samples) - 1


def test_pipeline_detects_boxes_for_a_model_with_object_tokens(synth_data):
    """Inference: the model's detector (config.box_detector) gives each image's boxes; the prompt holds 16 + one
    image id per box; explicit boxes replace the detector's; generation runs."""
    from transformers import AutoTokenizer

    from polyfocus.infer.pipeline import Pipeline
    from polyfocus.synthworld.scenes import make_scene, render

    _, model = plain_and_mg(object_tokens=True, box_detector="synthworld")
    tokenizer = AutoTokenizer.from_pretrained(synth_data / "tok")
    pipe = Pipeline(model, tokenizer, ImageProcessor(image_size=128), template="v1")
    scene = make_scene(5, 128, max_objects=3)
    inputs = pipe.prepare([(render(scene), "What colour?")])
    assert len(inputs["image_boxes"]) == len(scene.objects)
    assert int((inputs["input_ids"] == 4).sum()) == 16 + len(scene.objects)
    given = pipe.prepare([(render(scene), "What colour?")], boxes=[[BoxRecord([[0, 0, 64, 64]], [1.0], ["x"])]])
    assert given["image_boxes"].tolist() == [[0.0, 0.0, 0.0, 64.0, 64.0]]
    assert isinstance(pipe.generate([(render(scene), "What colour?")], max_new_tokens=2)[0], str)
    no_detector = Pipeline(plain_and_mg(object_tokens=True)[1], tokenizer, ImageProcessor(image_size=128), "v1")
    with pytest.raises(BoxError, match="set the model's box_detector"):
        no_detector.prepare([(render(scene), "What colour?")])


def mg_pipeline(synth_data, **fields):
    from transformers import AutoTokenizer

    from polyfocus.infer.pipeline import Pipeline

    _, model = plain_and_mg(object_tokens=True, **fields)
    return Pipeline(model.eval(), AutoTokenizer.from_pretrained(synth_data / "tok"), ImageProcessor(image_size=128),
                    template="v1")


def ask_server(base: str, png: bytes, **request):
    import httpx

    from serve_helpers import data_url

    content = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "What colour?"}]
    return httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "mg", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": content}],
        **request})


def test_the_server_counts_object_tokens_and_answers_as_the_pipeline(synth_data):
    """`polyfocus serve` with MG-LLaVA: the usage's prompt count holds one image id per detected box (as the prompt
    the model sees); the detector runs once per image (the batch reuses the job's detections) and the answer is the
    pipeline's, with DualFocus too; a model with object tokens and no detector is refused at start."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from polyfocus.infer.server import ServeSettings, create_app
    from polyfocus.synthworld.scenes import make_scene, render

    from serve_helpers import running_server

    pipe = mg_pipeline(synth_data, box_detector="synthworld")
    detect, calls = pipe.object_boxes.detector, []
    pipe.object_boxes.detector = lambda image: calls.append(1) or detect(image)
    scene = make_scene(5, 128, max_objects=3)
    buffer = io.BytesIO()
    render(scene).save(buffer, "PNG")
    settings = ServeSettings(model_name="mg", max_model_len=512)
    with running_server(create_app(pipe, settings)) as base:
        reply = ask_server(base, buffer.getvalue())
        detections = len(calls)
        dualfocus = ask_server(base, buffer.getvalue(), strategy="dualfocus")
    assert reply.status_code == 200, reply.text
    assert detections == 1
    image = Image.open(io.BytesIO(buffer.getvalue()))
    prompt = pipe.prepare([([image], "What colour?")])["input_ids"][0]
    assert reply.json()["usage"]["prompt_tokens"] == len(prompt) == len(pipe.encode(
        [{"role": "user", "content": "<image>\nWhat colour?"}], 1)) + len(scene.objects)
    assert reply.json()["choices"][0]["message"]["content"] == pipe.generate([([image], "What colour?")],
                                                                            max_new_tokens=3)[0]
    assert dualfocus.status_code == 200, dualfocus.text
    assert dualfocus.json()["choices"][0]["message"]["content"] == pipe.generate(
        [([image], "What colour?")], max_new_tokens=3, strategy="dualfocus")[0]
    with pytest.raises(ValueError, match="object tokens but no box_detector"):
        create_app(mg_pipeline(synth_data), settings)


def test_dualfocus_scores_with_the_image_and_crop_object_tokens(synth_data):
    """DualFocus on a model with object tokens: its perplexity pass feeds the image's and the crop's detected boxes,
    one object token each (the mean NLL of a hand-built forward with them), and it takes the reference path."""
    from polyfocus.config import IGNORE_INDEX
    from polyfocus.data.boxes import indexed
    from polyfocus.data.templates import encode
    from polyfocus.infer.dualfocus import DualFocus, make_item, run_steps, steps
    from polyfocus.synthworld.scenes import make_scene, render

    pipe = mg_pipeline(synth_data, box_detector="synthworld")
    df = DualFocus(pipe)
    assert not df.cached
    image = render(make_scene(5, 128, max_objects=3))
    item = make_item([image], "What colour is it?", 0)
    replies = iter([["red", "[0.10, 0.10, 0.60, 0.60]"], ["red"]])
    run_steps(steps(item), lambda asks: next(replies), None)
    boxes = [pipe.image_boxes(item.image, None), pipe.image_boxes(item.crop, None)]
    config = pipe.model.config
    enc = encode(item.score_messages(item.result.box_text, "dark blue"), pipe.tokenizer, pipe.template,
                 config.image_token_id, [config.num_image_tokens + len(b) for b in boxes])
    with torch.inference_mode():
        logits = pipe.model(input_ids=torch.tensor([enc.input_ids]), pixel_values=pipe.image_processor(
            [item.image, item.crop]), image_boxes=indexed(boxes)).logits[0]
        labels = torch.tensor(enc.labels[1:])
        nll = -torch.log_softmax(logits[:-1].float(), -1)[labels != IGNORE_INDEX].gather(
            1, labels[labels != IGNORE_INDEX, None]).squeeze(1)
        assert len(boxes[0]) == 3 and df.score(item, "dark blue") == pytest.approx(nll.mean().item(), rel=1e-5)


def test_image_size_of_a_model_with_the_high_resolution_branch():
    from polyfocus.infer.pipeline import load_image_processor

    _, model = plain_and_mg()
    assert load_image_processor(None, model.config).image_size == 128 == model.config.hires_image_size
    assert math.isclose(TINY_HIRES["hidden_sizes"][-1], model.mm_fusion.slow_conv.in_channels)
