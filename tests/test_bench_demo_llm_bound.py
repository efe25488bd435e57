"""bench/demo_llm_bound.py: the oracle's patch tokens and the conversation the LLM is trained on, checked by hand."""

from types import SimpleNamespace

import torch
from bench_helpers import load_bench_script

from polyfocus.data.tokenizer import build_tokenizer
from polyfocus.synthworld.tasks import Task

bench = load_bench_script("demo_llm_bound")
STAR = SimpleNamespace(shape="star", colour="red", size="large", box=[10, 10, 20, 30])  # patches 0, 1, 8, 9, 16, 17


def test_the_oracle_marks_shape_colour_and_size_on_exactly_the_patches_the_object_touches():
    x = bench.oracle_tokens(SimpleNamespace(objects=[STAR]))
    assert x.shape == (64, len(bench.ONE_HOT))
    touched = [0, 1, 8, 9, 16, 17]
    assert x.sum(1).nonzero().flatten().tolist() == touched  # background patches stay zero
    hot = [bench.ONE_HOT.index(w) for w in ("star", "red", "large")]
    assert all(x[p].nonzero().flatten().tolist() == sorted(hot) for p in touched)


def test_the_scene_fills_the_image_positions_and_only_the_answers_are_supervised(tmp_path):
    tokenizer = build_tokenizer(save_dir=tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = bench.SceneLLM(tokenizer, "text")
    scene = SimpleNamespace(objects=[STAR])
    tasks = [Task("colour", "What colour is the star?", "What colour is the star?\nAnswer briefly.", "red", []),
             Task("shape", "What shape is the red object?", "What shape is the red object?", "star", [])]
    embeddings, labels = model.example(scene, tasks)
    scene_ids = tokenizer(bench.scene_text(scene), add_special_tokens=False)["input_ids"]
    table = model.llm.get_input_embeddings().weight
    start = next(i for i in range(len(embeddings)) if torch.equal(embeddings[i], table[scene_ids[0]])
                 and torch.equal(embeddings[i + len(scene_ids) - 1], table[scene_ids[-1]]))
    assert torch.equal(embeddings[start:start + len(scene_ids)], table[scene_ids])
    supervised = tokenizer.decode([t for t in labels if t != -100])
    assert supervised.replace(" ", "") == "red</s>star</s>"  # the two replies and their end tokens, nothing else


def test_llm_fields_change_the_architecture_not_the_size(tmp_path):
    """--llm '{"text": "llama"}': the demo's width, depth, heads and vocabulary without QK-norm's per-head scales; a
    config field rides along."""
    tokenizer = build_tokenizer(save_dir=tmp_path / "tokenizer")
    llama = bench.SceneLLM(tokenizer, "oracle", llm={"text": "llama", "initializer_range": 0.088}).llm
    qwen3 = bench.SceneLLM(tokenizer, "oracle").llm  # the demo's
    assert (type(llama).__name__, type(qwen3).__name__) == ("LlamaForCausalLM", "Qwen3ForCausalLM")
    a, b = llama.config, qwen3.config
    assert [getattr(b, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")] == \
        [getattr(a, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")]
    assert b.head_dim == a.hidden_size // a.num_attention_heads == 32
    assert (a.initializer_range, b.initializer_range) == (0.088, 0.02)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(qwen3) - count(llama) == a.num_hidden_layers * 2 * 32  # q_norm and k_norm: 32 scales each, per layer
