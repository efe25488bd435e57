"""The engine on synthworld (`polyfocus densefusion synthworld`): the inputs that turn a synthworld split (as
`polyfocus demo` or bench/science.py export it) into the engine's job.

- images.jsonl: one record per scene image, whose alt-text is the scene's short caption ("A red star and two blue
  circles on a beige background."): the world knowledge LAION's alt-text plays in DenseFusion;
- short_captions.json: the same short captions as a LLaVA captioning file: the baseline that pretraining on the
  engine's dense captions is compared with.

Both name images as the split's own file does (images/<scene id>.png, relative to the data folder). The scenes'
true dense captions (<split>.json of `polyfocus demo`'s pretraining data) play GPT-4V's part for the engine's
training set: `--captioner file:DATA/pretrain.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from polyfocus.data.files import write_atomic
from polyfocus.synthworld.scenes import llava_sample, read_scenes
from polyfocus.synthworld.tasks import make_task


def synthworld_inputs(data: str | Path, out: str | Path, split: str = "pretrain") -> dict:
    """Write out/images.jsonl and out/short_captions.json for the scenes of `split` in data/scenes.jsonl."""

    out = Path(out)
    scenes = read_scenes(data, split)
    out.mkdir(parents=True, exist_ok=True)
    samples = [llava_sample(scene, make_task(scene, "caption")) for scene in scenes]
    images = [{"image_id": scene.id, "image_path": s["image"], "alt_text": s["conversations"][1]["value"]}
              for scene, s in zip(scenes, samples)]
    write_atomic(out / "images.jsonl", "".join(json.dumps(r) + "\n" for r in images))
    write_atomic(out / "short_captions.json", json.dumps(samples))
    return {"scenes": len(scenes), "images": str(out / "images.jsonl"),
            "short_captions": str(out / "short_captions.json")}
