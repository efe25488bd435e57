"""bench/dualfocus_breakdown.py: the per-family counts on hand-made answers, worked out by hand."""

import json

import pytest

from polyfocus.data.formats import load_samples
from polyfocus.infer.dualfocus import DualFocusResult

from bench_helpers import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("dualfocus_breakdown")


def colour_sample(i, answer, boxes):
    return {"id": f"q{i}", "image": "a.png", "family": "colour", "boxes": boxes, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": answer}]}


def test_breakdown_counts_by_hand(bench, tmp_path):
    records = [colour_sample(0, "red", [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]),
               colour_sample(1, "blue", [[0.0, 0.0, 1.0, 1.0]]),
               colour_sample(2, "green", [[0.0, 0.0, 0.5, 0.5]])]
    (tmp_path / "test.json").write_text(json.dumps(records))
    samples = load_samples(tmp_path / "test.json")
    results = [
        # differ, micro chosen and right; box = the second evidence box: IoU 1; the crop holds it (100 px image)
        DualFocusResult("red", macro="blue", box_text="[0.50, 0.50, 1.00, 1.00]", crop_box=(40, 40, 100, 100),
                        micro="red", choice="micro"),
        # differ, macro kept and right; box a quarter of the evidence: IoU 0.25; the crop cuts the evidence
        DualFocusResult("blue", macro="blue", box_text="[0.00, 0.00, 0.50, 0.50]", crop_box=(0, 0, 60, 60),
                        micro="red", choice="macro"),
        # no box: no zoom, the macro answer (wrong)
        DualFocusResult("red", macro="red", box_text="no box", reason="no box"),
    ]
    (colour,) = bench.breakdown(samples, results, [(100, 100)] * 3).values()
    assert colour == {"questions": 3, "macro": pytest.approx(1 / 3, abs=1e-4), "micro": 0.5,
                      "chosen": pytest.approx(2 / 3, abs=1e-4), "zoomed": 2, "differ": 2,
                      "micro_chosen_when_differ": 1, "box_iou": 0.625, "evidence_in_crop": 0.5,
                      "crop_area": pytest.approx((0.36 + 0.36) / 2),
                      # the second question's crop misses its evidence: the macro answer was kept, and it is right
                      "crop_missed": 1, "micro_chosen_when_missed": 0, "chosen_right_when_missed": 1.0}
