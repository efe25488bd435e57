"""The built-in byte-level BPE tokenizer: special tokens, chat template, save/load, determinism."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from polyfocus.data.templates import TEMPLATES, TemplateError, encode, render
from polyfocus.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, default_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nHow many stars are there?"},
    {"role": "assistant", "content": "Three."},
    {"role": "user", "content": "What colour is the circle? <image>"},
]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_special_tokens_are_single_fixed_ids(tok):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok(token, add_special_tokens=False)["input_ids"] == [i], token
        assert tok.convert_ids_to_tokens(i) == token
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.image_token == "<image>" and tok.image_token_id == 4  # as the tiny model presets expect
    assert {"<|im_end|>", "<|eot_id|>", "<|end|>"} <= set(SPECIAL_TOKENS)
    # inside text too: "</s>" after an answer is the eos id, not "<", "/", "s", ">"
    assert tok("A cat.</s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


def test_bos_follows_template_family(tok):
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok("hi", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    chatml = build_tokenizer(chat_template="chatml")
    assert chatml.bos_token_id not in chatml("hi")["input_ids"]


def test_newlines_are_isolated():
    # encode's piecewise tokenization relies on it: a segment that starts after "\n" (a ChatML reply)
    # must tokenize alone as in the full string, even when the corpus teaches "\n\n" or "\n " merges.
    t = build_tokenizer(corpus=["code:\n\n    indented\n \n  x\n\n\n"] * 20, vocab_size=400, chat_template="chatml")
    nl = t.convert_tokens_to_ids("Ċ")
    assert t("\n\n  x\n \n", add_special_tokens=False)["input_ids"].count(nl) == 4
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\n  indented"}]
    assert encode(conv, t, "chatml", 4).input_ids == t(render(conv, "chatml"))["input_ids"]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30))
def test_decode_roundtrip_any_text(text):
    tok = default_tokenizer()
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: no <unk>


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_equals_render(name):
    t = build_tokenizer(chat_template=name)
    conv = [CONV[1], CONV[2]] if name == "plain" else CONV
    gen = conv[-1]["role"] == "user"
    assert t.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == render(conv, name, gen)
    if name != "plain":
        assert t.apply_chat_template(CONV[1:3], tokenize=False) == render(CONV[1:3], name)


def test_save_load_roundtrip_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = build_tokenizer(save_dir=tmp_path, chat_template="llama3")
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<image>\nWhat colour is the star? Red. ünïcödé 漢字\n\n</s><|eot_id|>"
    assert loaded(text)["input_ids"] == saved(text)["input_ids"]
    assert loaded.get_vocab() == saved.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert loaded.image_token_id == 4
    assert loaded.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == render(CONV, "llama3", True)


def test_deterministic_and_corpus_dependent():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    custom = build_tokenizer(corpus=["hello world, hello shapes"] * 3, vocab_size=300)
    assert len(custom) <= 300
    assert custom.get_vocab() != a.get_vocab()
    assert custom("hello")["input_ids"][1:] == [custom.convert_tokens_to_ids("hello")]
    assert len(a) <= 2048


def test_default_tokenizer_is_cached():
    assert default_tokenizer() is default_tokenizer()


def test_unknown_chat_template():
    with pytest.raises(TemplateError, match="unknown conversation template"):
        build_tokenizer(chat_template="nope")
