"""Conversation templates: exact strings, piecewise encoding == whole-string tokenization, labels."""

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfocus.data.templates import (
    IGNORE_INDEX, IMAGE_TOKEN, TEMPLATES, TemplateError, encode, get_template, move_image_to_front, render,
    template_from_tokenizer,
)
from polyfocus.data.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, default_corpus, default_tokenizer

CONV = [
    {"role": "system", "content": "You see shapes."},
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour?"},
    {"role": "assistant", "content": "Red."},
]
V1_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VISION_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")

# Hand-written expected renderings of CONV (spec llava_base.md §2 and the models' published formats).
EXPECTED = {
    # spec: "<sys> USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: ... ASSISTANT: ...</s>"
    "vicuna_v1": "You see shapes. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                 "USER: What colour? ASSISTANT: Red.</s>",
    "llava_v1": "You see shapes. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                "USER: What colour? ASSISTANT: Red.</s>",
    "llava_llama_2": "[INST] <<SYS>>\nYou see shapes.\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A cat. </s>"
                     "<s>[INST] What colour? [/INST] Red. </s>",
    "mistral_instruct": "[INST] <<SYS>>\nYou see shapes.\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A cat. </s>"
                        "[INST] What colour? [/INST] Red. </s>",
    "chatml": "<|im_start|>system\nYou see shapes.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
              "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nWhat colour?<|im_end|>\n"
              "<|im_start|>assistant\nRed.<|im_end|>\n",
    "chatml_direct": "<|im_start|>system\nYou see shapes.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
                     "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nWhat colour?<|im_end|>"
                     "<|im_start|>assistant\nRed.<|im_end|>",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou see shapes.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat colour?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>",
    "phi3": "<|system|>\nYou see shapes.<|end|>\n<|user|>\n<image>\nWhat is this?<|end|>\n"
            "<|assistant|>\nA cat.<|end|>\n<|user|>\nWhat colour?<|end|>\n<|assistant|>\nRed.<|end|>\n",
}
# The supervised text of a reply in each template: (before, after) the reply content.
REPLY = {
    "plain": ("", "\n"),
    "vicuna_v1": (" ", "</s>"), "llava_v1": (" ", "</s>"),
    "llava_llama_2": (" ", " </s>"), "mistral_instruct": (" ", " </s>"),
    "chatml": ("", "<|im_end|>"), "chatml_direct": ("", "<|im_end|>"), "mpt": ("", "<|im_end|>"),
    "llama3": ("", "<|eot_id|>"), "phi3": ("", "<|end|>"),
}


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ----------------------------------------------------------------------------- exact strings


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_exact(name):
    assert render(CONV, name) == EXPECTED[name]


def test_render_default_system_prompts_and_generation_prompt():
    q = [{"role": "user", "content": "<image>\nWhat is this?"}]
    # spec §2: the v1.5 generation prompt
    assert render(q, "vicuna_v1", add_generation_prompt=True) == V1_SYS + " USER: <image>\nWhat is this? ASSISTANT:"
    assert render(q, "v1", add_generation_prompt=True) == render(q, "vicuna_v1", add_generation_prompt=True)
    # llava_v1 is the CLI variant: "curious human ... the human's questions"
    assert render(q, "llava_v1").startswith("A chat between a curious human and an artificial intelligence "
                                            "assistant. The assistant gives helpful, detailed, and polite answers "
                                            "to the human's questions. USER:")
    assert render(q, "llava_llama_2", add_generation_prompt=True) == (
        f"[INST] <<SYS>>\n{VISION_SYS}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]")
    # mistral_instruct has no default system prompt, hence no <<SYS>> block
    assert render(q, "mistral_instruct", add_generation_prompt=True) == "[INST] <image>\nWhat is this? [/INST]"
    assert render(q, "chatml", add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    assert render(q, "chatml_direct", add_generation_prompt=True) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\n")
    assert render(q, "mpt", add_generation_prompt=True).startswith(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|><|im_start|>user\n")
    assert render(q, "mistral_direct") == render(q, "chatml_direct")
    assert render(q, "phi3", add_generation_prompt=True) == "<|user|>\n<image>\nWhat is this?<|end|>\n<|assistant|>\n"
    assert render(q, "llama3", add_generation_prompt=True).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_render_plain_is_image_plus_caption():
    # LLaVA's preprocess_plain: the instruction (and any system prompt) is dropped
    conv = [CONV[0], {"role": "user", "content": "Describe.\n<image>"}, {"role": "assistant", "content": "A red star."}]
    assert render(conv, "plain") == "<image>A red star.\n"
    assert render(conv[:2], "plain", add_generation_prompt=True) == "<image>"
    two = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "x"}]
    assert render(two, "plain") == "<image><image>x\n"


