"""Scorers on hand-made cases with hand-computed results: the VQA normaliser and soft accuracy (EvalAI/m4c and the
official evaluator), and each benchmark's answer parsing and aggregation as its reference script does it."""

import random

import pytest

from polyfocus.data.prompts import mcq_letter
from polyfocus.eval.benchmarks.base import Row
from polyfocus.eval.benchmarks.judged import LLaVABench, mmvet_score, parse_review_scores
from polyfocus.eval.benchmarks.mmbench import MMBench, can_infer
from polyfocus.eval.benchmarks.mme import MME, mme_yes_no
from polyfocus.eval.benchmarks.mmmu import eval_open, parse_multi_choice_response, parse_open_response
from polyfocus.eval.benchmarks.pope import pope_metrics, pope_yes_no
from polyfocus.eval.benchmarks.refcoco import box_to_pixels
from polyfocus.eval.benchmarks.scienceqa import sqa_letter
from polyfocus.eval.vqa_eval import (
    normalize_answer, official_vqa_accuracy, process_punctuation, soft_score, textvqa_accuracy,
)

# ----------------------------------------------------------------------------- the VQA normaliser


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("Two dogs.", "2 dogs"),                   # number word, final period
    ("none", "0"), ("Ten", "10"),
    ("The cat's toy", "cat 's toy"),           # article dropped, "'s" split off (m4c's word_tokenize)
    ("dont", "don't"), ("isnt", "isn't"), ("whats up?", "what's up"), ("oclock", "o'clock"),
    ("Im", "im"),                              # quirk: the table's "Im" key is never reached after lower()
    ("1,000", "1000"),                         # commas are deleted outright
    ("3.5", "3.5"),                            # a period before a digit stays
    ("a.m.", "am"),
    ("e.g. the ball", "eg ball"),
    ("left-hand", "left hand"),                # a mark between letters becomes a space ...
    ("left - hand", "left hand"),              # ... but is deleted when it touches a space
    ("yes (very)", "yes very"),                # "(" touches a space: deleted; ")" does not: a space
    ("(yes)", "yes"),
    ("Hi!", "hi"),
    ("red\nball\tgame", "red ball game"),
    ("an apple", "apple"), ("a", ""),
    ("." * 40, "." * 8),                       # quirk: re.UNICODE passed as count removes 32 periods at most
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_process_punctuation_deletes_everywhere_once_a_number_has_a_comma():
    # vqaEval's rule: a digit-comma-digit anywhere deletes every mark instead of spacing it out.
    assert process_punctuation("left-hand") == "left hand"
    assert process_punctuation("1,2 left-hand") == "12 lefthand"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_score_of_ten_answers(matches, expected):
    # mean over the 10 leave-one-out subsets of min(1, matches / 3): 1 -> 9*(1/3)/10, 2 -> (2/3*2 + 8*2/3)/10, ...
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert soft_score("cat", answers) == pytest.approx(expected)


def test_textvqa_accuracy_normalises_both_sides():
    assert textvqa_accuracy("Nike.", ["nike", "NIKE"] + ["adidas"] * 8) == pytest.approx(0.6)
    assert textvqa_accuracy("The Two", ["2"] * 10) == 1.0
    assert textvqa_accuracy("puma", ["nike"] * 10) == 0.0


