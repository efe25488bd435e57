"""The engine's records as training files (`polyfocus densefusion export`).

- `llava`: one captioning sample per image, as the spec's conversion for LLaVA's loader ({"id", "image",
  "conversations": [human "<image>\\n" + prompt, gpt caption]}). Not needed by `polyfocus train`, which reads the
  jsonl itself; for tools that only read LLaVA JSON.
- `engine-sft`: the caption engine's training set (spec §5): the human turn is the fusion prompt with the image's
  hints (the engine prompt by default), the answer is the caption. Run the engine with the reference captions
  (`--captioner file:...` or GPT-4V through `openai:...`) to get the records, then this.
"""

from __future__ import annotations

import os

from polyfocus.data.formats import DENSE_CAPTION_PROMPT, Sample, read_records, save_samples
from polyfocus.densefusion.prompts import fusion_prompt
from polyfocus.experts import Hints

FORMATS = ("llava", "engine-sft")


def export(records_file: str | os.PathLike, out: str | os.PathLike, format: str = "llava",
           prompt: str = "engine") -> int:
    """records_file: an engine run's captions.jsonl (or any DenseFusion jsonl; engine-sft needs its hints). Writes
    `out` (JSON list, or JSONL if it ends in .jsonl); returns the number of samples."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    samples = []
    for where, record in read_records(os.fspath(records_file), None):
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{records_file}: {where}: no caption (a failed image? those are in failed.jsonl)")
        if format == "engine-sft":
            if "hints" not in record:
                raise ValueError(f"{records_file}: {where}: no hints: engine-sft needs the engine's own records")
            question = fusion_prompt(Hints.from_dict(record["hints"]), prompt)
        else:
            question = DENSE_CAPTION_PROMPT
        messages = [{"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": caption}]
        samples.append(Sample(record.get("image_id"), messages, [record.get("image") or record["image_path"]]))
    save_samples(samples, out, to="llava")
    return len(samples)
