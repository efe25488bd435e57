"""Scoring of synthworld answers (polyfocus.synthworld.scorer): normalisation, option letters, IoU,
captions, per-family accuracy, the majority baseline and the printed table."""

import pytest

from polyfocus.data.formats import Sample, load_samples
from polyfocus.data.prompts import iou, parse_box
from polyfocus.synthworld.scenes import export
from polyfocus.synthworld.scorer import (
    caption_score, evaluate, format_table, majority_answers, majority_baseline, mentions, normalize_answer,
    option_letter, question_of, reference_of, score,
)
from polyfocus.synthworld.tasks import FAMILIES


def _sample(family, answer, question="q?", **meta):
    return Sample(id=None, images=["x.png"], extra={"family": family, "meta": meta},
                  messages=[{"role": "user", "content": "<image>\n" + question},
                            {"role": "assistant", "content": answer}])


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = export(str(out), 12, seed=3, image_size=96, split="test")
    samples = load_samples(summary["json"])
    assert {s.extra["family"] for s in samples} == set(FAMILIES)  # every family is exercised
    return samples


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("text, expected", [
    ("Red", "red"),
    ("  The red.  ", "red"),
    ("a Star!", "star"),
    ("Two", "2"),
    ("none", "0"),
    ("ten apples", "10 apples"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("left, right", "left right"),
    ("an (orange) circle?", "orange circle"),
    ("K7Q", "k7q"),
    ("Yes.\n", "yes"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ----------------------------------------------------------------------------- option letters

@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("B.", "B"), (" B. red", "B"), ("(B) red", "B"), ("(B)", "B"), ("B)", "B"),
    ("C: 5", "C"), ("The answer is D.", "D"), ("I think the answer is (A)", "A"),
    ("A red star", None),    # the article is not option A
    ("Blue", None),          # starts with B, is not B
    ("", None),
    ("E.", None),            # only four options
])
def test_option_letter(prediction, letter):
    assert option_letter(prediction) == letter


def test_option_letter_falls_back_to_option_text():
    options = ["red", "blue", "green", "black"]
    assert option_letter("Green.", options) == "C"
    assert option_letter("purple", options) is None
    assert option_letter("B", options) == "B"  # a letter wins over text
    assert option_letter("two", ["1", "2", "3", "4"]) == "B"  # via number words


def test_mc_scoring():
    sample = _sample("mc", "C", options=["1", "6", "5", "2"])
    assert [score(sample, p) for p in ("C", "C.", "(C) 5", "5", "The answer is C")] == [1.0] * 5
    assert [score(sample, p) for p in ("A", "B. 6", "6", "", "c")] == [0.0] * 5


# ----------------------------------------------------------------------------- grounding

def test_iou_hand_made_boxes():
    unit = (0, 0, 1, 1)
    assert iou(unit, unit) == 1.0
    assert iou(unit, (0, 0, 0.5, 1)) == 0.5  # inter 0.5, union 1
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # inter 1, union 4 + 4 - 1
    assert iou(unit, (2, 2, 3, 3)) == 0.0
    assert iou(unit, (1, 0, 0, 1)) == 0.0  # inverted box: no area


def test_parse_box_takes_first_four_numbers():
    assert parse_box("[0.12, 0.34, 0.56, 0.78]") == (0.12, 0.34, 0.56, 0.78)
    assert parse_box("It is at 0.1 0.2 0.3 0.4, maybe 0.9") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box("[0.1, 0.2, 0.3]") is None


def test_grounding_iou_boundary():
    sample = _sample("grounding", "[0.00, 0.00, 1.00, 1.00]")
    assert score(sample, "[0.00, 0.00, 0.50, 1.00]") == 1.0  # IoU exactly 0.5 counts
    assert score(sample, "[0.00, 0.00, 0.49, 1.00]") == 0.0
    assert score(sample, "0, 0, 1, 1") == 1.0
    assert score(sample, "the whole image") == 0.0


# ----------------------------------------------------------------------------- short answers

def test_short_answers_exact_after_normalisation():
    assert score(_sample("colour", "red"), "The red.") == 1.0
    assert score(_sample("colour", "red"), "dark red") == 0.0
    assert score(_sample("count", "3"), "three") == 1.0
    assert score(_sample("count", "3"), "13") == 0.0
    assert score(_sample("text", "K7Q"), "k7q") == 1.0
    assert score(_sample("text", "K7Q"), "K7O") == 0.0
    assert score(_sample("spatial", "left"), "Left.") == 1.0
    assert score(_sample("spatial", "left"), "right") == 0.0


def test_existence_reads_a_leading_yes_or_no():
    yes = _sample("existence", "yes")
    assert [score(yes, p) for p in ("Yes", "yes, there is one.", "Yes.")] == [1.0] * 3
    assert [score(yes, p) for p in ("No", "no, yes", "there is", "")] == [0.0] * 4


# ----------------------------------------------------------------------------- captions

def test_caption_mentions():
    assert mentions("A red star, two blue circles and three black crosses on a pale blue "
                    "background.") == {"red star", "blue circle", "black cross"}
    assert mentions('At the top there is a large white diamond with a label reading "C7A", to '
                    'the right of the triangle.') == {"white diamond", "C7A"}


def test_caption_score_is_f1_of_mentions():
    reference = "A red star, two blue circles and a green ring on a grey background."
    assert caption_score(reference, reference) == 1.0
    # 2 of 3 kinds, nothing invented: P = 1, R = 2/3 -> F1 = 0.8
    assert caption_score(reference, "Two blue circles and a red star.") == pytest.approx(0.8)
    # all 3 kinds plus 1 invented: P = 3/4, R = 1 -> F1 = 6/7
    assert caption_score(reference, "A red star, a blue circle, a green ring and a black "
                                    "square.") == pytest.approx(6 / 7)
    assert caption_score(reference, "A picture.") == 0.0


# ----------------------------------------------------------------------------- on real exports

def test_question_and_reference_split_the_conversation(test_split):
    for sample in test_split:
        question = question_of(sample)
        assert question + [sample.messages[-1]] == sample.messages
        assert question[-1]["role"] == "user" and "<image>" in question[0]["content"]
        assert reference_of(sample) == sample.messages[-1]["content"]
    question_of(test_split[0]).append({"role": "assistant", "content": "x"})
    assert len(test_split[0].messages) == 2  # question_of copied


def test_own_reference_scores_100_percent_in_every_family(test_split):
    results = evaluate(test_split, [reference_of(s) for s in test_split])
    assert set(results) == set(FAMILIES) | {"all"}
    for family, r in results.items():
        assert r["accuracy"] == 1.0, family
    assert results["all"]["n"] == len(test_split)
    assert sum(results[f]["n"] for f in FAMILIES) == len(test_split)


WRONG = {"colour": "chartreuse", "shape": "pentagon", "count": "99", "existence": "maybe",
         "text": "???", "spatial": "inside", "mc": "E", "grounding": "[2.00, 2.00, 3.00, 3.00]",
         "caption": "A picture.", "dense_caption": "Nothing to see here.", "chat": "Purple elephants dance.",
         "facts": "The elephant is purple."}


def test_wrong_answers_score_zero_in_every_family(test_split):
    results = evaluate(test_split, [WRONG[s.extra["family"]] for s in test_split])
    assert all(r["accuracy"] == 0.0 for r in results.values()), results


def test_opposite_answers_score_zero(test_split):
    """Plausible but wrong: the other yes/no, another letter, the box shifted off the object."""
    for sample in test_split:
        family, reference = sample.extra["family"], reference_of(sample)
        if family == "existence":
            wrong = {"yes": "no", "no": "yes"}[reference]
        elif family == "mc":
            wrong = "ABCD"[("ABCD".index(reference) + 1) % 4]
        elif family == "grounding":
            x1, y1, x2, y2 = parse_box(reference)
            wrong = str([x2 + 0.01, y1, x2 + 0.01 + (x2 - x1), y2])
        else:
            continue
        assert score(sample, wrong) == 0.0, (family, reference, wrong)


def test_evaluate_checks_alignment(test_split):
    with pytest.raises(ValueError):
        evaluate(test_split, ["red"])


# ----------------------------------------------------------------------------- majority baseline

def test_majority_baseline_hand_computed():
    train = [_sample("colour", "red"), _sample("colour", "red"), _sample("colour", "blue"),
             _sample("existence", "no"), _sample("existence", "yes"), _sample("existence", "no"),
             _sample("grounding", "[0.00, 0.00, 0.40, 0.40]"),
             _sample("grounding", "[0.20, 0.20, 0.60, 0.60]"),
             _sample("mc", "A"), _sample("mc", "B"), _sample("mc", "B")]
    answers = majority_answers(train)
    assert answers == {"colour": "red", "existence": "no", "grounding": "[0.10, 0.10, 0.50, 0.50]",
                       "mc": "B"}

    test = [_sample("colour", "red"), _sample("colour", "green"),              # 1/2
            _sample("existence", "no"), _sample("existence", "yes"),
            _sample("existence", "no"), _sample("existence", "no"),            # 3/4
            _sample("grounding", "[0.10, 0.10, 0.50, 0.50]"),                  # IoU 1
            _sample("grounding", "[0.30, 0.10, 0.70, 0.50]"),                  # IoU 1/3
            _sample("mc", "A", options=["1", "2", "3", "4"]),                  # 0/1
            _sample("shape", "star")]                                          # unseen: 0/1
    baseline = majority_baseline(train, test)
    assert baseline == {"colour": 0.5, "existence": 0.75, "grounding": 0.5, "mc": 0.0,
                        "shape": 0.0, "all": pytest.approx(5 / 10)}


def test_majority_baseline_on_exports(tmp_path, test_split):
    train = load_samples(export(str(tmp_path), 20, seed=3, image_size=96, split="train")["json"])
    baseline = majority_baseline(train, test_split)
    assert set(baseline) == set(FAMILIES) | {"all"}
    assert all(0.0 <= v <= 1.0 for v in baseline.values())
    assert baseline["all"] < 1.0  # the image matters


# ----------------------------------------------------------------------------- table

def test_format_table():
    results = {"colour": {"n": 3, "accuracy": 2 / 3}, "grounding": {"n": 1, "accuracy": 0.0},
               "all": {"n": 4, "accuracy": 0.5}}
    baseline = {"colour": 1 / 3, "grounding": 0.125, "all": 0.284}
    table = format_table(results, baseline)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["family", "n", "accuracy",
                                                        "majority baseline"]
    rows = [[c.strip() for c in line.split("|")] for line in lines[2:]]
    assert rows == [["colour", "3", "66.7", "33.3"],
                    ["grounding", "1", "0.0", "12.5"],
                    ["all", "4", "50.0", "28.4"]]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_format_table_without_baseline():
    rows = format_table({"mc": {"n": 2, "accuracy": 1.0}}).splitlines()
    assert [c.strip() for c in rows[2].split("|")] == ["mc", "2", "100.0", "-"]