# Hand-derived from the official rules (GT-Vision-Lab/VQA vqaEval.py since a013f00, 2021) and checked against that
# code: newlines, tabs and outer spaces go from both sides; only when the human answers disagree are the prediction
# and the answers punctuation- and digit/article-processed.
@pytest.mark.parametrize("prediction, answers, expected", [
    ("two", ["two"] * 8 + ["2"] * 2, 1.0),               # before the fix: 0.6 (answers were not digit-mapped)
    ("dog", ["the dog"] * 9 + ["dog"], 1.0),             # before: 0.3 (articles stayed in the answers)
    ("2", ["two"] * 9 + ["2"], 1.0),                     # before: 0.3
    ("none", ["0"] * 3 + ["zero"] * 3 + ["nothing"] * 4, 1.0),
    ("a dog", ["dog"] * 3 + ["the dog"] * 3 + ["puppy"] * 4, 1.0),
    ("left-hand", ["left-hand"] * 9 + ["right"], 1.0),   # both sides "left hand"
    ("left-hand", ["left-hand"] * 10, 1.0),              # unanimous: nothing processed, on either side (before: 0)
    ("Two", ["2"] * 10, 0.0),                            # ... so a raw "Two" misses (an upload is already "2")
    ("The Cat's", ["cat's"] * 10, 0.0),                  # before: 1.0
    ("yes", [" yes\n"] * 10, 1.0),                       # the answers' breaks and spaces go (before: 0)
    ("yes", ["yes\t"] * 9 + ["yes"], 1.0),               # ... before the "disagree" test (before: 0.3)
    ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),
    ("1,000", ["1000"] * 5 + ["1,000"] * 5, 1.0),
])
def test_official_vqa_accuracy_follows_the_current_vqaEval(prediction, answers, expected):
    assert official_vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_score_is_of_the_evalai_upload():
    """What EvalAI scores is the uploaded (EvalAI-processed) answer: "Two" is uploaded as "2"."""
    from polyfocus.eval.benchmarks.vqa import VQAv2

    row = Row(question_id=1, prompt="", reference=["2"] * 10)
    assert VQAv2("unused").score_one(row, "Two") == {"score": 1.0, "submitted": "2"}
    assert official_vqa_accuracy("The Cat's", ["cat's"] * 10) == 0.0 and normalize_answer("The Cat's") == "cat 's"


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("reply, parsed", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a cat.", "no"), ("Yes. No.", "yes"),
    ("no, it is absent", "no"), ("Nope", "yes"), ("NO", "yes"), ("I don't know", "yes"),
])
def test_pope_reads_the_first_sentence(reply, parsed):
    assert pope_yes_no(reply) == parsed


def test_pope_metrics_hand_computed():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["yes_ratio"] == pytest.approx(60.0)
    assert pope_metrics(["no", "no"], ["yes", "no"])["f1"] == 0.0  # no positive prediction: 0, not a crash


# ----------------------------------------------------------------------------- MME


@pytest.mark.parametrize("reply, parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes, it is", "yes"), ("nope", "no"),
    ("The answer is yes", "other"), ("I think yes", "other"), ("", "other"),
])
def test_mme_reply_parsing(reply, parsed):
    assert mme_yes_no(reply) == parsed


def test_mme_acc_plus_and_totals_hand_computed():
    def row(task, image, ref):
        return Row(question_id=f"{task}/{image}/{ref}", prompt="", reference=ref, meta={"task": task, "image": image})

    rows = [row("existence", "a.jpg", "yes"), row("existence", "a.jpg", "no"),
            row("existence", "b.jpg", "yes"), row("existence", "b.jpg", "no"),
            row("code_reasoning", "c.png", "yes"), row("code_reasoning", "c.png", "no")]
    bench = MME("unused")
    judged = [bench.score_one(r, a) for r, a in zip(rows, ["Yes", "No", "Yes", "Yes", "yes", "no"])]
    scores = bench.aggregate(rows, judged)
    # existence: 3/4 right, 1 of 2 images fully right -> 75 + 50; code_reasoning: 100 + 100
    assert scores["per_task"]["existence"]["score"] == pytest.approx(125.0)
    assert scores["per_task"]["existence"]["acc_plus"] == pytest.approx(50.0)
    assert scores["perception"] == pytest.approx(125.0) and scores["cognition"] == pytest.approx(200.0)


# ----------------------------------------------------------------------------- ScienceQA, SEED, GQA-MCQ


