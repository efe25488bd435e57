"""The model: parity with transformers' LlavaForConditionalGeneration, splicing, batching, generate."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import to_llava_hf
from polyfocus.config import IGNORE_INDEX
from polyfocus.model.presets import tiny_config

IMG = 4  # image_token_id of the tiny configs


def make_model(text="llama", vision="clip", seed=0, **overrides):
    torch.manual_seed(seed)
    return PolyfocusForConditionalGeneration(tiny_config(text, vision, **overrides)).eval()


def padded_batch(n_image_tokens, side="left", seed=1):
    """Two samples with one image each, different lengths, padded on `side` with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    a = [1, *torch.randint(10, 2000, (3,), generator=g).tolist(), *[IMG] * n_image_tokens, 7, 8, 9]
    b = [1, 5, *[IMG] * n_image_tokens, *torch.randint(10, 2000, (6,), generator=g).tolist()]
    width = max(len(a), len(b))
    ids, mask = [], []
    for seq in (a, b):
        pad = [0] * (width - len(seq))
        ids.append(pad + seq if side == "left" else seq + pad)
        mask.append([0] * len(pad) + [1] * len(seq) if side == "left" else [1] * len(seq) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask), torch.randn(2, 3, 56, 56, generator=g)


@pytest.mark.parametrize("text,vision", [("llama", "clip"), ("mistral", "clip"), ("qwen2", "siglip"), ("qwen3", "clip"),
                                       ("llama", "dinov2")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_loss_equal_transformers_llava(text, vision, side):
    model = make_model(text, vision)
    hf = to_llava_hf(model)
    assert isinstance(hf, LlavaForConditionalGeneration)
    ids, mask, pixels = padded_batch(model.config.num_image_tokens, side)
    labels = ids.masked_fill((mask == 0) | (ids == IMG), IGNORE_INDEX)
    ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    valid = mask.bool()
    assert (ours.logits[valid] - ref.logits[valid]).abs().max() <= 1e-5
    assert torch.allclose(ours.loss, ref.loss, atol=1e-6)


def test_greedy_tokens_equal_transformers_llava():
    model = make_model()
    hf = to_llava_hf(model)
    ids, mask, pixels = padded_batch(model.config.num_image_tokens, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs), hf.generate(**kwargs))


def test_multi_layer_selection_and_cls_patch_match_transformers():
    model = make_model(mm_vision_select_layer=[-3, -2], mm_vision_select_feature="cls_patch")
    assert model.config.num_image_tokens == 17 and model.config.mm_hidden_size == 64
    hf = to_llava_hf(model)
    ids, mask, pixels = padded_batch(17)
    assert (model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            - hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)[mask.bool()].abs().max() <= 1e-5


def test_features_land_at_image_positions_in_order():
    """Two images in one sample and one in the next: each image's features fill its own span."""
    model = make_model()
    n = model.config.num_image_tokens
    first = [1, *[IMG] * n, 9, *[IMG] * n, 8]
    second = [1, 7, 7, *[IMG] * n] + [8] * (len(first) - 3 - n)
    ids = torch.tensor([first, second])
    pixels = torch.randn(3, 3, 56, 56)
    embeds = model.embed_inputs(ids, pixels)
    features = model.get_image_features(pixels)
    assert torch.equal(embeds[0, 1:1 + n], features[0])
    assert torch.equal(embeds[0, 2 + n:2 + 2 * n], features[1])
    assert torch.equal(embeds[1, 3:3 + n], features[2])
    assert torch.equal(embeds[1, 0], model.get_input_embeddings().weight[1])


def test_feature_count_mismatch_is_a_clear_error():
    model = make_model()
    ids = torch.tensor([[1, *[IMG] * 10, 5]])  # 10 positions, the image gives 16 features
    with pytest.raises(ValueError, match="10 image-token positions but 1 image"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56))


def test_text_only_sample_and_out_of_vocab_image_id():
    """LLaVA's -200 sentinel is never looked up; text-only batches need no pixel_values."""
    model = make_model(image_token_id=-200)
    n = model.config.num_image_tokens
    ids = torch.tensor([[1, *[-200] * n, 5, 6]])
    pixels = torch.randn(1, 3, 56, 56)
    out = model(input_ids=ids, pixel_values=pixels)
    ref = make_model(image_token_id=IMG)(input_ids=ids.masked_fill(ids == -200, IMG), pixel_values=pixels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    text = torch.tensor([[1, 5, 6, 7]])
    assert model(input_ids=text).logits.shape == (1, 4, 2048)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


def test_labels_at_image_positions_are_masked():
    model = make_model()
    n = model.config.num_image_tokens
    ids = torch.tensor([[1, *[IMG] * n, 5, 6]])
    pixels = torch.randn(1, 3, 56, 56)
    # Supervising every position (image ones included) must equal supervising the text ones only.
    loss_all = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss_text = model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == IMG, IGNORE_INDEX)).loss
    assert torch.equal(loss_all, loss_text)


