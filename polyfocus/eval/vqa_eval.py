"""VQA answer normalisation and soft accuracy, exactly as the reference evaluators compute them.

Two evaluators are in use, and they differ in small ways (spec llava_base.md §4.1):

- `normalize_answer` is EvalAI's answer processor as LLaVA copies it (`llava/eval/m4c_evaluator.py`,
  `EvalAIAnswerProcessor`): LLaVA applies it to every VQAv2 / VizWiz answer before upload, and the TextVQA
  evaluator (`textvqa_accuracy`) applies it to the prediction and to all ten human answers.
- `official_vqa_accuracy` is the official VQA evaluator as it is today (`GT-Vision-Lab/VQA`, `vqaEval.py` since
  a013f00, 2021-03-11, "Fixed processing answers bug"; `VQA_RULES`, recorded in results): newlines, tabs and outer
  spaces go from the prediction and from every human answer; then, only when the human answers disagree (more
  than one distinct answer), the prediction and every human answer get `process_punctuation` +
  `process_digit_article` (no "'s" split). When they agree, nothing else is processed: "Two" against ten "2" is
  0 there (the upload, through the EvalAI processor, is already "2"). Before that fix the prediction was always
  processed and the human answers got punctuation processing only ("two" against 8 x "two" + 2 x "2" scored 0.6
  instead of 1.0).

Quirks kept on purpose (they change scores):
- the period regex `(?!<=\\d)(\\.)(?!\\d)` has a malformed look-behind, so a '.' is removed unless a digit
  follows it, and `re.UNICODE` is passed as the `count` argument: at most 32 periods go;
- `process_punctuation` deletes every punctuation mark (instead of turning it into a space) as soon as the
  text holds a digit-comma-digit anywhere, or the mark stands next to a space;
- contraction keys with a capital ("Im", "Ive") never match, since the words are lower-cased first.
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_RULES = "vqaEval.py@a013f00 (2021-03-11)"  # the official rule version official_vqa_accuracy follows
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP_M4C = re.compile(r"(?<=\d)(\,)+(?=\d)")    # EvalAIAnswerProcessor's
COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")      # vqaEval.py's
_RE_UNICODE_AS_COUNT = int(re.UNICODE)                  # 32: see the module docstring


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP_M4C) -> str:
    """Delete or space out the punctuation marks, then drop periods not followed by a digit (at most 32)."""
    out = text
    number_comma = comma_strip.search(text) is not None
    for p in PUNCTUATION:  # the tests look at the original text; the edits accumulate on `out`
        if p + " " in text or " " + p in text or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_RE_UNICODE_AS_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions, single spaces."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (LLaVA's `EvalAIAnswerProcessor()(text)`)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def soft_score(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy of an already-normalised prediction against the (normalised) human answers:
    mean over i of min(1, #{j != i : answers[j] == prediction} / 3). With 10 answers: 3 or more matches -> 1."""
    if not answers:
        raise ValueError("soft_score: no reference answers")
    matches = sum(a == prediction for a in answers)
    # Leaving out answer i removes one match exactly when answers[i] is itself a match.
    total = sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers)
    return total / len(answers)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """m4c's TextVQAAccuracyEvaluator for one question: both sides through `normalize_answer`."""
    return soft_score(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def official_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """vqaEval.py (VQA_RULES) for one question: what EvalAI computes on an uploaded VQAv2 answer. Written from the
    official code's rules, not copied (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py)."""
    prediction, answers = _strip_breaks(prediction), [_strip_breaks(a) for a in answers]
    if len(set(answers)) > 1:  # only then is anything normalised, on both sides
        prediction, answers = _official_normal(prediction), [_official_normal(a) for a in answers]
    return soft_score(prediction, answers)


def _strip_breaks(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _official_normal(text: str) -> str:
    return process_digit_article(process_punctuation(text, COMMA_STRIP_OFFICIAL))