@pytest.mark.parametrize("reply, letter", [
    ("A", "A"), ("B. cat", "B"), ("The answer is C.", "C"), ("The answer is D, because", "D"),
    ("The answer is C", "FAILED"),                    # the reference regex needs a character after the letter
    ("The answer is A. The answer is B.", "FAILED"),  # more than one match
    ("b", "FAILED"), ("B.", "FAILED"), ("", "FAILED"),
])
def test_scienceqa_letter(reply, letter):
    assert sqa_letter(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("c.", "C"), ("blue", "B"),          # quirk kept: the first character decides
    ("The red one", "B"), ("purple", "purple"),
])
def test_gqa_mcq_letter(reply, letter):
    assert mcq_letter(reply, ["green", "red", "yellow", "black"]) == letter


# ----------------------------------------------------------------------------- MMBench


# Hand-derived from VLMEvalKit's rules (vlmeval/utils/matching_util.py) and checked against both versions of that code.
MMB_CHOICES = {"A": "cat", "B": "dog", "C": "bird"}  # the options' texts: 10 characters together


@pytest.mark.parametrize("reply, current, early2025", [
    ("A", "A", "A"), ("The answer is B.", "B", "B"), ("(C) bird", "C", "C"), ("C. bird", "C", "C"),
    ("Answer: C", "C", "C"), ("Option B", "B", "B"),
    ("It is a dog", "B", "B"),                            # no letter: the one option whose text appears
    ("A or B", None, None),                               # two letters, no option text
    ("a cat or a dog", None, None),                       # two option texts
    ("I'm sorry, but without the image provided I cannot say", "Z", "Z"),
    ("Z", "Z", "Z"), ("fish", None, None),
    # since 2025-08: a lone letter counts only among the last 4 words ...
    ("B is my guess, I think it is right but not sure at all", None, "B"),
    # ... and no text match in a reply over twice the options' length
    ("It is a dog, I am fairly sure of it after looking closely", None, "B"),
    # since 2026-06: "answer is X" decides between several letters
    ("The answer is **B**. Option A is wrong because cats do not bark.", "B", "A"),
    ("Both A and B are wrong; the correct answer is C.", "C", None),
    ("I think the answer is a dog", "A", "B"),            # its quirk: case-insensitive, "is a" reads as A
])
def test_mmbench_choice_extraction(reply, current, early2025):
    assert can_infer(reply, MMB_CHOICES) == current  # the default: VLMEvalKit's current rules
    assert can_infer(reply, MMB_CHOICES, "current") == current
    assert can_infer(reply, MMB_CHOICES, "early2025") == early2025


def test_mmbench_extraction_is_an_option_recorded_in_the_scores():
    def scored(**options):
        bench = MMBench("unused", circular=False, **options)
        rows = [Row(question_id=0, prompt="", reference="B", meta={"options": ["cat", "dog"], "category": "x"})]
        return bench.aggregate(rows, [bench.score_one(rows[0], "B is my guess, I think it is right but not sure")])

    current, early = scored(), scored(extraction="early2025")
    assert current["accuracy"] == 0.0 and current["extraction"] == "current"
    assert current["rules"] == "VLMEvalKit matching_util@2cf2a36 (2026-06-25)"
    assert early["accuracy"] == 100.0 and early["rules"] == "VLMEvalKit matching_util@aca64db (2025-04-08)"
    with pytest.raises(ValueError, match="extraction"):
        MMBench("unused", extraction="2024")


def test_mmbench_single_and_circular_accuracy_hand_computed():
    bench = MMBench("unused", circular=True)

    def row(qid, ref):
        return Row(question_id=qid, prompt="", reference=ref, meta={"options": ["cat", "dog"], "category": "x"})

    rows = [row(0, "A"), row(1_000_000, "B"), row(2_000_000, "A"), row(1, "B"), row(1_000_001, "A")]
    judged = [bench.score_one(r, a) for r, a in zip(rows, ["A", "dog", "A", "B", "B"])]
    scores = bench.aggregate(rows, judged)
    assert scores["accuracy"] == 100.0            # the originals (0 and 1) are both right
    assert scores["circular_accuracy"] == 50.0    # question 1's shifted copy is wrong
    assert scores["n_circular"] == 2


