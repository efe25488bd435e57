"""bench/demo_binding.py: which patches a box touches and the attention shares, counted by hand."""

from types import SimpleNamespace

import torch
from bench_helpers import load_bench_script

bench = load_bench_script("demo_binding")


def test_a_box_touches_the_14px_patches_it_overlaps_row_major():
    assert bench.patches([0, 0, 14, 14]) == [0]  # exactly the first patch: its right/bottom edges touch nothing more
    assert bench.patches([10, 10, 20, 30]) == [0, 1, 8, 9, 16, 17]  # columns 0-1, rows 0-2 of the 8 x 8 grid
    assert bench.patches([100, 100, 112, 112]) == [63]


def test_attention_on_the_object_and_on_the_others_never_counts_a_shared_patch_twice():
    obj, other = SimpleNamespace(box=[0, 0, 20, 14]), SimpleNamespace(box=[14, 0, 30, 14])  # share patch 1
    weights = torch.zeros(64)
    weights[[0, 1, 2, 5]] = torch.tensor([0.25, 0.25, 0.125, 0.375])
    own, others = bench.attention_share(weights, obj, [obj, other])
    assert (own, others) == (0.5, 0.125)  # patches 0+1 are the object's; 2 is only the other's; 5 is background
    assert bench.attention_share(weights, obj, [obj]) == (0.5, 0.0)


def test_summary_averages_per_scene_size():
    summary = bench.summarise([(1, True, 0.5, 0.0), (2, True, 0.4, 0.2), (2, False, 0.2, 0.4)])
    assert summary == {"1": {"accuracy": 1.0, "attention_on_object": 0.5, "attention_on_others": 0.0},
                       "2": {"accuracy": 0.5, "attention_on_object": 0.3, "attention_on_others": 0.3}}
