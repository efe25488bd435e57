"""The demo's tower pretraining: box pooling weights, the object dataset, and a saved tower that loads."""

import pytest
import torch
from transformers import AutoModel

from polyfocus.data.images import ImageProcessor
from polyfocus.data.synthworld import COLOURS, SHAPES, export
from polyfocus.model.presets import tiny_config
from polyfocus.train.tower import ObjectBoxes, ObjectClassifier, box_weights, collate_objects, pretrain_tower

ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES)}


def test_box_weights_are_the_covered_fraction_of_each_patch():
    # 28 px, 14 px patches: a 2 x 2 grid, patches in row-major order.
    boxes = torch.tensor([[7, 0, 21, 14],     # half of patch (0, 0), half of (0, 1)
                          [0, 0, 28, 28],     # everything
                          [10, 10, 20, 24]])  # columns 4 | 6 px, rows 4 | 10 px
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4, [16 / 140, 24 / 140, 40 / 140, 60 / 140]])
    torch.testing.assert_close(box_weights(boxes, 28, 14), expected)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("world")
    export(str(data), 6, image_size=56, families=["colour"], split="pretrain", max_objects=3)
    export(str(data), 3, image_size=56, families=["colour"], split="test", max_objects=3)
    return data


def test_objects_carry_their_scene_labels_and_pool_only_their_own_image(world):
    dataset = ObjectBoxes(world, "pretrain", ImageProcessor(image_size=56), 14, ATTRIBUTES)
    scene = dataset.scenes[1]
    item = dataset[1]
    assert [ATTRIBUTES["colour"][i] for i in item["colour"]] == [o["colour"] for o in scene["objects"]]
    assert [ATTRIBUTES["shape"][i] for i in item["shape"]] == [o["shape"] for o in scene["objects"]]

    batch = collate_objects([dataset[0], dataset[1]])
    n0 = len(dataset.scenes[0]["objects"])
    assert batch["image_index"].tolist() == [0] * n0 + [1] * len(scene["objects"])
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
    assert changed.tolist() == [True] * n0 + [False] * len(scene["objects"])


def test_a_scene_rendered_at_another_size_is_refused(world):
    with pytest.raises(ValueError, match="rendered at 56 px, the tower reads 112 px"):
        ObjectBoxes(world, "pretrain", ImageProcessor(image_size=112), 14, ATTRIBUTES)[0]


def test_pretrained_tower_is_saved_as_a_transformers_checkpoint(world, tmp_path):
    config = tiny_config().vision_config
    accuracy = pretrain_tower(config, world, tmp_path / "tower", steps=3, batch_size=4)
    assert set(accuracy) == {"colour", "shape"} and all(0 <= v <= 1 for v in accuracy.values())
    tower = AutoModel.from_pretrained(tmp_path / "tower")
    torch.manual_seed(0)
    fresh = AutoModel.from_config(config)
    trained = dict(tower.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters())  # it trained
    assert ImageProcessor.from_pretrained(tmp_path / "tower").image_size == 56