def test_stop_strings():
    stops = {name: get_template(name).stop for name in TEMPLATES}
    assert stops["vicuna_v1"] == "</s>" and stops["llava_llama_2"] == "</s>" and stops["plain"] == "\n"
    assert stops["chatml"] == "<|im_end|>" and stops["llama3"] == "<|eot_id|>" and stops["phi3"] == "<|end|>"


# ----------------------------------------------------------------------------- encode, fixed cases


def supervised_spans(enc):
    spans, start = [], None
    for i, label in enumerate([*enc.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_encode_vicuna_labels(tok):
    img = tok.image_token_id
    enc = encode(CONV, tok, "vicuna_v1", img, image_seq_lens=[5])
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.input_ids.count(img) == 5
    first = enc.input_ids.index(img)
    assert enc.input_ids[first:first + 5] == [img] * 5
    assert [decode(tok, enc.input_ids[s:e]) for s, e in supervised_spans(enc)] == [" A cat.</s>", " Red.</s>"]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(enc.labels, enc.input_ids))


def test_encode_plain_like_preprocess_plain(tok):
    conv = [{"role": "user", "content": "Describe.\n<image>"}, {"role": "assistant", "content": "A red star."}]
    enc = encode(conv, tok, "plain", tok.image_token_id, [3])
    # [BOS, image x3, caption..., "\n"]: BOS and image masked, caption + "\n" supervised, no EOS
    assert enc.input_ids[:4] == [tok.bos_token_id] + [tok.image_token_id] * 3
    assert enc.labels[:4] == [IGNORE_INDEX] * 4
    assert enc.labels[4:] == enc.input_ids[4:]
    assert decode(tok, enc.input_ids[4:]) == "A red star.\n"
    assert tok.eos_token_id not in enc.input_ids


def test_bos_follows_tokenizer(tok):
    # chatml's own rendering does not start with <s>; whether a BOS is prepended is the tokenizer's call
    assert encode(CONV, tok, "chatml", 4, [1]).input_ids[0] == tok.bos_token_id
    from polyfocus.data.tokenizer import build_tokenizer

    chatml_tok = build_tokenizer(chat_template="chatml")
    ids = encode(CONV, chatml_tok, "chatml", 4, [1]).input_ids
    assert ids[0] == chatml_tok.convert_tokens_to_ids("<|im_start|>")


# ----------------------------------------------------------------------------- property tests

_SPECIALS = (*SPECIAL_TOKENS, "<s>", "</s>")
# Whitespace at the edges is where piecewise and whole-string tokenization can disagree: draw it often.
_edge = st.sampled_from(["", "", " ", "  ", "\n", "\n ", " \n", "\n\n", "\t"])
_body = st.text(
    alphabet=st.one_of(st.sampled_from(list(" \n\t.:?'<>/|[]sSaA1é漢")), st.characters(codec="utf-8")),
    max_size=12,
)
_text = st.builds(lambda a, b, c: a + b + c, _edge, _body, _edge).filter(lambda s: not any(t in s for t in _SPECIALS))


@st.composite
def conversations(draw, plain=False, ends_with_reply=None):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(_text)})
    n_pairs = 1 if plain else draw(st.integers(1, 3))
    n_images = 0
    for _ in range(n_pairs):
        parts = draw(st.lists(st.one_of(_text, st.just(IMAGE_TOKEN)), max_size=4))
        if plain and IMAGE_TOKEN not in parts:
            parts.append(IMAGE_TOKEN)
        n_images += parts.count(IMAGE_TOKEN)
        msgs.append({"role": "user", "content": "".join(parts)})
        msgs.append({"role": "assistant", "content": draw(_text)})
    if ends_with_reply is False or (ends_with_reply is None and not plain and draw(st.booleans())):
        msgs.pop()  # a conversation may end with an unanswered user message
    return msgs, n_images


