"""The demo's tower pretraining: box pooling weights, the object dataset, and a saved tower that loads."""

import torch
from transformers import AutoModel

from polyfocus.data.images import ImageProcessor
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import COLOURS, SHAPES, make_scene, render
from polyfocus.synthworld.tower import ObjectClassifier, SceneObjects, box_weights, collate_objects, pretrain_tower

ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES)}


def test_box_weights_are_the_covered_fraction_of_each_patch():
    # 28 px, 14 px patches: a 2 x 2 grid, patches in row-major order.
    boxes = torch.tensor([[7, 0, 21, 14],     # half of patch (0, 0), half of (0, 1)
                          [0, 0, 28, 28],     # everything
                          [10, 10, 20, 24]])  # columns 4 | 6 px, rows 4 | 10 px
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4, [16 / 140, 24 / 140, 40 / 140, 60 / 140]])
    torch.testing.assert_close(box_weights(boxes, 28, 14), expected)


def test_objects_carry_their_scene_labels_and_pool_only_their_own_image():
    dataset = SceneObjects(4, ImageProcessor(image_size=56), 14, ATTRIBUTES, max_objects=3, split="t", seed=5)
    scene = make_scene("5/t/1", 56, 3)
    item = dataset[1]
    assert torch.equal(item["pixel_values"], ImageProcessor(image_size=56)([render(scene)])[0])
    assert [ATTRIBUTES["colour"][i] for i in item["colour"]] == [o.colour for o in scene.objects]
    assert [ATTRIBUTES["shape"][i] for i in item["shape"]] == [o.shape for o in scene.objects]

    batch = collate_objects([dataset[0], dataset[1]])
    n0 = len(dataset[0]["colour"])
    assert batch["image_index"].tolist() == [0] * n0 + [1] * len(scene.objects)
    # Pooling reads each object's own image: changing image 0 changes only image 0's objects' logits.
    torch.manual_seed(0)
    model = ObjectClassifier(AutoModel.from_config(tiny_config().vision_config), -2, ATTRIBUTES).eval()
    captured = []
    model.heads["colour"].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(**batch)
        batch["pixel_values"][0] = 0
        model(**batch)
    changed = (captured[0] - captured[1]).abs().amax(1) > 0
    assert changed.tolist() == [True] * n0 + [False] * len(scene.objects)


def test_pretrained_tower_is_saved_as_a_transformers_checkpoint(tmp_path):
    config = tiny_config().vision_config
    accuracy = pretrain_tower(config, tmp_path / "tower", steps=3, batch_size=4, test_scenes=8)
    assert set(accuracy) == {"colour", "shape"} and all(0 <= v <= 1 for v in accuracy.values())
    tower = AutoModel.from_pretrained(tmp_path / "tower")
    torch.manual_seed(0)
    fresh = AutoModel.from_config(config)
    trained = dict(tower.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters())  # it trained
    assert ImageProcessor.from_pretrained(tmp_path / "tower").image_size == 56
