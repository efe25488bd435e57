"""DenseFusion's fusion prompts (polyfocus/densefusion/prompts.py) against hand-written strings (spec §4)."""

import pytest

from polyfocus.densefusion.prompts import ENGINE_INSTRUCTION, META_INSTRUCTION, fusion_prompt, hint_block
from polyfocus.experts import Detection, Hints

HINTS = Hints(
    alt_text="Happy birthday Anna! cake ideas",
    tags=["birthday", "cake", "candle"],  # not serialised: the appendix's templates have no tag field
    detections=[Detection("person", (0.3534, 0.0956, 0.89249, 0.9914), 0.9, "owlv2"),
                Detection("cake", (0.1, 0.5, 0.25, 0.7), 0.8, "owlv2"),
                Detection("person", (0.0, 0.0, 1.0, 1.0), 0.4, "owlv2")],  # duplicated labels: once per instance
    ocr=["HAPPY BIRTHDAY", "Anna 30"])

EXPECTED_BLOCK = """\
[External Information]: [World Knowledge]: Happy birthday Anna! cake ideas
[Detection Box]:
- person: [0.353, 0.096, 0.892, 0.991]
- cake: [0.100, 0.500, 0.250, 0.700]
- person: [0.000, 0.000, 1.000, 1.000]
[OCR]:
- HAPPY BIRTHDAY
- Anna 30
[IMAGE]:"""


def test_hint_block_is_the_papers_layout():
    assert hint_block(HINTS) == EXPECTED_BLOCK


def test_empty_hints_keep_every_header():
    assert hint_block(Hints()) == ("[External Information]: [World Knowledge]:\n[Detection Box]:\n[OCR]:\n"
                                   "[IMAGE]:")


def test_engine_prompt():
    assert fusion_prompt(HINTS) == (
        "You are a powerful multimodal model. Write a detailed description of this image, using the extra "
        "information given below ([Caption], [Detection Box], [OCR]). The caption may carry world knowledge, or it "
        "may be unrelated to the image. Ignore information that is wrong. Do not output detection boxes, and do "
        "not explain information you did not use.\n" + EXPECTED_BLOCK)
    assert fusion_prompt(HINTS, "engine") == ENGINE_INSTRUCTION + "\n" + EXPECTED_BLOCK


def test_meta_prompt_has_the_role_18_policies_and_the_hint_paragraph():
    prompt = fusion_prompt(HINTS, "meta")
    assert prompt == META_INSTRUCTION + "\n" + EXPECTED_BLOCK
    lines = META_INSTRUCTION.split("\n")
    assert lines[0] == ("You write image descriptions that let a blind person understand an image completely. "
                        "Follow these policies:")
    assert [line.split(".")[0] for line in lines[1:19]] == [str(i) for i in range(1, 19)]
    assert lines[8] == "8. Transcribe all visible text exactly, in its original language."
    assert lines[18] == "18. Use at most 192 words."
    assert lines[19].startswith("The external information below") and "Never output boxes" in lines[19]
    assert len(lines) == 20


def test_unknown_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt must be one of"):
        fusion_prompt(HINTS, "gpt4v")