def _expand_images(ids, image_id, lens):
    out, lens = [], iter(lens)
    for i in ids:
        out += [i] * next(lens) if i == image_id else [i]
    return out


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(data=st.data())
def test_encode_property(data):
    tok = default_tokenizer()
    name = data.draw(st.sampled_from(sorted(TEMPLATES)))
    msgs, n_images = data.draw(conversations(plain=name == "plain"))
    lens = data.draw(st.lists(st.integers(1, 4), min_size=n_images, max_size=n_images))
    img = tok.image_token_id
    enc = encode(msgs, tok, name, img, lens)
    text = render(msgs, name)

    # piecewise == whole string, with each <image> expanded to its requested length
    assert enc.input_ids == _expand_images(tok(text)["input_ids"], img, lens)
    assert len(enc.labels) == len(enc.input_ids)
    # supervised = exactly the replies and their end tokens, one contiguous span each; images never
    spans = supervised_spans(enc)
    before, after = REPLY[name]
    replies = [before + m["content"] + after for m in msgs if m["role"] == "assistant"]
    assert [decode(tok, enc.input_ids[s:e]) for s, e in spans] == replies
    assert all(enc.labels[i] == enc.input_ids[i] for s, e in spans for i in range(s, e))
    assert all(label == IGNORE_INDEX for label, i in zip(enc.labels, enc.input_ids) if i == img)
    # the Jinja chat template renders the same string
    jinja = get_template(name).to_jinja()
    assert tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False) == text


@PROPERTY
@given(data=st.data())
def test_generation_prompt_is_prefix_of_training_sequence(data):
    tok = default_tokenizer()
    name = data.draw(st.sampled_from(sorted(TEMPLATES)))
    msgs, n_images = data.draw(conversations(plain=name == "plain", ends_with_reply=True))
    lens = data.draw(st.lists(st.integers(1, 3), min_size=n_images, max_size=n_images))
    prompt = encode(msgs[:-1], tok, name, 4, lens, add_generation_prompt=True)
    full = encode(msgs, tok, name, 4, lens)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids  # inference sees exactly the training prefix
    assert full.labels[:n] == prompt.labels
    before, after = REPLY[name]
    assert full.labels[n] != IGNORE_INDEX  # the first generated token is trained
    assert decode(tok, full.input_ids[n:]).startswith(before + msgs[-1]["content"] + after)
    assert render(msgs, name).startswith(render(msgs[:-1], name, add_generation_prompt=True))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tokenizer_template_matches_builtin(data):
    tok = default_tokenizer()
    # "auto": labels by prefix rendering of a chat template agree with the built-in segments
    name = data.draw(st.sampled_from(sorted(TEMPLATES)))
    msgs, n_images = data.draw(conversations(plain=name == "plain"))
    lens = [2] * n_images
    auto = template_from_tokenizer(tok, chat_template=get_template(name).to_jinja())
    assert encode(msgs, tok, auto, 4, lens) == encode(msgs, tok, name, 4, lens)
    if msgs[-1]["role"] == "user":
        assert encode(msgs, tok, auto, 4, lens, True) == encode(msgs, tok, name, 4, lens, True)


def test_auto_uses_the_tokenizers_chat_template(tok):
    assert encode(CONV, tok, "auto", 4, [2]) == encode(CONV, tok, "vicuna_v1", 4, [2])  # built for vicuna_v1
    assert render(CONV, get_template("tokenizer", tok)) == EXPECTED["vicuna_v1"]


def test_auto_with_bos_in_chat_template_has_one_bos(tok):
    # HF templates (Llama, Mistral) write {{ bos_token }} themselves: encode must not add a second one
    auto = template_from_tokenizer(tok, "{{ bos_token }}" + get_template("vicuna_v1").to_jinja())
    assert render(CONV, auto) == "<s>" + EXPECTED["vicuna_v1"]
    assert encode(CONV, tok, auto, 4, [2]) == encode(CONV, tok, "vicuna_v1", 4, [2])


