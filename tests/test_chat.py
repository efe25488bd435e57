"""Pipeline, chat and `polyfocus chat` on a tiny saved checkpoint (random weights, own tokenizer)."""

import io
import random
import re
import shutil

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.cli import main
from polyfocus.data.images import ImageLoadError, ImageProcessor
from polyfocus.data.templates import TemplateError
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer
from polyfocus.infer.pipeline import Pipeline
from polyfocus.infer.stops import answer_text, until_stop
from polyfocus.model.presets import tiny_config

QUESTIONS = ["What colour is the star?", "How many objects are there in the image? Answer with one word."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved checkpoint dir (model + tokenizer with the vicuna_v1 chat_template + image processor) and 2 images."""
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    model = PolyfocusForConditionalGeneration(tiny_config(image_token_id=image_id)).eval()
    model.save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=56).save_pretrained(path)
    red, blue = path / "red.png", path / "blue.png"
    Image.new("RGB", (80, 60), (220, 30, 30)).save(red)
    Image.new("RGB", (40, 70), (20, 40, 230)).save(blue)
    return path, model, red, blue


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt[0], device="cpu")  # the CPU everywhere: identical numerics


def spy_on_generate(model, monkeypatch) -> list[dict]:
    """Records the inputs and output of every model.generate call."""
    seen, generate = [], model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        seen.append({**kwargs, "output": out})
        return out

    monkeypatch.setattr(model, "generate", spy)
    return seen


@pytest.fixture
def calls(pipe, monkeypatch):
    return spy_on_generate(pipe.model, monkeypatch)


@pytest.fixture(scope="module")
def two_turns(ckpt, pipe):
    """Pipeline.chat twice with one history (8 new tokens each): (history, the generate calls)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = spy_on_generate(pipe.model, monkeypatch)
        history = []
        for question in QUESTIONS:
            pipe.chat(ckpt[2], question, history, max_new_tokens=8)
    return history, seen


class Force(LogitsProcessor):
    """Forces the i-th new token to be ids[i] (then ids[-1] forever)."""

    def __init__(self, prompt_len, ids):
        self.prompt_len, self.ids = prompt_len, ids

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


def test_from_pretrained_loads_the_saved_parts(ckpt, pipe):
    saved = ckpt[1].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.model.state_dict().items())
    assert pipe.tokenizer.get_vocab() == default_tokenizer().get_vocab()
    assert pipe.image_processor == ImageProcessor(image_size=56)
    assert pipe.stop == "</s>"  # derived from the tokenizer's (vicuna_v1) chat_template
    hi = [{"role": "user", "content": "Hi"}]
    prompt = pipe.tokenizer.apply_chat_template(hi, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("USER: Hi ASSISTANT:") and pipe.encode(hi, 0) == pipe.tokenizer(prompt)["input_ids"]


def test_from_pretrained_without_processor_file_or_chat_template(ckpt, tmp_path):
    src = ckpt[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)  # no preprocessor_config.json, no chat_template.jinja
    with pytest.raises(TemplateError, match=re.escape(str(tmp_path))):
        Pipeline.from_pretrained(tmp_path, device="cpu")
    pipe = Pipeline.from_pretrained(tmp_path, template="chatml", device="cpu")
    config = pipe.model.config
    assert pipe.stop == "<|im_end|>"
    assert pipe.image_processor == ImageProcessor(image_size=config.vision_config.image_size,
                                                  aspect_ratio=config.image_aspect_ratio)


def test_batched_greedy_equals_one_by_one(ckpt, pipe, calls):
    _, _, red, blue = ckpt
    requests = [
        ([red], QUESTIONS[0]),
        ([], "Hi"),
        ([Image.open(blue), red], [{"role": "user", "content": "<image> and <image>: " + QUESTIONS[1]}]),
        (blue, [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "A square."},
                {"role": "user", "content": QUESTIONS[1]}]),
    ]
    batched = pipe.generate(requests, max_new_tokens=6)
    mask = calls[0]["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(requests) and (mask[:, -1] == 1).all()  # left padded, all lengths differ
    assert calls[0]["pixel_values"].shape[0] == 4
    singles = [pipe.generate([r], max_new_tokens=6)[0] for r in requests]
    assert batched == singles
    assert all(batched) and len(set(batched)) > 1


def test_an_image_asked_again_goes_through_the_tower_once_with_the_same_answers(ckpt, pipe, monkeypatch):
    """The pipeline's feature cache: three questions over two images run the tower on two images (first call),
    then on none (a later call: the cache outlives a call, as a benchmark's batches need); the answers equal
    an uncached pipeline's."""
    path, _, red, blue = ckpt
    cached = Pipeline.from_pretrained(path, device="cpu")
    uncached = Pipeline.from_pretrained(path, device="cpu", feature_cache_bytes=0)
    assert uncached.model.vision_feature_cache is None
    tower_images = []
    forward = cached.model.vision_tower.forward
    monkeypatch.setattr(cached.model.vision_tower, "forward",
                        lambda pixels, **kw: tower_images.append(len(pixels)) or forward(pixels, **kw))
    requests = [([red], QUESTIONS[0]), ([blue], QUESTIONS[0]), ([red], QUESTIONS[1])]
    assert cached.generate(requests, max_new_tokens=6) == uncached.generate(requests, max_new_tokens=6)
    assert tower_images == [2]
    assert cached.generate(requests[::-1], max_new_tokens=6, batch_size=1) == \
        uncached.generate(requests[::-1], max_new_tokens=6, batch_size=1)
    assert tower_images == [2]
    cache = cached.model.vision_feature_cache
    assert (len(cache.entries), cache.hits, cache.misses) == (2, 3, 3)  # the first batch: red twice, computed once


def test_stream_pieces_add_up_to_the_answer(ckpt, pipe, two_turns):
    red, answer = ckpt[2], two_turns[0][1]["content"]
    history = []
    stream = pipe.chat(red, QUESTIONS[0], history, stream=True, max_new_tokens=8)
    assert history == []  # nothing generated yet
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert history[-1] == {"role": "assistant", "content": answer}


def test_until_stop_equals_cutting_the_whole_text():
    rng = random.Random(0)
    alphabet = [" ", "\n", "a", "b", "<", "/", "s", ">", "</s>", "\n\n"]
    for stop in ["</s>", "\n", "ab", ""]:
        for _ in range(500):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            assert "".join(until_stop(pieces, stop)) == answer_text(text, stop), (stop, pieces)


def test_multi_turn_image_in_first_turn_and_prompt_grows(pipe, two_turns):
    history, calls = two_turns
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "<image>\n" + QUESTIONS[0] and history[2]["content"] == QUESTIONS[1]
    assert [history[1]["content"], history[3]["content"]] == [pipe.decode(c["output"][0, c["input_ids"].shape[1]:])
                                                               for c in calls]
    first_turn = pipe.encode(history[:2], 1, add_generation_prompt=False)
    second_prompt = calls[1]["input_ids"][0].tolist()
    assert second_prompt[: len(first_turn)] == first_turn and len(second_prompt) > len(first_turn)
    image_id, n = pipe.model.config.image_token_id, pipe.model.config.num_image_tokens
    assert second_prompt.count(image_id) == n and calls[1]["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("template", ["auto", "plain"])
def test_generation_stops_at_eos_or_the_stop_string(ckpt, pipe, calls, template):
    red, tok = ckpt[2], pipe.tokenizer
    pipe = Pipeline(pipe.model, tok, pipe.image_processor, template)  # auto: stop at </s> (EOS); plain: at "\n"
    stop = [tok.eos_token_id] if template == "auto" else tok.encode("\n", add_special_tokens=False)
    ids = tok.encode(" red circle", add_special_tokens=False) + stop + tok.encode(" blue", add_special_tokens=False)
    prompt_len = pipe.prepare([(red, QUESTIONS[0])])["input_ids"].shape[1]
    force = LogitsProcessorList([Force(prompt_len, ids)])
    assert pipe.generate([(red, QUESTIONS[0])], max_new_tokens=20, logits_processor=force) == ["red circle"]
    assert calls[0]["output"].shape[1] == prompt_len + len(ids) - 1  # stopped at the stop token: no " blue"


def test_wrong_image_count_and_bad_files_name_the_file(ckpt, pipe, tmp_path):
    red = ckpt[2]
    with pytest.raises(ValueError, match=r"request 1: .*2 <image> tag\(s\) but 1 image\(s\).*red\.png"):
        pipe.generate([([], "Hi"), ([red], "<image> <image> compare")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match=re.escape(str(broken))):
        pipe.chat(broken, QUESTIONS[0])
    with pytest.raises(ImageLoadError, match=re.escape(str(tmp_path / "missing.png"))):
        pipe.chat(tmp_path / "missing.png", QUESTIONS[0], stream=True)  # fails at the call, not mid-stream


def test_max_new_tokens_is_capped_by_the_context(ckpt, pipe, monkeypatch):
    red = ckpt[2]
    prompt_len = pipe.prepare([(red, QUESTIONS[0])])["input_ids"].shape[1]
    text_config = pipe.model.config.text_config
    monkeypatch.setattr(text_config, "max_position_embeddings", prompt_len)
    with pytest.raises(ValueError, match=f"prompt of {prompt_len} tokens exceeds"):
        pipe.chat(red, QUESTIONS[0])
    monkeypatch.setattr(text_config, "max_position_embeddings", prompt_len + 2)
    red_ids = pipe.tokenizer.encode(" red red red red", add_special_tokens=False)
    force = LogitsProcessorList([Force(prompt_len, red_ids)])
    assert pipe.chat(red, QUESTIONS[0], max_new_tokens=50, logits_processor=force) == "red red"


def test_a_pipeline_around_a_model_built_in_memory(ckpt, pipe, two_turns):
    """The pipeline is the chat API (no `model.chat`): one around the in-memory model answers as the loaded one."""
    _, model, red, _ = ckpt
    answer = two_turns[0][1]["content"]
    in_memory = Pipeline(model, pipe.tokenizer, pipe.image_processor)
    assert in_memory.chat(red, QUESTIONS[0], max_new_tokens=8) == answer


def test_cli_prompt_prints_the_pipeline_answer(ckpt, two_turns, capsys):
    path, _, red, _ = ckpt
    main(["chat", "--model", str(path), "--image", str(red), "--prompt", QUESTIONS[0], "--temperature", "0",
          "--max-new-tokens", "8", "--device", "cpu"])
    assert capsys.readouterr().out == two_turns[0][1]["content"] + "\n"


def test_cli_repl_two_turns_then_eof(ckpt, two_turns, capsys, monkeypatch):
    path, _, red, _ = ckpt
    args = ["chat", "--model", str(path), "--image", str(red), "--temperature", "0", "--max-new-tokens", "8",
            "--device", "cpu"]
    answers = [m["content"] for m in two_turns[0][1::2]]
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[0] + "\n" + QUESTIONS[1] + "\n"))
    main(args)
    assert capsys.readouterr().out == "".join(f"USER: ASSISTANT: {a}\n" for a in answers) + "USER: \n"

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[0] + "\n\n" + QUESTIONS[1] + "\n"))
    main(args)  # an empty line ends the chat
    assert capsys.readouterr().out == f"USER: ASSISTANT: {answers[0]}\nUSER: "


def test_cli_bad_image_is_a_usage_error(ckpt, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nope.png"))):
        main(["chat", "--model", str(ckpt[0]), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi"])