@pytest.mark.parametrize("num_items", [None, 9])
def test_training_scores_only_supervised_positions_with_the_same_loss_and_gradients(num_items):
    """supervised_logits_only (PolyfocusTrainer's in training): the LM head runs only where a row's next token is
    supervised; loss and gradients equal the full computation's, with and without the Trainer's token count."""
    model = make_model("qwen3")
    ids, mask, pixels = padded_batch(model.config.num_image_tokens, "right")
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -3:], labels[1, -6:-4] = ids[0, -3:], ids[1, -6:-4]  # answers: 3 tokens in row 0, 2 in row 1
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels,
                  **({"num_items_in_batch": torch.tensor(num_items)} if num_items else {}))
    results = []
    for supervised_only in (False, True):
        model.zero_grad()
        out = model(**kwargs, supervised_logits_only=supervised_only)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (scored, scored_grads) = results
    width = ids.shape[1]
    assert full.logits.shape[1] == width and scored.logits.shape[0] == 5  # the 5 positions predicting an answer token
    predicts_answer = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX
    assert torch.allclose(scored.logits, full.logits[predicts_answer], atol=1e-5)  # those positions' logits
    assert torch.allclose(scored.loss, full.loss, atol=1e-6)
    assert full_grads.keys() == scored_grads.keys()
    assert all(torch.allclose(scored_grads[n], g, atol=1e-6) for n, g in full_grads.items())


@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_generate_equals_one_by_one(do_sample):
    model = make_model()
    ids, mask, pixels = padded_batch(model.config.num_image_tokens, "left")
    kwargs = dict(max_new_tokens=10, do_sample=do_sample, top_k=0, pad_token_id=0, eos_token_id=None)
    if not do_sample:
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    for i in range(2):
        keep = mask[i].bool()
        if do_sample:
            # Same seed, same single sample: sampling is reproducible and cached == uncached decoding.
            torch.manual_seed(3)
            a = model.generate(input_ids=ids[i:i + 1, keep], pixel_values=pixels[i:i + 1], **kwargs)
            torch.manual_seed(3)
            b = model.generate(input_ids=ids[i:i + 1, keep], pixel_values=pixels[i:i + 1], use_cache=False, **kwargs)
            assert torch.equal(a, b)
        else:
            single = model.generate(input_ids=ids[i:i + 1, keep], pixel_values=pixels[i:i + 1], **kwargs)
            assert torch.equal(batched[i, -10:], single[0, -10:])


def test_kv_cache_decoding_equals_full_recompute():
    model = make_model()
    ids, mask, pixels = padded_batch(model.config.num_image_tokens, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs), model.generate(use_cache=False, **kwargs))


def test_save_and_load_round_trip_in_safetensors(tmp_path):
    model = make_model("qwen2", "clip")  # tied embeddings must stay tied
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, pixels = padded_batch(model.config.num_image_tokens)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                       loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("projector,n_linear", [("linear", 1), ("mlp3x_gelu", 3), ("identity", 0)])
def test_projector_types(projector, n_linear):
    overrides = {"hidden_size": 32} if projector == "identity" else {}
    model = make_model(mm_projector_type=projector, **overrides)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.mm_projector.modules()) == n_linear
    pixels = torch.randn(1, 3, 56, 56)
    if projector == "identity":  # features reach the LLM unchanged: layer -2, CLS dropped
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        assert torch.equal(model.get_image_features(pixels), hidden[-2][:, 1:])
    ids = torch.tensor([[1, *[IMG] * 16, 5]])
    assert model(input_ids=ids, pixel_values=pixels).logits.shape == (1, 18, 2048)


def test_unknown_projector_is_rejected():
    with pytest.raises(ValueError, match="unknown mm_projector_type"):
        make_model(mm_projector_type="mlp2x_relu")


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_cuda_matches_transformers_llava(attn):
    """Same weights in bf16 on a GPU: ours and transformers' Llava give the same greedy tokens."""
    model = make_model()
    hf = to_llava_hf(model)
    model.config._attn_implementation = hf.config._attn_implementation = attn
    model, hf = model.to("cuda", torch.bfloat16), hf.to("cuda", torch.bfloat16)
    ids, mask, pixels = (t.cuda() for t in padded_batch(model.config.num_image_tokens, "left"))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs), hf.generate(**kwargs))


@pytest.mark.parametrize("bad", [dict(image_aspect_ratio="anyres"), dict(tokenizer_padding_side="middle"),
                                 dict(mm_vision_select_layer=7), dict(mm_vision_select_layer=[])])
def test_bad_config_values_are_rejected_at_build_time(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_config(**bad)


def test_fp32_tower_with_bf16_projector_and_llm():
    model = make_model()
    model.mm_projector.to(torch.bfloat16), model.language_model.to(torch.bfloat16)
    ids = torch.tensor([[1, *[IMG] * 16, 5]])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56)).logits.dtype == torch.bfloat16


def test_generate_with_out_of_vocab_image_id_and_a_repetition_penalty():
    """LLaVA's -200 sentinel gives the same tokens as an in-vocab id, also with processors that index input_ids."""
    ids, mask, pixels = padded_batch(16, "left")
    kwargs = dict(attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  eos_token_id=None, repetition_penalty=1.3)
    sentinel = make_model(image_token_id=-200).generate(input_ids=ids.masked_fill(ids == IMG, -200), **kwargs)
    in_vocab = make_model().generate(input_ids=ids, **kwargs)
    assert torch.equal(sentinel[:, -8:], in_vocab[:, -8:])


def test_beam_search_with_two_images_in_a_prompt_keeps_their_order():
    """generate repeats tensor arguments row by row for beams: a prompt's images [a, b] must not become the
    [a, a, b, b] of two copies. Same beams as from the prompt's embeddings, made once."""
    model = make_model()
    n = model.config.num_image_tokens
    ids = torch.tensor([[1, 9, *[IMG] * n, 7, *[IMG] * n, 8]])
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0,
                  eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    out = model.generate(input_ids=ids, pixel_values=pixels, **kwargs)
    want = model.generate(input_ids=ids, inputs_embeds=model.embed_inputs(ids, pixels), **kwargs)
    torch.testing.assert_close(out.sequences_scores, want.sequences_scores)
    assert torch.equal(out.sequences, want.sequences)
