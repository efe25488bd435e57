"""bench/visual_word_agreement.py: chance is the best single word said on every patch, counted by hand."""


import pytest

from polyfocus.data.images import ImageProcessor
from polyfocus.synthworld.scenes import Scene, SceneObject

from bench_helpers import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("visual_word_agreement")


def test_best_constant_word_is_the_largest_share_of_on_object_patches(bench):
    # 112 px, 8 x 8 patches of 14 px, centres at 7, 21, 35, ...: a red circle over 2 x 2 centres, a blue square
    # over 3 x 3, a green square over 2 x 2 -> 17 patches on objects
    objects = [SceneObject("circle", "red", "large", (0, 0, 28, 28)),
               SceneObject("square", "blue", "large", (56, 56, 98, 98)),
               SceneObject("square", "green", "large", (0, 56, 28, 84))]
    scene = Scene("s", 0, 112, "grey", "plain", 0, objects)
    best = bench.best_constant_word([scene], ImageProcessor(image_size=112), side=8)
    assert best == pytest.approx({"either": 13 / 17, "shape": 13 / 17, "colour": 9 / 17})


def test_word_statistics_uniform_words_have_entropy_log_vocab(bench):
    import math
    from types import SimpleNamespace

    import torch

    head = torch.nn.Linear(4, 6, bias=False)
    torch.nn.init.zeros_(head.weight)  # every patch: the uniform distribution over 6 words
    model = SimpleNamespace(device="cpu", vm_head=head, get_image_features=lambda pixels: torch.ones(1, 64, 4))
    scene = Scene("s", 0, 112, "grey", "plain", 0, [SceneObject("circle", "red", "large", (0, 0, 28, 28))])
    stats = bench.word_statistics(model, ImageProcessor(image_size=112), [scene])
    assert stats == {"entropy": pytest.approx(math.log(6), abs=1e-3), "log_vocab": round(math.log(6), 3),
                     "distinct_argmax_words": 1}
    with torch.no_grad():
        head.weight[2] = 100.0  # word 2 takes all the mass
    stats = bench.word_statistics(model, ImageProcessor(image_size=112), [scene])
    assert stats["entropy"] == pytest.approx(0.0, abs=1e-3) and stats["distinct_argmax_words"] == 1
