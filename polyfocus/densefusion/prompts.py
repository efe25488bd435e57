"""DenseFusion's fusion prompts (spec densefusion.md §4; paper App. C.2): the experts' hints serialised into one
"external information" block, after an instruction.

- META_INSTRUCTION: what GPT-4V was given to write the 100K meta captions (a role, 18 policies, a paragraph on the
  hints). The paper's exact wording is in its appendix; this is our rendering of its structure and every policy.
- ENGINE_INSTRUCTION: the caption engine's short prompt (it learned the style from the meta captions).

The block (boxes normalised to [0, 1], three decimals, x1, y1, x2, y2; one line per detection, duplicates kept):

    [External Information]: [World Knowledge]: {alt-text}
    [Detection Box]:
    - {label}: [x1, y1, x2, y2]
    [OCR]:
    - {text line}
    [IMAGE]:

The appendix's templates have no tag field (Fig. 3 shows one): tags are not serialised, only used as detection
queries. The image itself goes to the captioner as its visual input, before this text (LLaVA's "<image>\\n" first).
"""

from __future__ import annotations

from polyfocus.experts.base import Hints

META_INSTRUCTION = """\
You write image descriptions that let a blind person understand an image completely. Follow these policies:
1. Describe as much of the image as possible: the foreground, the background and every salient object.
2. For each object give its texture and its attributes.
3. For each object give its location, its state and how many there are.
4. Say where the objects are relative to each other.
5. Describe the composition, the colours and the layout of the image.
6. Go through the image element by element; leave nothing visible out.
7. Name species, celebrities and landmarks explicitly instead of writing "a person" or "an animal".
8. Transcribe all visible text exactly, in its original language.
9. Describe only what is in the image; do not speculate.
10. Do not build chains of evidence or reason about what the image implies.
11. Do not describe a mood, an atmosphere or feelings.
12. Do not hedge with "probably", "appears to be", "seems" or "possibly".
13. Do not add interpretive or filler sentences.
14. Do not analyse or comment on the text you transcribe.
15. Do not add any analysis beyond the description.
16. Do not end with a summary or an interpretation.
17. Do not begin with phrases such as "The image shows" or "This image depicts".
18. Use at most 192 words.
The external information below (a short caption, detected objects with their boxes, recognised text) comes from \
other models and may be wrong or unrelated to the image: ignore what does not match the image. Never output boxes \
or coordinates, and never explain why a piece of information was not used."""

ENGINE_INSTRUCTION = """\
You are a powerful multimodal model. Write a detailed description of this image, using the extra information \
given below ([Caption], [Detection Box], [OCR]). The caption may carry world knowledge, or it may be unrelated to \
the image. Ignore information that is wrong. Do not output detection boxes, and do not explain information you \
did not use."""

PROMPTS = {"meta": META_INSTRUCTION, "engine": ENGINE_INSTRUCTION}


def hint_block(hints: Hints) -> str:
    """The external-information block of one image's hints."""
    lines = [f"[External Information]: [World Knowledge]: {hints.alt_text or ''}".rstrip(), "[Detection Box]:"]
    lines += [f"- {d.label}: [" + ", ".join(f"{v:.3f}" for v in d.box) + "]" for d in hints.detections]
    lines += ["[OCR]:", *(f"- {text}" for text in hints.ocr), "[IMAGE]:"]
    return "\n".join(lines)


def fusion_prompt(hints: Hints, kind: str = "engine") -> str:
    """The instruction ("meta": GPT-4V's, "engine": the caption engine's), a newline, then the hint block."""
    if kind not in PROMPTS:
        raise ValueError(f"prompt must be one of {list(PROMPTS)}, got {kind!r}")
    return PROMPTS[kind] + "\n" + hint_block(hints)