def test_auto_rejects_templates_that_are_not_prefix_stable(tok):
    jinja = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="prefix"):
        encode(CONV, tok, template_from_tokenizer(tok, jinja), 4, [1])


# ----------------------------------------------------------------------------- SentencePiece-style tokenizer


@functools.lru_cache(maxsize=None)
def llama_tokenizer():
    """A tiny Llama-style tokenizer (Metaspace "▁" dummy prefix, byte fallback, legacy=False)."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaTokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([line.replace("\n", " ") for line in default_corpus()], vocab_size=800,
                           special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    model = json.loads(sp.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *CHAT_TOKENS]})
    return tok


def test_llama_tokenizer_dummy_prefix_is_not_added_to_pieces():
    tok = llama_tokenizer()
    assert tok.tokenize("A cat.")[0] == "▁A"  # alone, text gets the dummy prefix...
    conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A cat."}]
    enc = encode(conv, tok, "plain", tok.convert_tokens_to_ids(IMAGE_TOKEN), [2])
    caption = tok.convert_ids_to_tokens(enc.input_ids[3:])
    assert caption[0] == "A"  # ...but not inside the string, after <image>
    assert enc.input_ids == _expand_images(tok(render(conv, "plain"))["input_ids"], enc.input_ids[1], [2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_llama_tokenizer_piecewise_equals_whole(data):
    tok = llama_tokenizer()
    name = data.draw(st.sampled_from(sorted(TEMPLATES)))
    msgs, n_images = data.draw(conversations(plain=name == "plain"))
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    enc = encode(msgs, tok, name, img, [1] * n_images)
    assert enc.input_ids == tok(render(msgs, name))["input_ids"]
    assert enc.input_ids[0] == tok.bos_token_id


# ----------------------------------------------------------------------------- errors and helpers


@pytest.mark.parametrize("msgs, lens, gen, match", [
    (CONV, [], False, "1 <image> placeholder.*0 image"),
    (CONV, [1, 1], False, "1 <image> placeholder.*2 image"),
    (CONV, [0], False, "positive"),
    ([CONV[1], CONV[1]], [1, 1], False, "message 1: expected role 'assistant'"),
    ([CONV[2], CONV[1]], [1], False, "message 0: expected role 'user'"),
    ([CONV[1], CONV[0]], [1], False, "expected role 'assistant', got 'system'"),
    ([CONV[0]], [], False, "no user message"),
    ([], [], False, "non-empty"),
    ([{"role": "user", "content": 3}], [], False, "message 0"),
    (CONV, [1], True, "add_generation_prompt.*ends with 'assistant'"),
    ([CONV[1], {"role": "assistant", "content": "<image>"}], [1, 1], False, "assistant reply"),
])
def test_errors(tok, msgs, lens, gen, match):
    with pytest.raises(TemplateError, match=match):
        encode(msgs, tok, "vicuna_v1", 4, lens, add_generation_prompt=gen)


def test_plain_errors(tok):
    with pytest.raises(TemplateError, match="exactly one user"):
        encode(CONV, tok, "plain", 4, [1])
    with pytest.raises(TemplateError, match="must contain <image>"):
        render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "plain")


def test_unknown_template_and_auto_without_tokenizer():
    with pytest.raises(TemplateError, match="unknown conversation template 'nope'.*vicuna_v1"):
        get_template("nope")
    with pytest.raises(TemplateError, match="tokenizer"):
        render(CONV, "auto")
    assert isinstance(get_template("v1"), type(get_template("chatml")))
    assert issubclass(TemplateError, ValueError)


def test_move_image_to_front():
    msgs = [{"role": "user", "content": "What is this?\n<image>", "id": 7}, {"role": "assistant", "content": "A cat."}]
    out = move_image_to_front(msgs)
    assert out == [{"role": "user", "content": "<image>\nWhat is this?", "id": 7}, msgs[1]]
    assert msgs[0]["content"] == "What is this?\n<image>"  # input untouched
    assert move_image_to_front([{"role": "user", "content": " <image> "}])[0]["content"] == "<image>"
    # unlike LLaVA (which keeps one), every image survives
    two = move_image_to_front([{"role": "user", "content": "a <image> b <image>"}])[0]["content"]
    assert two == "<image>\n<image>\na  b"
