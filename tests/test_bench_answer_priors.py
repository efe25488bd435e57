"""bench/answer_priors.py: the modal share per question form, counted by hand."""

import pytest

from bench_helpers import load_bench_script


@pytest.fixture
def bench():
    return load_bench_script("answer_priors")


def test_question_forms(bench):
    assert bench.question_form("Is the red star above or below the circle?") == "above or below"
    assert bench.question_form("Is the star to the left or to the right of the circle?") == \
        "to the left or to the right"
    assert bench.question_form("Is there a red star in the image?") == ""


def test_one_fixed_answer_per_form_has_modal_share_one(bench):
    forms = ["ud", "ud", "lr", "lr", "lr"]
    assert bench.modal_share(["above", "above", "left", "left", "left"], forms) == 1.0
    # ud: above 2 of 2; lr: left 2 of 3 -> 4 / 5 (not 3 / 5, the most common answer over all forms)
    assert bench.modal_share(["above", "above", "left", "left", "right"], forms) == pytest.approx(4 / 5)
    assert bench.modal_share(["yes", "no", "no", "yes"], [""] * 4) == pytest.approx(2 / 4)
