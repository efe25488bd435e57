"""The CLI verbs reach the library functions with the user's arguments."""

import json

from polyfocus.cli import main
from polyfocus.synthworld.scenes import Scene


def test_synth_writes_the_requested_families_and_scenes(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path), "--n", "3", "--seed", "7", "--families", "count", "--image-size", "192"])
    summary = json.loads(capsys.readouterr().out)
    samples = json.loads((tmp_path / "train.json").read_text())
    scenes = {s.id: s for s in map(Scene.from_dict, map(json.loads, (tmp_path / "scenes.jsonl").read_text().splitlines()))}
    assert summary["n_scenes"] == 3 and summary["families"] == {"count": len(samples)}
    assert {s["family"] for s in samples} == {"count"}
    for sample in samples:
        assert (tmp_path / sample["image"]).is_file()
        assert scenes[sample["scene_id"]].image_size == 192