# ----------------------------------------------------------------------------- MMMU


def test_mmmu_multiple_choice_parsing():
    choices, index2ans = ["A", "B", "C", "D"], {"A": "apple pie", "B": "banana", "C": "cherry", "D": "date"}
    rng = random.Random(0)
    assert parse_multi_choice_response("(B)", choices, index2ans, rng) == "B"
    assert parse_multi_choice_response("The answer is C.", choices, index2ans, rng) == "C"
    assert parse_multi_choice_response("A and B", choices, index2ans, rng) == "B"  # the last one mentioned
    assert parse_multi_choice_response("I would say the apple pie is right", choices, index2ans, rng) == "A"
    picks = {parse_multi_choice_response("no idea", choices, index2ans, random.Random(s)) for s in range(20)}
    assert picks <= set(choices) and len(picks) > 1  # unparseable: a (seeded) random option, as MMMU does


def test_mmmu_open_answers():
    assert eval_open("42", parse_open_response("The answer is 42."))
    assert not eval_open("4.2", parse_open_response("The answer is 42."))
    assert eval_open(["1,000", "one thousand"], parse_open_response("so the total is 1000"))
    assert eval_open("paris", parse_open_response("It is Paris"))
    # MMMU replaces an empty tail ("...is " at a line's end) by the next indicator's, so the key is "is", not 42
    assert parse_open_response("the answer is \n42") == ["is"]
    assert not eval_open("42", parse_open_response("the answer is \n42"))


# ----------------------------------------------------------------------------- RefCOCO boxes


def test_refcoco_boxes_are_read_on_the_padded_square():
    # 200 x 100 image: the pad-to-square canvas is 200 x 200 with the image 50 px down.
    assert box_to_pixels((0.25, 0.25, 0.75, 0.75), 200, 100) == (50, 0, 150, 100)
    assert box_to_pixels((0.25, 0.25, 0.75, 0.75), 200, 100, "image") == (50, 25, 150, 75)
    assert box_to_pixels((10, 20, 30, 40), 200, 100) == (10, 20, 30, 40)  # pixels stay pixels


# ----------------------------------------------------------------------------- GPT-judge parsing


@pytest.mark.parametrize("reply, score", [("0.7", 0.7), ("1.0", 1.0), ("0.5 because", 0.5), ("1.5", None),
                                          ("Correct", None), ("", None)])
def test_mmvet_score_parsing(reply, score):
    assert mmvet_score(reply) == score


@pytest.mark.parametrize("review, pair", [
    ("8 7\nAssistant 2 is shorter.", [8.0, 7.0]), ("8,7\n", [8.0, 7.0]),
    ("8, 7\n", [-1.0, -1.0]),                  # quirk: ", " becomes two spaces, so three fields
    ("Scores: 8 7", [-1.0, -1.0]), ("9.5 6", [9.5, 6.0]),
])
def test_llava_bench_review_scores(review, pair):
    assert parse_review_scores(review) == pair


def test_llava_bench_relative_scores_hand_computed():
    bench = LLaVABench("unused")
    rows = [Row(question_id=i, prompt="", meta={"category": c}) for i, c in enumerate(["conv", "conv", "detail"])]
    judged = [{"scores": [8.0, 6.0]}, {"scores": [6.0, 6.0]}, {"scores": [10.0, 5.0]}]
    scores = bench.aggregate(rows, judged)
    assert scores["per_category"]["conv"]["relative_score"] == 85.7   # 6 / 7
    assert scores["per_category"]["detail"]["relative_score"] == 50.0
    assert scores["relative_score"] == 70.8                           # 5.667 / 8 (means rounded to 3 places)
    assert scores["reference_score"] == 80.0 and scores["model_score"] == 56.7
