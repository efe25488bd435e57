"""The CLI verbs reach the library functions with the user's arguments."""

import json

import pytest

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



def test_synth_takes_the_demos_scene_settings(tmp_path, capsys):
    """--max-objects and --sizes: the scenes `polyfocus demo` trains on (docs/evaluation.md's example); a size
    synthworld does not know is one line."""
    main(["synth", "--out", str(tmp_path), "--n", "40", "--image-size", "112", "--max-objects", "3",
          "--sizes", "medium,large", "--families", "colour"])
    scenes = [Scene.from_dict(json.loads(line)) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert max(len(s.objects) for s in scenes) == 3
    assert {o.size for s in scenes for o in s.objects} == {"medium", "large"}
    with pytest.raises(SystemExit, match="synth: --sizes: unknown object sizes \\['huge'\\]"):
        main(["synth", "--out", str(tmp_path), "--n", "1", "--sizes", "huge"])

# ---- errors: one line, and a missing path never reaches a model hub --------------------------------------------

from PIL import Image  # noqa: E402


@pytest.fixture
def hub_calls(monkeypatch):
    """The model-hub downloads transformers attempts (offline in the tests: they fail, after a lookup)."""
    import transformers.utils.hub as hub

    calls, download = [], hub.hf_hub_download

    def recorded(*args, **kwargs):
        calls.append(args[:2])
        return download(*args, **kwargs)

    monkeypatch.setattr(hub, "hf_hub_download", recorded)
    return calls


def missing_path_commands(tmp_path):
    from polyfocus.data.tokenizer import build_tokenizer
    from polyfocus.synthworld.scenes import export

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    build_tokenizer(save_dir=tmp_path / "tok")
    export(str(tmp_path / "sw"), 2, seed=0, image_size=64, families=["colour"], split="test")
    train = ["--data_path", "x.json", "--output_dir", "o", "--report_to", "none"]
    return {
        "eval": ["eval", "--model", "runs/stage2", "--benchmark", "synthworld", "--data", str(tmp_path / "sw")],
        "chat": ["chat", "--model", "runs/stage2", "--image", str(tmp_path / "red.png"), "--prompt", "Hi"],
        "serve": ["serve", "--model", "runs/stage2"],
        "convert": ["convert", "runs/stage2", "out", "--to", "hf"],
        "train": ["train", "--model_name_or_path", "runs/stage2", *train],
        "train_with_tokenizer": ["train", "--tokenizer_name_or_path", str(tmp_path / "tok"),
                                 "--model_name_or_path", "runs/stage2", *train],
    }


@pytest.mark.parametrize("command", ["eval", "chat", "serve", "convert", "train", "train_with_tokenizer"])
def test_a_missing_model_directory_is_one_line_at_once_and_never_a_hub_lookup(tmp_path, monkeypatch, hub_calls,
                                                                               command):
    argv = missing_path_commands(tmp_path)[command]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith(f"polyfocus {argv[0]}: ") and "\n" not in message
    assert "runs/stage2: no such directory" in message
    assert hub_calls == []


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^polyfocus convert: .*empty: no config\.json; is this a model directory\?$"):
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^polyfocus train: .*nope\.yaml"):
        main(["train", str(tmp_path / "nope.yaml")])
    monkeypatch.setenv("POLYFOCUS_DEBUG", "1")  # the traceback, on demand
    with pytest.raises(FileNotFoundError):
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    monkeypatch.delenv("POLYFOCUS_DEBUG")

    from polyfocus.synthworld import scenes

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(scenes, "export", bug)  # what `polyfocus synth` calls
    with pytest.raises(RuntimeError, match="a bug"):
        main(["synth", "--out", str(tmp_path / "s")])
