"""DualFocus: box text, the zoom crop, prompts, the selection rule, the cached path against the reference-style one,
the fallbacks, the Pipeline / chat / eval entry points, the training data (`polyfocus dualfocus-data`), the released
checkpoint layout and the recipes.

The tiny random model answers gibberish, so the generations that decide DualFocus's path are scripted: `Script`, a
logits processor passed to every `generate` (both paths get the same one), forces the reply it names for a turn
(a box, an option letter) and leaves the rest to the model. Scoring is never scripted: it is the model's own NLL.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.cli import main
from polyfocus.config import IGNORE_INDEX
from polyfocus.data.dataset import SupervisedDataset
from polyfocus.data.dualfocus import (
    BOX_PROMPT, ZOOM_PROMPT, Question, box_text, convert, parse_box_text, split_prompt, zoom, zoom_box,
)
from polyfocus.data.formats import DataError, load_samples
from polyfocus.data.images import ImageProcessor
from polyfocus.data.prompts import box_continuation
from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.data.templates import encode
from polyfocus.eval.runner import evaluate, read_answers
from polyfocus.infer.dualfocus import DualFocus, Rows, make_item, pick, run_steps, select, steps
from polyfocus.infer.jump import BoxDrafter, accepted
from polyfocus.infer.pipeline import Pipeline
from polyfocus.infer.strategies import get_strategy
from polyfocus.model.presets import tiny_config
from polyfocus.synthworld.scenes import export
from polyfocus.synthworld.scorer import question_of

REPO = Path(__file__).resolve().parents[1]
BOXES = ["[0.10, 0.20, 0.50, 0.60]", "I cannot tell", "[0.00, 0.00, 0.00, 0.00]", "[0.70, 0.70, 0.72, 0.71]",
         "first [0.2, 0.1, 0.9, 0.3] then [0.1, 0.1, 0.2, 0.2]", "[12, 30, 400, 3000]"]


class Script(LogitsProcessor):
    """Forces, row by row, the reply `reply_for(last user turn)` names (None: the model's own tokens)."""

    def __init__(self, tokenizer, reply_for, marker=" ASSISTANT:"):
        self.tokenizer, self.reply_for = tokenizer, reply_for
        self.marker = tokenizer.encode(marker, add_special_tokens=False)

    def __call__(self, input_ids, scores):
        m = len(self.marker)
        for r, row in enumerate(input_ids.tolist()):
            at = next(j for j in range(len(row) - m, -1, -1) if row[j:j + m] == self.marker)
            prompt = self.tokenizer.decode([t for t in row[:at] if t >= 0], skip_special_tokens=True)
            target = self.reply_for(prompt.rpartition("USER:")[2].strip())
            if target is None:
                continue
            ids = self.tokenizer.encode(" " + target, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            k = len(row) - at - m  # tokens generated so far
            if k < len(ids):
                scores[r] = -float("inf")
                scores[r, ids[k]] = 0.0
        return scores


def scripted(turn: str) -> str | None:
    """A box for every box turn (drawn from BOXES by the question), option letters for multiple choice, and the
    model's own words for open questions."""
    h = zlib.crc32(turn.encode())
    if BOX_PROMPT in turn:
        return BOXES[h % len(BOXES)]
    if "\nA. " in turn:
        return "ABCD"[h % 4] if ZOOM_PROMPT in turn else "ABCD"[(h // 7) % 4]
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    export(str(d), 4, seed=3, image_size=112, split="test", families=["colour", "count", "text", "mc", "existence"])
    export(str(d), 8, seed=3, image_size=112, split="train", families=["colour", "count", "mc", "caption"])
    return d


@pytest.fixture(scope="module")
def requests_(data):
    return [([str(data / s.images[0])], question_of(s)) for s in load_samples(data / "test.json")]


def script_kwargs(pipe):
    return {"logits_processor": LogitsProcessorList([Script(pipe.tokenizer, scripted)])}


# ---- box text and the crop ---------------------------------------------------------------------------------------


def test_box_text_round_trip():
    """`box_text` writes DualFocus's "[x1, y1, x2, y2]" with two decimals; the parser reads back the rounded box."""
    assert box_text((0.123, 0.3449, 0.5, 1.0)) == "[0.12, 0.34, 0.50, 1.00]"
    for box in [(0.0, 0.0, 1.0, 1.0), (0.105, 0.2, 0.33333, 0.999), (0.5, 0.25, 0.75, 0.125)]:
        text = box_text(box)
        assert parse_box_text(text) == tuple(round(v, 2) for v in box)
        assert box_text(parse_box_text(text)) == text


@pytest.mark.parametrize("text,box", [
    ("[0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
    ("The region is 0.1,0.2,0.3,0.4.", (0.1, 0.2, 0.3, 0.4)),  # no brackets, no spaces
    ("[-0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),  # signs are ignored, as the reference's regex
    ("[0.1, 0.2, 0.3] and [1, 2, 3, 4] and [5, 6, 7, 8]", (1.0, 2.0, 3.0, 4.0)),  # the first 4-number match
    ("[12, 30, 400, 3000]", (12.0, 30.0, 400.0, 3000.0)),
    ("no box here", None),
    ("[0.1, 0.2, 0.3]", None),
])
def test_parse_box_text(text, box):
    assert parse_box_text(text) == box


@pytest.mark.parametrize("box,size,expected", [
    # [20, 20, 60, 40]: centre (40, 30), side 40 -> [20, 10, 60, 50], +25 -> [-5, -15, 85, 75] -> clipped
    ((20, 20, 60, 40), (200, 100), (0, 0, 85, 75)),
    # a 4x2 px box in the middle of 400x300: centre (200, 150), side 4 -> [198, 148, 202, 152], +25
    ((198, 149, 202, 151), (400, 300), (173, 123, 227, 177)),
    # the whole image: the square is clipped to [0, W-1] before and after the margin (the last column is left out)
    ((0, 0, 120, 80), (120, 80), (0, 0, 119, 79)),
    # fractions truncate: centre (20.6, 15.7), side 20.2 -> [10.5, 5.6, 30.7, 25.8], +25 -> [.., .., 55.7, 50.8]
    ((10.5, 10.5, 30.7, 20.9), (100, 100), (0, 0, 55, 50)),
    # near the far corner: [90, 85, 98, 99] -> centre (94, 92), side 14 -> [87, 85, 101, 99] -> clip x2 to 99,
    # y2 to 99 -> +25 -> [62, 60, 124, 124] -> clipped to 99
    ((90, 85, 98, 99), (100, 100), (62, 60, 99, 99)),
    # inverted x (not guarded by the reference): side = max(-40, 20) = 20 around the centre (40, 40)
    ((60, 30, 20, 50), (100, 100), (5, 5, 75, 75)),
    # numbers > 1 in the box text ("[12, 30, 400, 3000]") are de-normalised anyway: square [-58096, 1440, 84464,
    # 144000] -> clipped [0, 47, 63, 47] -> +25 -> [-25, 22, 88, 72] -> clipped: a band at the bottom
    ((12 * 64, 30 * 48, 400 * 64, 3000 * 48), (64, 48), (0, 22, 63, 47)),
])
def test_zoom_box_hand_computed(box, size, expected):
    assert zoom_box(box, *size) == expected


@pytest.mark.parametrize("text,size,expected", [
    # x: 132.48 .. 257.6, y: 23.72 .. 355.8 -> side 332.08 around (195.04, 189.76) -> x1 = 29.0 - 25 = 4 exactly
    # (float64 lands on 3.99999... and truncates to 3; the reference computes in float32 and gets 4)
    ("[0.36, 0.04, 0.70, 0.60]", (368, 593), (4, 0, 367, 380)),
    # y2 = 174.8 + 46.2 + 25 = 246 exactly, but the reference's float32 lands below it: 245 (float64: 246)
    ("[0.41, 0.39, 0.97, 0.41]", (165, 437), (42, 103, 164, 245)),
])
def test_zoom_truncates_as_the_reference_in_float32(text, size, expected):
    assert zoom(Image.new("RGB", size), parse_box_text(text))[1] == expected


def test_zoom_fails_where_the_reference_fails():
    image = Image.new("RGB", (100, 80))
    assert zoom(image, (0.0, 0.0, 0.0, 0.0)) is None  # all <= 1 pixel: the reference's assertion
    assert zoom(image, (0.005, 0.005, 0.01, 0.01)) is None  # 0.5..1 px: still all <= 1
    assert zoom(image, (0.9, 0.9, 0.1, 0.1)) is None  # inverted by more than the margin: an empty crop
    assert zoom(image, (1.0, 1.0, 1.0, 1.0))[1] == (74, 54, 99, 79)  # a point in the corner: the margin around it
    crop, crop_box = zoom(image, (0.5, 0.5, 0.52, 0.53))
    # [50, 40, 52, 42.4]: centre (51, 41.2), side 2.4 -> [49.8, 40, 52.2, 42.4], +25 -> [24.8, 15, 77.2, 67.4]
    assert crop_box == (24, 15, 77, 67) and crop.size == (53, 52)  # a tiny box still gives a ~50 px crop
    assert crop.tobytes() == image.crop(crop_box).tobytes()


# ---- prompts ------------------------------------------------------------------------------------------------------


def test_split_prompt():
    mc = split_prompt("<image>\nWhat colour is the star?\nA. red\nB. blue\nC. green\nD. cyan\n"
                      "Answer with the option's letter from the given choices directly.")
    assert mc.question == "What colour is the star?" and mc.options == ["red", "blue", "green", "cyan"]
    assert mc.prompt.startswith("What colour") and mc.prompt.endswith("directly.")
    short = split_prompt("What is written on the sign?\nReference OCR token: STOP, 5\n"
                         "Answer the question using a single word or phrase.")
    assert short.question == "What is written on the sign?" and short.options is None
    hint = split_prompt("Hint: a map.\nWhich city?\nA. Rome\nB. Oslo")
    assert hint.question == "Hint: a map.\nWhich city?" and hint.options == ["Rome", "Oslo"]
    assert split_prompt("Is it B. Smith?\nB. yes\nC. no").options is None  # not an A, B, ... block
    assert split_prompt("<image>\nDescribe the image.").question == "Describe the image."


# ---- the selection rule -------------------------------------------------------------------------------------------

OPTIONS = Question("Q?\nA. red\nB. blue\nC. green\nD. cyan\n...", "Q?", ["red", "blue", "green", "cyan"])


@pytest.mark.parametrize("macro,micro,choice,candidates,reason", [
    ("A", "B", None, ["red", "blue"], "perplexity"),
    ("A", "A.", "macro", None, "same_answer"),
    ("A", "no idea", "macro", None, "only_macro_valid"),
    ("maybe", "C", "micro", None, "only_micro_valid"),
    ("maybe", "perhaps", "macro", None, "neither_valid"),
    ("It is cyan", "Blue", None, ["cyan", "blue"], "perplexity"),  # by option text; "Blue" by its first letter
    ("It is green", "Cyan", "macro", None, "same_answer"),  # "Cyan" reads as C (the reference's quirk): green
    ("Blue", "B", "macro", None, "same_answer"),  # process_outputs reads a leading b as B
])
def test_multiple_choice_rule(macro, micro, choice, candidates, reason):
    assert select(OPTIONS, macro, micro) == (choice, candidates, reason)


def test_open_answers_always_go_to_perplexity_unless_equal():
    open_q = Question("Q?", "Q?")
    assert select(open_q, "red", "blue") == (None, ["red", "blue"], "perplexity")
    assert select(open_q, "red", "red") == ("macro", None, "same_answer")
    # the micro answer is scored without trailing dots / newlines, as model_vqa_textvqa.py's cot_answer
    assert select(open_q, "stop", "stop.") == ("macro", None, "same_answer")
    assert select(open_q, "red", "blue.\n") == (None, ["red", "blue"], "perplexity")
    assert pick([1.0, 0.5]) == "micro" and pick([0.5, 1.0]) == "macro" and pick([0.7, 0.7]) == "macro"


class Bigram(torch.nn.Module):
    """A "model" whose NLLs are known: the logits after token t are row t of a fixed table."""

    def __init__(self, config, table):
        super().__init__()
        self.config, self.table = config, table

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, pixel_values=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids.clamp(min=0)])


@pytest.mark.parametrize("span", ["box_and_answer", "answer"])
def test_selection_by_known_nlls(pipe, span):
    """With a bigram model the NLL of every token is a table lookup: the scores are the hand-computed means (over
    the box reply and the candidate, or the candidate only), and the lower one wins."""
    torch.manual_seed(0)
    table = torch.randn(len(pipe.tokenizer), len(pipe.tokenizer)) * 3
    stub = Pipeline(Bigram(pipe.model.config, table), pipe.tokenizer, pipe.image_processor, pipe.template)
    df = DualFocus(stub, span=span)
    item = make_item([Image.new("RGB", (64, 64), "red")], "What colour is the star?", 0)
    replies = iter([["red", "[0.1, 0.1, 0.6, 0.6]"], ["dark blue"]])  # macro and box, then micro
    run_steps(steps(item), lambda asks: next(replies), lambda step: [df.score(item, c) for c in step.candidates])
    config = pipe.model.config
    expected = []
    for candidate in ("red", "dark blue"):
        enc = encode(item.score_messages("[0.1, 0.1, 0.6, 0.6]", candidate), pipe.tokenizer, pipe.template,
                     config.image_token_id, [config.num_image_tokens] * 2)
        context = pipe.encode(item.score_messages("[0.1, 0.1, 0.6, 0.6]", None), 2)
        first = len(context) if span == "answer" else 0
        scored = [j for j in range(max(first, 1), len(enc.input_ids)) if enc.labels[j] != IGNORE_INDEX]
        # the spec's S_c: the box reply and the candidate, each with its end token (span="answer": the candidate's)
        box_part = " [0.1, 0.1, 0.6, 0.6]</s>" if span == "box_and_answer" else ""
        assert pipe.tokenizer.decode([enc.input_ids[j] for j in scored]) == f"{box_part} {candidate}</s>"
        nll = [-torch.log_softmax(table[enc.input_ids[j - 1]], -1)[enc.input_ids[j]].item() for j in scored]
        expected.append(sum(nll) / len(nll))
    result = item.result
    assert result.reason == "perplexity" and result.candidates == ["red", "dark blue"]
    assert result.scores == pytest.approx(expected, rel=1e-5)
    assert result.choice == ("micro" if expected[1] < expected[0] else "macro")
    assert result.answer == {"macro": "red", "micro": "dark blue"}[result.choice]


def test_score_equals_a_naive_token_by_token_loop(pipe):
    """The scoring forward's mean NLL = the mean of -log p(token | prefix) computed one prefix at a time."""
    df = DualFocus(pipe)
    item = make_item([Image.effect_noise((90, 70), 40).convert("RGB")], "Where is it?", 0)
    replies = iter([["left", "[0.2, 0.2, 0.5, 0.6]"], ["left"]])  # the same micro answer: no scoring on the way
    run_steps(steps(item), lambda asks: next(replies), None)
    config = pipe.model.config
    enc = encode(item.score_messages(item.result.box_text, "on the left"), pipe.tokenizer, pipe.template,
                 config.image_token_id, [config.num_image_tokens] * 2)
    pixels = pipe.image_processor([item.image, item.crop])
    nll = []
    with torch.inference_mode():
        for j in range(1, len(enc.input_ids)):
            if enc.labels[j] != IGNORE_INDEX:
                n_images = enc.input_ids[:j].count(config.image_token_id) // config.num_image_tokens
                logits = pipe.model(input_ids=torch.tensor([enc.input_ids[:j]]), pixel_values=pixels[:n_images]).logits
                nll.append(-torch.log_softmax(logits[0, -1], -1)[enc.input_ids[j]].item())
        assert df.score(item, "on the left") == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# ---- jump-forward ---------------------------------------------------------------------------------------------------


def test_box_continuation():
    texts = ("", " [", "[0.1", "[0.12", "[1.00, 0.3", "[0.12, 0.34, 0.56, 0.78", "[0.12, 0.34, 0.56, 0.78]", "I think",
             "[0.12, 0.34, 0.56, 0.78].")
    assert [box_continuation(t) for t in texts] == ["[0.", "0.", "", ", 0.", "", "]", "", None, None]


@pytest.mark.parametrize("split_digits", [False, True])
def test_box_drafts_are_the_tokens_the_template_writes(split_digits):
    """Decoding the template's own box reply with the drafter: every fixed token is drafted and accepted, so the
    passes are the varying digits' (one per digit token, its neighbours drafted with it); "1." where "0." was guessed
    costs nothing but the guess."""
    tokenizer = build_tokenizer(split_digits=split_digits)
    model = PolyfocusForConditionalGeneration(tiny_config(image_token_id=tokenizer.convert_tokens_to_ids("<image>")))
    p = Pipeline(model.eval(), tokenizer, ImageProcessor(image_size=56), "vicuna_v1")
    drafter = BoxDrafter.for_pipe(p)
    question = [{"role": "user", "content": "Where?"}]
    prompt = p.encode(question, 0)
    for box in ("[0.25, 0.30, 0.60, 0.75]", "[1.00, 0.05, 0.99, 1.00]"):
        truth = p.encode([*question, {"role": "assistant", "content": box}], 0, add_generation_prompt=False)
        truth = truth[len(prompt):]  # the reply's tokens and the end token
        generated, passes = [], 0
        while len(generated) < len(truth):  # a model that greedily writes exactly `truth` (then stops)
            draft = drafter(generated)
            generated += accepted(draft, (truth + [-1] * len(draft))[len(generated):len(generated) + len(draft) + 1])
            passes += 1
        assert generated[:len(truth)] == truth and p.tokenizer.decode(truth, skip_special_tokens=True).strip() == box
        varying = len(tokenizer.encode("25306075", add_special_tokens=False))
        assert passes <= varying + 1 + 2 * box.count("1."), (tokenizer.convert_ids_to_tokens(truth), passes)


def test_jump_forward_gives_the_same_results_in_fewer_passes(pipe, requests_, monkeypatch):
    passes = []
    forward = Rows.forward
    monkeypatch.setattr(Rows, "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    kwargs = {"max_new_tokens": 6, **script_kwargs(pipe)}
    results = {}
    for jump in (False, True):
        passes.clear()
        results[jump] = (DualFocus(pipe, box_max_new_tokens=24, jump_forward=jump).answer(requests_, batch_size=5,
                                                                                            **kwargs), len(passes))
    assert_same(results[False][0], results[True][0])
    assert results[True][1] < results[False][1]


# ---- the cached path against the reference-style one ----------------------------------------------------------------


def run_both(pipe, requests, monkeypatch, span="box_and_answer", batch_size=5):
    kwargs = {"max_new_tokens": 6, **script_kwargs(pipe)}
    reference = DualFocus(pipe, span=span, cached=False, box_max_new_tokens=24).answer(requests, **kwargs)

    def no_fallback(*args):
        raise AssertionError("the cached path fell back to the reference-style one")

    monkeypatch.setattr(DualFocus, "_answer_reference", no_fallback)
    cached = DualFocus(pipe, span=span, cached=True, box_max_new_tokens=24).answer(requests, batch_size=batch_size,
                                                                                  **kwargs)
    return reference, cached


def assert_same(reference, cached):
    for a, b in zip(reference, cached, strict=True):
        assert (a.answer, a.choice, a.reason, a.macro, a.box_text, a.crop_box, a.micro, a.candidates) == \
               (b.answer, b.choice, b.reason, b.macro, b.box_text, b.crop_box, b.micro, b.candidates)
        if a.scores is not None:
            assert b.scores == pytest.approx(a.scores, abs=1e-4)


@pytest.mark.parametrize("span", ["box_and_answer", "answer"])
def test_cached_path_gives_the_reference_choices(pipe, requests_, span, monkeypatch):
    """Batches of 5 questions of different lengths on one cache (pads in the middle of rows), against one question
    at a time with a pass per step: the same answers, boxes, crops, choices, and scores to float noise; and every
    path of the procedure is taken."""
    reference, cached = run_both(pipe, requests_, monkeypatch, span)
    assert_same(reference, cached)
    reasons = {r.reason for r in reference}
    assert {"perplexity", "no_box", "degenerate_box"} <= reasons
    assert {r.choice for r in reference if r.reason == "perplexity"} == {"macro", "micro"}
    mc = [r for (_, messages), r in zip(requests_, reference) if "\nA. " in messages[0]["content"]]
    scored = [r for r in mc if r.reason == "perplexity"]  # multiple choice: the options' texts were scored
    assert scored and all(r.candidates != [r.macro, r.micro] and len(r.macro) == len(r.micro) == 1 for r in scored)


def test_cached_path_with_llava_sentinel_image_id(pipe, requests_, monkeypatch):
    """An original LLaVA checkpoint's image id -200 lies outside the vocabulary: the cached path hides it from
    `generate` as the model's own generate does, and still gives the reference's choices."""
    torch.manual_seed(1)
    model = PolyfocusForConditionalGeneration(tiny_config(image_token_id=-200)).eval()
    sentinel = Pipeline(model, pipe.tokenizer, pipe.image_processor, "vicuna_v1")
    reference, cached = run_both(sentinel, requests_[:8], monkeypatch, batch_size=8)
    assert_same(reference, cached)
    assert any(r.reason == "perplexity" for r in reference)


def test_fallbacks_answer_with_the_macro_answer(pipe, requests_):
    """No box in the reply, a degenerate box: the macro answer, which is the plain pipeline's answer; a request that
    is not one image and one question is answered plainly."""
    kwargs = {"max_new_tokens": 6, **script_kwargs(pipe)}
    results = DualFocus(pipe, box_max_new_tokens=24).answer(requests_, **kwargs)
    plain = pipe.generate(requests_, **kwargs)
    for r, answer in zip(results, plain):
        assert r.macro == answer
        if r.reason in ("no_box", "degenerate_box"):
            assert (r.answer, r.micro, r.crop_box, r.scores) == (answer, None, None, None)
    image = Image.new("RGB", (40, 40))
    image_last = ([requests_[0][0][0]], requests_[0][1][0]["content"].removeprefix("<image>\n") + "\n<image>")
    batch = [image_last, requests_[1]]  # the first has no prefix worth caching: it is answered the reference way
    alone = DualFocus(pipe, cached=False).answer(batch[:1], max_new_tokens=6)[0]
    assert DualFocus(pipe).answer(batch, max_new_tokens=6)[0] == alone
    two = ([image, image], "<image>\n<image>\nWhich is brighter?")
    text_only = ([], "Say hi.")
    results = DualFocus(pipe).answer([two, text_only], max_new_tokens=5)
    assert [r.reason for r in results] == ["not_single_image"] * 2
    assert [r.answer for r in results] == pipe.generate([two, text_only], max_new_tokens=5)


def test_pipeline_generate_and_chat_strategy(pipe, requests_):
    kwargs = {"max_new_tokens": 6, **script_kwargs(pipe)}
    expected = [r.answer for r in DualFocus(pipe).answer(requests_[:4], **kwargs)]
    assert pipe.generate(requests_[:4], strategy="dualfocus", **kwargs) == expected
    image, question = requests_[0][0][0], requests_[0][1][0]["content"].removeprefix("<image>\n")
    history = []
    assert pipe.chat(image, question, history, strategy="dualfocus", **kwargs) == expected[0]
    assert history[-1] == {"role": "assistant", "content": expected[0]}
    with pytest.raises(ValueError, match="single question"):
        pipe.chat(image, "And now?", history, strategy="dualfocus")
    with pytest.raises(ValueError, match="greedily"):
        pipe.generate(requests_[:1], strategy="dualfocus", temperature=0.7)
    with pytest.raises(ValueError, match="num_beams=2"):  # not a shape error deep in the cached path's generate
        pipe.generate(requests_[:1], strategy="dualfocus", num_beams=2)
    with pytest.raises(ValueError, match="unknown strategy"):
        pipe.generate(requests_[:1], strategy="zoom")
    assert (get_strategy("dualfocus").span, get_strategy("dualfocus_answer").span) == \
           ("box_and_answer", "answer")


def test_eval_with_the_dualfocus_strategy(pipe, data, tmp_path):
    """`evaluate(..., strategy="dualfocus")` on the synthworld benchmark: the answers are DualFocus's, their details
    are in the answers' metadata, run.json records the strategy (a plain run's directory is refused)."""
    results = evaluate(pipe, "synthworld", data, out=tmp_path, batch_size=4, max_new_tokens=6, quiet=True,
                       strategy="dualfocus")
    answers = read_answers(tmp_path / "synthworld" / "answers.jsonl")
    rows = load_samples(data / "test.json")
    expected = DualFocus(pipe).answer([([str(data / s.images[0])], question_of(s)) for s in rows], max_new_tokens=6)
    assert [answers[s.id]["text"] for s in rows] == [r.answer for r in expected]
    assert [answers[s.id]["metadata"]["reason"] for s in rows] == [r.reason for r in expected]
    assert results["settings"]["strategy"] == "dualfocus" and "per_family" in results["scores"]
    with pytest.raises(Exception, match="other settings"):
        evaluate(pipe, "synthworld", data, out=tmp_path, batch_size=4, max_new_tokens=6, quiet=True)


def test_cli_chat_and_eval_strategy(ckpt, pipe, data, tmp_path, capsys):
    image = data / load_samples(data / "test.json")[0].images[0]
    main(["chat", "--model", str(ckpt), "--image", str(image), "--prompt", "What colour is the star?", "--strategy",
          "dualfocus", "--max-new-tokens", "5", "--device", "cpu"])
    expected = DualFocus(pipe).answer([([str(image)], "What colour is the star?")], max_new_tokens=5)[0].answer
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit, match="greedily"):
        main(["chat", "--model", str(ckpt), "--image", str(image), "--prompt", "Hi", "--strategy", "dualfocus",
              "--temperature", "0.7"])
    main(["eval", "--model", str(ckpt), "--benchmark", "synthworld", "--data", str(data), "--out", str(tmp_path),
          "--strategy", "dualfocus_answer", "--max-new-tokens", "5", "--limit", "3", "--device", "cpu"])
    answers = read_answers(tmp_path / "synthworld" / "answers.jsonl")
    assert len(answers) == 3 and all("reason" in a["metadata"] for a in answers.values())
    assert json.loads((tmp_path / "synthworld" / "run.json").read_text())["strategy"] == "dualfocus_answer"


@pytest.mark.gpu
def test_cached_path_gives_the_reference_choices_on_cuda(pipe, requests_, monkeypatch):
    """The same comparison on a GPU (fp32: the reference-style path and the cached one differ by float noise only)."""
    cuda = Pipeline(pipe.model.to("cuda"), pipe.tokenizer, pipe.image_processor, pipe.template)
    try:
        reference, cached = run_both(cuda, requests_, monkeypatch)
        assert_same(reference, cached)
    finally:
        pipe.model.to("cpu")


# ---- training data ------------------------------------------------------------------------------------------------


def test_synthworld_to_dualfocus_training_data(data, tmp_path, ckpt):
    """Each usable question becomes the two-turn record; its crop file is exactly what inference crops for the box
    text of its first reply; captions are skipped and counted; the dataset trains on it with both images and both
    replies supervised."""
    out = tmp_path / "df" / "train.json"
    summary = convert(data / "train.json", out)
    source = {s.id: s for s in load_samples(data / "train.json")}
    records = load_samples(out)
    assert summary["written"] == len(records) > 0
    assert summary["skipped"]["family"]["n"] == sum(s.extra["family"] == "caption" for s in source.values())
    assert summary["written"] + sum(v["n"] for v in summary["skipped"].values()) == len(source)
    for record in records:
        src = source[record.id.removesuffix("_dualfocus")]
        parts = split_prompt(src.messages[0]["content"])
        box = tuple(min(b[i] for b in src.extra["boxes"]) if i < 2 else max(b[i] for b in src.extra["boxes"])
                    for i in range(4))
        assert [m["content"] for m in record.messages] == [
            f"<image>\n{BOX_PROMPT}{parts.question}", box_text(box),
            f"<image>\n{ZOOM_PROMPT}{parts.prompt}", src.messages[1]["content"]]
        full = Image.open(out.parent / record.images[0])
        crop = Image.open(out.parent / record.images[1])
        assert (out.parent / record.images[0]).resolve() == (data / src.images[0]).resolve()
        assert crop.convert("RGB").tobytes() == zoom(full.convert("RGB"), parse_box_text(box_text(box)))[0].tobytes()
    pipe_tok = Pipeline.from_pretrained(ckpt, device="cpu")
    dataset = SupervisedDataset(out, None, pipe_tok.tokenizer, pipe_tok.template, ImageProcessor(image_size=56),
                                image_token_id=pipe_tok.model.config.image_token_id, image_seq_len=16,
                                model_max_length=512)
    item = dataset[0]
    assert item["pixel_values"].shape == (2, 3, 56, 56)
    supervised = pipe_tok.tokenizer.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX])
    assert supervised == f" {records[0].messages[1]['content']}</s> {records[0].messages[3]['content']}</s>"


def test_conversion_formats_and_filters(tmp_path):
    """sub_area in pixels or normalised, an already two-turn DualFocus record, GQA's questions + scene graphs; boxes
    that are too large or degenerate are skipped and counted; bad input names the file and sample."""
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.jpg")
    vqa = [
        {"id": 1, "image": "a.jpg", "sub_area": [20, 20, 60, 40],
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cup"}]},
        {"id": 2, "image": "a.jpg", "sub_area": [0.1, 0.2, 0.3, 0.4],
         "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "a cup"}]},
        {"id": 3, "image": "a.jpg", "boxes": [[0, 0, 1, 1]],
         "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "everywhere"}]},
        {"id": 4, "image": "a.jpg", "boxes": [[0.5, 0.5, 0.505, 0.9]],  # 1 px wide
         "conversations": [{"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "corner"}]},
        {"id": 5, "image": "a.jpg", "boxes": [],
         "conversations": [{"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "x"}]},
        {"id": 6, "image": "a.jpg", "sub_area": [0.1, 0.2, 0.3, 0.4], "conversations": [
            {"from": "human", "value": f"<image>\n{BOX_PROMPT}What is it?"},
            {"from": "gpt", "value": "[0.10, 0.20, 0.30, 0.40]"},
            {"from": "human", "value": f"<image>\n{ZOOM_PROMPT}What is it?"}, {"from": "gpt", "value": "a cup"}]},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(vqa))
    summary = convert(tmp_path / "vqa.json", tmp_path / "out.jsonl")
    assert summary["written"] == 3
    assert {k: v["first"] for k, v in summary["skipped"].items()} == {
        "large_box": ["3"], "degenerate_box": ["4"], "no_box": ["5"]}
    records = load_samples(tmp_path / "out.jsonl")
    assert [r.messages for r in records[1:]] == [records[0].messages] * 2  # pixels == normalised; re-conversion
    assert records[0].messages[1]["content"] == "[0.10, 0.20, 0.30, 0.40]"
    assert Image.open(tmp_path / records[0].images[1]).size == (85, 75)  # test_zoom_box_hand_computed's first case

    questions = {"q1": {"imageId": "a", "question": "What is on the table?", "answer": "cup",
                        "annotations": {"question": {"4": "o2"}, "answer": {"0": "o1"}, "fullAnswer": {}}},
                 "q2": {"imageId": "a", "question": "Is it sunny?", "answer": "yes", "annotations": {}}}
    graphs = {"a": {"width": 200, "height": 100, "objects": {"o1": {"x": 20, "y": 20, "w": 10, "h": 10},
                                                               "o2": {"x": 50, "y": 30, "w": 10, "h": 10}}}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "g.json").write_text(json.dumps(graphs))
    summary = convert(tmp_path / "q.json", tmp_path / "gqa.json", scene_graphs=tmp_path / "g.json")
    (record,) = load_samples(tmp_path / "gqa.json")
    assert summary["skipped"] == {"no_box": {"n": 1, "first": ["q2"]}}
    assert record.messages[1]["content"] == "[0.10, 0.20, 0.30, 0.40]"  # union of o1 and o2, normalised
    assert record.messages[2]["content"].endswith("What is on the table?\nAnswer the question using a single "
                                                  "word or phrase.")

    bad = [{**vqa[0], "id": "x", "sub_area": [1, 2, 3]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="sample 'x'.*4 numbers"):
        convert(tmp_path / "bad.json", tmp_path / "o.json")
    (tmp_path / "missing.json").write_text(json.dumps([{**vqa[0], "id": "m", "image": "nope.jpg"}]))
    with pytest.raises(DataError, match="sample 'm'.*nope.jpg"):
        convert(tmp_path / "missing.json", tmp_path / "o.json")


def test_multi_turn_records_give_one_question_per_turn(tmp_path):
    """A conversation (synthworld's multi-turn records: per-question `boxes`, `families`, `meta` lists) gives one
    DualFocus record per question, each with its own box, prompt and answer; its chat turn is skipped; per-question
    lists of the wrong length name the sample."""
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    turns = [("<image>\nWhat colour is the star?\nAnswer the question using a single word or phrase.", "red"),
             ("What is in the image?", "A red star."),
             ("What shape is the red object?\nAnswer the question using a single word or phrase.", "star")]
    record = {"id": "s0_conversation", "image": "a.png", "scene_id": "s0",
              "conversations": [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))],
              "families": ["colour", "chat", "shape"], "meta": [{"n": 0}, {"n": 1}, {"n": 2}],
              "boxes": [[[0.1, 0.2, 0.3, 0.4]], [[0.1, 0.2, 0.3, 0.4]], [[0.2, 0.2, 0.3, 0.5]]]}
    (tmp_path / "conv.json").write_text(json.dumps([record]))
    summary = convert(tmp_path / "conv.json", tmp_path / "out.json")
    assert summary["written"] == 2 and summary["skipped"] == {"family": {"n": 1, "first": ["s0_conversation_1"]}}
    first, last = load_samples(tmp_path / "out.json")
    assert first.id == "s0_conversation_0_dualfocus" and last.id == "s0_conversation_2_dualfocus"
    assert [m["content"] for m in last.messages] == [
        f"<image>\n{BOX_PROMPT}What shape is the red object?", "[0.20, 0.20, 0.30, 0.50]",
        f"<image>\n{ZOOM_PROMPT}{turns[2][0]}", "star"]
    assert first.messages[1]["content"] == "[0.10, 0.20, 0.30, 0.40]" and first.messages[3]["content"] == "red"
    assert (first.extra["family"], first.extra["meta"], first.extra["scene_id"]) == ("colour", {"n": 0}, "s0")
    (tmp_path / "bad.json").write_text(json.dumps([{**record, "boxes": record["boxes"][:2]}]))
    with pytest.raises(DataError, match="sample id 's0_conversation'.*3 questions needs 'boxes'"):
        convert(tmp_path / "bad.json", tmp_path / "o.json")


def test_cli_dualfocus_data(data, tmp_path, capsys):
    main(["dualfocus-data", str(data / "train.json"), str(tmp_path / "df.json"), "--families", "colour"])
    summary = json.loads(capsys.readouterr().out)
    records = load_samples(tmp_path / "df.json")
    assert summary["written"] == len(records) and {r.extra["family"] for r in records} == {"colour"}
    with pytest.raises(SystemExit, match="no question could be converted"):
        main(["dualfocus-data", str(data / "train.json"), str(tmp_path / "x.json"), "--families", "grounding"])


# ---- checkpoint layout and recipes -----------------------------------------------------------------------------------


def test_released_checkpoint_layout_loads(tmp_path):
    """DualFocus-LLaVA-1.5 checkpoints are saved by DualFocus's LlavaLlamaForCausalLM, whose config class says
    model_type "llava" over LLaVA's flat Llama config (dualfocus/model/language_model/llava_llama.py): it loads as an
    original LLaVA-1.5 checkpoint, with the same logits."""
    from test_checkpoints import llava_config, llava_state_dict, logits, make_model, write_clip_tower, write_shards

    from polyfocus.checkpoints import checkpoint_format, load_model

    model = make_model()
    write_clip_tower(model, tmp_path / "clip", full_clip=True)
    ckpt = tmp_path / "DualFocus-LLaVA-1.5-7B"
    ckpt.mkdir()
    config = llava_config(model, tmp_path / "clip", model_type="llava", architectures=["LlavaLlamaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    write_shards(llava_state_dict(model, with_tower=False), ckpt, "bin")
    assert checkpoint_format(ckpt) == "llava"
    loaded = load_model(ckpt).eval()
    assert loaded.config.image_token_id == -200 and loaded.config.image_aspect_ratio == "pad"
    assert torch.equal(logits(loaded, image_token_id=-200), logits(model))


def test_recipes(tmp_path):
    """The synthworld recipe is the demo's stage 2 with the DualFocus data added (same steps and rates); the real-size
    one is LLaVA-1.5-7B's finetune recipe with the DualFocus GQA data added."""
    from polyfocus.demo import DEFAULT_STEPS, default_recipe
    from polyfocus.train.args import parse_args

    recipes = REPO / "configs" / "dualfocus"
    demo = default_recipe(Path("polyfocus_demo"), DEFAULT_STEPS, 16)["stage2"]
    mine = yaml.safe_load((recipes / "synthworld_finetune.yaml").read_text())
    differ = {k for k in set(demo) | set(mine) if demo.get(k) != mine.get(k)}
    assert differ == {"data_path", "output_dir"}
    assert mine["data_path"] == demo["data_path"] + ["polyfocus_demo/data/dualfocus_train.json"]
    llava = yaml.safe_load((REPO / "configs" / "llava-1.5-7b" / "finetune.yaml").read_text())
    real = yaml.safe_load((recipes / "llava-1.5-7b-finetune.yaml").read_text())
    assert {k for k in set(llava) | set(real) if llava.get(k) != real.get(k)} == {"data_path", "output_dir", "run_name"}
    assert real["data_path"] == [llava["data_path"], "./playground/data/dualfocus_gqa_train.json"]
    for recipe in (recipes / "synthworld_finetune.yaml", recipes / "llava-1.5-7b-finetune.yaml"):
        hardware = ["--tf32", "false", "--use_cpu", "true", "--deepspeed", ""]  # as test_configs: what the CPU lacks
        _, data_args, training_args = parse_args(str(recipe), ["--output_dir", str(tmp_path), *hardware])
        assert len(data_args.data_path) == 2 and training_args.learning_rate > 0


def test_synthworld_recipe_trains_on_both_files(ckpt, data, tmp_path, monkeypatch):
    """configs/dualfocus/synthworld_finetune.yaml on the tiny checkpoint: the plain and the DualFocus records train
    together (batches mixing one- and two-image samples) and the weights move."""
    from polyfocus.train import run

    from train_helpers import trainer_with

    convert(data / "train.json", tmp_path / "dualfocus_train.json")
    seen = []

    def remember(trainer):
        trainer.initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        seen.extend(int(batch["pixel_values"].shape[0]) - int(batch["input_ids"].shape[0])
                    for batch in trainer.get_train_dataloader())

    monkeypatch.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, on_init=remember))
    trainer = run.train(str(REPO / "configs" / "dualfocus" / "synthworld_finetune.yaml"), [
        "--model_name_or_path", str(ckpt), "--tokenizer_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "out"),
        "--data_path", str(data / "train.json"), str(tmp_path / "dualfocus_train.json"), "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
        "--plot_loss", "false", "--report_to", "none"])
    n_plain, n_zoom = len(load_samples(data / "train.json")), len(load_samples(tmp_path / "dualfocus_train.json"))
    assert len(trainer.train_dataset) == n_plain + n_zoom
    assert sum(seen) == n_zoom  # one extra image (the crop) per DualFocus record, none per plain one
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, trainer.initial[k])}
    assert any(k.startswith("language_model.") for k in moved)
