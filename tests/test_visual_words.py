"""VW-LMM (polyfocus/model/visual_words.py): the visual-word KL against hand-computed numbers and against an explicit
per-position loop through the model, zero-image batches, resizing the head with the vocabulary, pseudo image
features, save/load, what trains in VW-LMM's stages 3 and 4, the trainer's averaging of the KL over micro-batches,
`polyfocus visual-words`, and the synthworld patch-word agreement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from polyfocus import PolyfocusConfig, PolyfocusForConditionalGeneration
from polyfocus.data.images import ImageProcessor
from polyfocus.data.tokenizer import build_tokenizer, default_tokenizer
from polyfocus.model.presets import tiny_config
from polyfocus.model.visual_words import (
    CausalLMOutputWithVisualWords, patch_boxes, patch_visual_words, pseudo_image_features, visual_word_loss,
)
from polyfocus.synthworld.scenes import Scene, SceneObject, export, render
from polyfocus.synthworld.scorer import patch_word_agreement, word_agreement_counts

from train_helpers import trainer_with  # noqa: E402

IMG = 4  # image_token_id of the tiny configs
LN2 = math.log(2)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PolyfocusForConditionalGeneration(tiny_config(visual_words=True, **overrides)).eval()


def image_batch(n_image_tokens, seed=1):
    """Two right-padded samples with one image each at different offsets; labels on the text after the image."""
    g = torch.Generator().manual_seed(seed)
    a = [1, 9, *[IMG] * n_image_tokens, *torch.randint(10, 2000, (4,), generator=g).tolist()]
    b = [1, *[IMG] * n_image_tokens, *torch.randint(10, 2000, (3,), generator=g).tolist(), 0, 0]
    ids = torch.tensor([a, b])
    mask = torch.tensor([[1] * len(a), [1] * (len(b) - 2) + [0, 0]])
    labels = ids.masked_fill((mask == 0) | (ids == IMG), -100)
    return ids, mask, labels, torch.randn(2, 3, 56, 56, generator=g)


# ---- 1. the loss --------------------------------------------------------------------------------------------------


def test_kl_equals_hand_computation():
    """Sequence [text, img, img, text] and one starting with an image: only image positions with a position before
    them count, each predicted from that position, averaged over those M = 2 positions (not T-1 = 3, not summed).

    Row 1: q (visual word of the first image position) = (1/4, 1/4, 1/2), p (LM at position 0) = (1/2, 3/8, 1/8):
      KL(q||p) = 1/4 ln(1/2) + 1/4 ln(2/3) + 1/2 ln 4  = 0.4184936
      KL(p||q) = 1/2 ln 2 + 3/8 ln(3/2) + 1/8 ln(1/4)  = 0.3253359
    Row 2: q = p = (1/2, 1/4, 1/4): 0. The second sample's image at index 0 has no predictor and is skipped.
    """
    log = torch.log
    lm_logits = torch.zeros(2, 4, 3)
    lm_logits[0, 0] = log(torch.tensor([0.5, 0.375, 0.125]))
    lm_logits[0, 1] = log(torch.tensor([0.5, 0.25, 0.25]))
    lm_logits[1] = torch.randn(4, 3)  # never read: its image sits at index 0
    is_image = torch.tensor([[False, True, True, False], [True, False, False, False]])
    visual_words = log(torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]))
    forward = visual_word_loss(lm_logits, is_image, visual_words, "forward")
    reverse = visual_word_loss(lm_logits, is_image, visual_words, "reverse")
    kl_forward = 0.25 * math.log(0.5) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4)
    kl_reverse = 0.5 * LN2 + 0.375 * math.log(1.5) + 0.125 * math.log(0.25)
    assert kl_forward == pytest.approx(0.4184936, abs=1e-6) and kl_reverse == pytest.approx(0.3253359, abs=1e-6)
    assert forward.item() == pytest.approx(kl_forward / 2, abs=1e-6)
    assert reverse.item() == pytest.approx(kl_reverse / 2, abs=1e-6)
    # Logits are not probabilities: a shift of a row's logits changes nothing (softmax inside).
    shifted = visual_word_loss(lm_logits + 3.0, is_image, visual_words - 1.0)
    assert shifted.item() == pytest.approx(kl_forward / 2, abs=1e-6)


def explicit_vw_loss(model, ids, pixels, logits):
    """The loss written out position by position: image position t+1 of sample b against the LM at t."""
    words = model.vm_head(model.get_image_features(pixels)).flatten(0, 1)  # [n_positions, V], scatter order
    terms, k = [], 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == IMG:
                if t > 0:
                    q = words[k].float().softmax(-1)
                    p = logits[b, t - 1].float().softmax(-1)
                    terms.append((q * (q.log() - p.log())).sum())
                k += 1
    return torch.stack(terms).mean()


def test_model_loss_is_text_loss_plus_weighted_kl_at_image_positions():
    model = make_model(vw_loss_weight=0.5)
    ids, mask, labels, pixels = image_batch(model.config.num_image_tokens)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert isinstance(out, CausalLMOutputWithVisualWords)
    plain = model.language_model(inputs_embeds=model.embed_inputs(ids, pixels), attention_mask=mask, labels=labels)
    assert torch.allclose(out.lm_loss, plain.loss, atol=1e-6)
    assert torch.allclose(out.vw_loss, explicit_vw_loss(model, ids, pixels, out.logits), atol=1e-5)
    assert out.vw_loss > 0 and torch.allclose(out.loss, out.lm_loss + 0.5 * out.vw_loss)
    # Without labels (inference) the head is not evaluated and the output is the LM's own.
    assert type(model(input_ids=ids, attention_mask=mask, pixel_values=pixels)).__name__ == "CausalLMOutputWithPast"


def test_detach_target_stops_the_gradient_into_the_head():
    model = make_model(vw_detach_target=True).train()
    ids, mask, labels, pixels = image_batch(model.config.num_image_tokens)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).vw_loss.backward()
    assert model.vm_head.weight.grad is None or not model.vm_head.weight.grad.any()
    assert model.mm_projector[0].weight.grad.abs().sum() > 0  # the projector still learns through the LM side


def test_visual_words_do_not_change_inference():
    """Non-PIF: the head is off the inference path, so logits equal the plain model's with the same weights."""
    vw = make_model()
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(tiny_config()).eval()
    assert plain.vm_head is None
    ids, mask, _, pixels = image_batch(vw.config.num_image_tokens)
    assert torch.equal(vw(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                       plain(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)


# ---- 2. batches without image positions ---------------------------------------------------------------------------


def test_text_only_batch_gives_zero_visual_loss_and_finite_gradients():
    """The reference divides by M = 0 (NaN). Here the visual loss is 0, the loss is the text loss, every gradient is
    finite, and the head is still in the graph (DDP/ZeRO expect every trainable parameter to get a gradient)."""
    model = make_model().train()
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=ids.masked_fill(ids == 0, -100))
    assert torch.isfinite(out.loss) and out.vw_loss.item() == 0.0 and torch.equal(out.loss, out.lm_loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "vm_head.weight" in grads and not grads["vm_head.weight"].any()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_kl_without_predicted_positions_is_zero_and_differentiable():
    lm_logits = torch.randn(1, 3, 5, requires_grad=True)
    words = torch.randn(1, 5, requires_grad=True)
    loss = visual_word_loss(lm_logits, torch.tensor([[True, False, False]]), words)  # image only at index 0
    loss.backward()
    assert loss.item() == 0.0 and not words.grad.any() and not lm_logits.grad.any()


# ---- 3. the head follows the vocabulary ---------------------------------------------------------------------------


def test_resize_token_embeddings_resizes_the_head(tmp_path):
    model = make_model(pseudo_image_features=True)
    old = model.vm_head.weight.detach().clone()
    model.resize_token_embeddings(2100, pad_to_multiple_of=64)
    assert model.vm_head.weight.shape == (2112, 64) == model.get_input_embeddings().weight.shape
    assert model.config.text_config.vocab_size == 2112
    assert torch.equal(model.vm_head.weight[:2048], old)
    ids, mask, labels, pixels = image_batch(model.config.num_image_tokens)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)  # PIF needs equal vocabularies
    assert out.logits.shape[-1] == 2112 and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    loaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.vm_head.weight, model.vm_head.weight)
    model.resize_token_embeddings(2000)  # shrinking too
    assert model.vm_head.out_features == 2000


# ---- 4. pseudo image features ---------------------------------------------------------------------------------------


def test_pseudo_image_features_equal_the_weighted_sum_of_embeddings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)  # [n_images, N, V]
    embeddings = torch.randn(7, 5, generator=g)  # [V, D]
    pif = pseudo_image_features(logits, embeddings)
    assert pif.shape == (2, 3, 5)
    for i in range(2):
        for n in range(3):
            p = logits[i, n].softmax(-1)
            expected = sum(p[v] * embeddings[v] for v in range(7))
            assert torch.allclose(pif[i, n], expected, atol=1e-6)


def test_pif_model_splices_the_pseudo_features():
    model = make_model(pseudo_image_features=True)
    ids, mask, labels, pixels = image_batch(model.config.num_image_tokens)
    embeds = model.embed_inputs(ids, pixels)
    words = model.vm_head(model.get_image_features(pixels))  # [2, N, V]
    expected = words.softmax(-1) @ model.get_input_embeddings().weight  # [2, N, D]
    assert expected.shape == (2, model.config.num_image_tokens, 64)
    assert torch.allclose(embeds[ids == IMG], expected.flatten(0, 1), atol=1e-6)
    assert torch.equal(embeds[ids != IMG], model.get_input_embeddings()(ids[ids != IMG]))
    # At inference too (the head is on PIF's inference path): generate runs and differs from the non-PIF model.
    plain = make_model()
    pif_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert not torch.allclose(pif_logits, plain(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits)
    out = model.generate(input_ids=ids[:1], pixel_values=pixels[:1], max_new_tokens=3, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 3)


def test_pif_and_the_loss_fields_need_the_head():
    with pytest.raises(ValueError, match="pseudo_image_features needs visual_words"):
        tiny_config(pseudo_image_features=True)
    with pytest.raises(ValueError, match="vw_loss_weight, vw_detach_target need visual_words"):
        tiny_config(vw_loss_weight=0.5, vw_detach_target=True)


def test_save_and_load_round_trip_with_the_head(tmp_path):
    model = make_model(vw_kl_direction="reverse", vw_loss_weight=0.25)
    with torch.no_grad():
        model.vm_head.weight.add_(torch.randn_like(model.vm_head.weight))  # a trained head differs from the LM's
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["visual_words"] is True and config["vw_kl_direction"] == "reverse"
    loaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.vm_head.weight, model.vm_head.weight)
    assert not torch.equal(loaded.vm_head.weight, loaded.language_model.lm_head.weight)  # loaded, not re-initialised
    ids, mask, labels, pixels = image_batch(model.config.num_image_tokens)
    a = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    b = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.vw_loss, b.vw_loss)


def test_a_new_head_starts_from_the_lm_head():
    model = make_model()
    assert torch.equal(model.vm_head.weight, model.language_model.lm_head.weight)
    assert model.vm_head.weight.data_ptr() != model.language_model.lm_head.weight.data_ptr()  # a copy, not tied


@pytest.mark.parametrize("tied", [False, True])
def test_head_missing_from_a_checkpoint_starts_from_the_loaded_lm_head(tmp_path, tied):
    """A plain checkpoint loaded with visual_words on: the missing head is a copy of the *loaded* LM head, also when
    that head is tied to the embeddings (then not in the checkpoint, and only tied after the missing keys' init)."""
    fields = tiny_config().to_dict()
    fields["text_config"]["tie_word_embeddings"] = tied
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(PolyfocusConfig(**fields))
    plain.save_pretrained(tmp_path)
    config = PolyfocusConfig(**{**PolyfocusConfig.from_pretrained(tmp_path).to_dict(), "visual_words": True})
    loaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path, config=config)
    assert torch.equal(loaded.language_model.lm_head.weight, plain.language_model.lm_head.weight)
    assert torch.equal(loaded.vm_head.weight, plain.language_model.lm_head.weight)


# ---- 5. training -----------------------------------------------------------------------------------------------------

COMMON = {"tokenizer_name_or_path": "tok", "model_config": {"hidden_size": 32, "image_size": 28}, "report_to": "none",
          "dataloader_num_workers": 0, "disable_tqdm": True, "plot_loss": False, "seed": 7, "save_strategy": "no",
          "warmup_ratio": 0, "per_device_train_batch_size": 4, "max_steps": 1, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """tok/, data/images.json (8 synthworld samples with one image each), and llm/ + clip/: the backbones a first
    stage starts from, as the demo's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vw_train")
    tok = build_tokenizer(save_dir=root / "tok")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=14)).save_pretrained(root / "clip")
    export(str(root / "data"), 8, seed=3, image_size=56, families=["colour", "shape"])
    records = json.loads((root / "data" / "train.json").read_text())
    (root / "data" / "images.json").write_text(json.dumps(records[:8]))
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        yield root


def train(ws, monkeypatch, name, overrides, **values):
    from polyfocus.train import run

    def remember(trainer):
        trainer.initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    config = ws / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**COMMON, "data_path": "data/images.json", "output_dir": name, **values}))
    monkeypatch.setattr(run, "PolyfocusTrainer", trainer_with(run.PolyfocusTrainer, on_init=remember))
    return run.train(str(config), overrides)


STAGES = {
    # A first stage from an LLM and a tower directory (the demo's stage 1): the head is added to the new model.
    "backbones": (["--stage", "pretrain", "--model_name_or_path", "llm", "--vision_tower", "clip",
                   "--visual_words", "true"], ("vm_head.", "mm_projector.")),
    # VW-LMM stage 3 (spec §6): the head alone, fitted to the LM with the reverse KL.
    "stage3": (["--stage", "pretrain", "--visual_words", "true", "--freeze_mm_mlp_adapter", "true",
                "--vw_kl_direction", "reverse"], ("vm_head.",)),
    # Stage 4: projector + LLM + head, forward KL; the head switched on through model_config (tiny_config keywords).
    "stage4": (["--stage", "finetune", "--model_config", '{"hidden_size": 32, "image_size": 28, "visual_words": true}'],
               ("vm_head.", "mm_projector.", "language_model.")),
    "stage4_pif": (["--stage", "finetune", "--visual_words", "true", "--pseudo_image_features", "true"],
                   ("vm_head.", "mm_projector.", "language_model.")),
}


def test_from_backbones_builds_the_head_for_real(ws):
    """from_backbones builds on the meta device: the head must come out real, a copy of the loaded LM head."""
    from polyfocus.checkpoints.backbones import from_backbones

    model = from_backbones(ws / "llm", ws / "clip", IMG, dtype=torch.bfloat16, visual_words=True)
    head, lm_head = model.vm_head.weight, model.language_model.lm_head.weight
    assert head.device.type == "cpu" and head.dtype == torch.bfloat16 and torch.equal(head, lm_head)
    assert head.data_ptr() != lm_head.data_ptr()


@pytest.mark.parametrize("stage", STAGES)
def test_what_trains_in_vw_lmm_stages(ws, monkeypatch, stage):
    overrides, trains = STAGES[stage]
    trainer = train(ws, monkeypatch, stage, overrides)
    state = trainer.model.state_dict()
    changed = {k for k, v in state.items() if not torch.equal(v, trainer.initial[k])}
    expected = {k for k in state if k.startswith(trains)}
    assert changed == expected, (sorted(changed ^ expected)[:8])
    assert torch.equal(trainer.initial["vm_head.weight"], trainer.initial["language_model.lm_head.weight"])
    assert trainer.model.config.vw_kl_direction == ("reverse" if stage == "stage3" else "forward")
    assert trainer.model.config.pseudo_image_features is (stage == "stage4_pif")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and logged[0]["vw_loss"] > 0  # the visual loss is reported on its own
    saved = json.loads((ws / stage / "config.json").read_text())
    assert saved["visual_words"] is True


def test_gradient_accumulation_averages_the_visual_loss_over_micro_batches(ws, monkeypatch):
    """4 samples x 1 step == 2 x 2 accumulated (one image per sample, so the per-micro-batch means average to the
    whole batch's): same logged loss and, with plain SGD, the same update. The text CE is normalised by the token count
    of the whole accumulated batch (transformers); without the trainer's correction the visual term counts twice."""
    common = ["--stage", "finetune", "--group_by_modality_length", "false", "--visual_words", "true",
              "--optim", "sgd", "--learning_rate", "0.5"]
    one = train(ws, monkeypatch, "ga1", common)
    two = train(ws, monkeypatch, "ga2", common + ["--per_device_train_batch_size", "2",
                                                  "--gradient_accumulation_steps", "2"])
    loss = [[h for h in t.state.log_history if "loss" in h][0] for t in (one, two)]
    assert loss[0]["loss"] == pytest.approx(loss[1]["loss"], rel=1e-5)
    assert loss[0]["vw_loss"] == pytest.approx(loss[1]["vw_loss"], rel=1e-5)
    a, b = one.model.state_dict(), two.model.state_dict()
    assert not torch.equal(a["vm_head.weight"], one.initial["vm_head.weight"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("flag", [{"vw_loss_weight": 0.5}, {"vw_kl_direction": "reverse"},
                                  {"pseudo_image_features": True}])
def test_visual_word_flags_without_a_head_are_refused(flag):
    """A run's vw_* / PIF flags on a model without a head would change nothing: an error, not silence."""
    from polyfocus.train.args import ModelArguments
    from polyfocus.train.run import apply_settings

    plain = PolyfocusForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match=f"{next(iter(flag))} set, but the model has no visual-word head"):
        apply_settings(plain, ModelArguments(**flag))
    apply_settings(plain, ModelArguments(visual_words=True, **flag))  # with the head: taken
    assert getattr(plain.config, next(iter(flag))) == next(iter(flag.values())) and plain.vm_head is not None


def test_visual_words_lr_group(ws, monkeypatch):
    trainer = train(ws, monkeypatch, "vwlr", ["--stage", "finetune", "--visual_words", "true",
                                              "--mm_visual_words_lr", "1e-5"])
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups if g["initial_lr"] == 1e-5]
    assert set().union(*groups) == {"vm_head.weight"}


def test_lora_trains_the_head_in_full_and_keeps_it_in_the_adapter(ws, monkeypatch):
    """Under LoRA the head is a `modules_to_save` module, like the projector: trained, saved in the adapter and back
    in the merged model (else the adapter would silently lose it)."""
    from safetensors.torch import load_file

    from polyfocus.checkpoints import merge_lora

    trainer = train(ws, monkeypatch, "lora", ["--stage", "finetune", "--visual_words", "true", "--lora_enable", "true",
                                              "--lora_r", "4", "--lora_alpha", "8"])
    adapter = load_file(str(ws / "lora" / "adapter_model.safetensors"))
    head = [k for k in adapter if "vm_head" in k]
    assert head, sorted(adapter)[:5]
    merge_lora(ws / "lora", ws / "lora_merged")
    merged = PolyfocusForConditionalGeneration.from_pretrained(ws / "lora_merged")
    trained = adapter[head[0]]
    assert torch.equal(merged.vm_head.weight, trained)
    initial = [v for k, v in trainer.initial.items() if "vm_head" in k]
    assert initial and not any(torch.equal(trained, v) for v in initial)


# ---- 6. the picture: polyfocus visual-words ---------------------------------------------------------------------


def save_vw_checkpoint(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    image_id = default_tokenizer().convert_tokens_to_ids("<image>")
    config = tiny_config(image_token_id=image_id, visual_words=True, **overrides)
    PolyfocusForConditionalGeneration(config).save_pretrained(path)
    build_tokenizer(save_dir=path)
    ImageProcessor(image_size=56).save_pretrained(path)  # aspect "pad"
    return path


def test_cli_visual_words(tmp_path):
    from polyfocus.checkpoints import load_model
    from polyfocus.cli import main
    from polyfocus.infer.pipeline import load_tokenizer

    model_dir = save_vw_checkpoint(tmp_path / "model")
    image = Image.effect_noise((90, 60), 80).convert("RGB")  # not square: cells map through the padding
    image.save(tmp_path / "img.png")
    main(["visual-words", "--model", str(model_dir), "--image", str(tmp_path / "img.png"),
          "--out", str(tmp_path / "words.png"), "--topk", "3", "--json", str(tmp_path / "words.json")])
    assert Image.open(tmp_path / "words.png").size == (90, 60)
    words = json.loads((tmp_path / "words.json").read_text())
    assert words["grid"] == [4, 4] and words["image_size"] == [90, 60] and len(words["patches"]) == 16
    assert [(p["row"], p["col"]) for p in words["patches"]] == [(r, c) for r in range(4) for c in range(4)]

    model = load_model(model_dir).eval()
    pixels = ImageProcessor(image_size=56)([image])
    with torch.no_grad():
        probs = model.vm_head(model.get_image_features(pixels))[0].softmax(-1)  # [16, V]
    top = probs.topk(3, dim=-1)
    tokenizer = load_tokenizer(model_dir)
    for i, patch in enumerate(words["patches"]):
        assert [t["id"] for t in patch["top"]] == top.indices[i].tolist()
        assert [t["prob"] for t in patch["top"]] == pytest.approx(top.values[i].tolist(), abs=1e-5)
        assert patch["top"][0]["token"] == tokenizer.decode([top.indices[i, 0].item()])
    assert words["argmax_ids"] == top.indices[:, 0].reshape(4, 4).tolist()
    # The pad geometry: 90x60 becomes a 90x90 square with 15 px above the image; rows 0 and 3 are partly padding.
    assert words["patches"][0]["box"] == [0.0, 0.0, 22.5, 7.5] and words["patches"][5]["box"] == [22.5, 7.5, 45.0, 30.0]


def test_cli_visual_words_refuses_topk_zero(tmp_path):
    from polyfocus.cli import main

    model_dir = save_vw_checkpoint(tmp_path / "model")
    Image.new("RGB", (56, 56)).save(tmp_path / "img.png")
    with pytest.raises(SystemExit, match="--topk 0: at least 1"):
        main(["visual-words", "--model", str(model_dir), "--image", str(tmp_path / "img.png"),
              "--out", str(tmp_path / "x.png"), "--topk", "0"])


def test_cli_visual_words_refuses_a_model_without_a_head(tmp_path):
    from polyfocus.cli import main

    from eval_helpers import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "plain")
    Image.new("RGB", (56, 56)).save(tmp_path / "img.png")
    with pytest.raises(SystemExit, match="no visual-word head"):
        main(["visual-words", "--model", str(tmp_path / "plain"), "--image", str(tmp_path / "img.png"),
              "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("aspect,size,first,last", [
    ("resize", (80, 40), (0, 0, 20, 10), (60, 30, 80, 40)),
    ("square", (80, 40), (20, 0, 30, 10), (50, 30, 60, 40)),  # the centre 40x40 crop
    ("pad", (40, 80), (0, 0, 0, 20), (40, 60, 40, 80)),  # 80x80 square, image at x 20..60: columns 0, 3 are padding
])
def test_patch_boxes_follow_the_processor_geometry(aspect, size, first, last):
    boxes = patch_boxes(size, 4, ImageProcessor(image_size=56, aspect_ratio=aspect))
    assert boxes[0][0] == pytest.approx(first) and boxes[3][3] == pytest.approx(last)
    if aspect == "pad":
        assert boxes[1][1] == pytest.approx((0, 20, 20, 40))


# ---- 7. does a patch's visual word name what lies under it (synthworld) ----------------------------------------------


def scene_of(*objects) -> Scene:
    return Scene("hand", 0, 56, "grey", "plain", 0, [SceneObject(s, c, "large", box) for s, c, box in objects])


def test_word_agreement_on_a_hand_built_grid():
    """56 px scene, 4x4 grid of 14 px cells. A red circle covers the top-left 2x2 cells (centres at 7 and 21); a blue
    square spans y 28..42, so only the cells of row 2 (centre y 35) lie on it, in columns 2 and 3."""
    scene = scene_of(("circle", "red", (0, 0, 28, 28)), ("square", "blue", (28, 28, 56, 42)))
    words = [["red", "circle", "x", "x"],
             ["blue", ",", "x", "x"],
             ["x", "x", "square", "blue"],
             ["x", "x", "blue", "red"]]  # row 3 lies on nothing: not counted, whatever it says
    boxes = patch_boxes((56, 56), 4, ImageProcessor(image_size=56))
    assert word_agreement_counts(scene, words, boxes, "either") == (4, 6)
    assert word_agreement_counts(scene, words, boxes, "shape") == (2, 6)
    assert word_agreement_counts(scene, words, boxes, "colour") == (2, 6)


def test_patch_word_agreement_through_the_model(monkeypatch):
    """A head that names every patch "red": all patches on red objects agree by colour, none by shape; a real head's
    fraction equals the count from its own argmax words."""
    model = make_model()
    tokenizer = default_tokenizer()
    processor = ImageProcessor(image_size=56)
    scenes = [scene_of(("circle", "red", (0, 0, 28, 28))), scene_of(("star", "red", (14, 14, 56, 56)))]
    red = tokenizer.encode(" red", add_special_tokens=False)
    assert len(red) == 1 and tokenizer.decode(red).strip() == "red"

    class SaysRed(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(*x.shape[:-1], 2048)
            out[..., red[0]] = 1.0
            return out

    real = patch_word_agreement(model, tokenizer, processor, scenes)
    _, ids = patch_visual_words(model, processor([render(s) for s in scenes]))
    hits = total = 0
    for scene, grid in zip(scenes, ids[..., 0].tolist()):
        words = [[tokenizer.decode([i]).strip().lower() for i in row] for row in grid]
        h, t = word_agreement_counts(scene, words, patch_boxes((56, 56), 4, processor))
        hits, total = hits + h, total + t
    assert total == 4 + 9 and real == pytest.approx(hits / total)

    monkeypatch.setattr(model, "vm_head", SaysRed())
    assert patch_word_agreement(model, tokenizer, processor, scenes, "colour") == 1.0
    assert patch_word_agreement(model, tokenizer, processor, scenes, "shape") == 0.0


def test_qlora_keeps_the_head_unquantized():
    """QLoRA quantizes the LLM's body only: the head (a Linear(d, V) that trains in full as a `modules_to_save` module
    and that PIF reads) is, like the projector and the fuser, in the list bitsandbytes skips."""
    from polyfocus.checkpoints import SKIP_QUANTIZATION
    from polyfocus.train.freeze import PARTS

    for part in ("visual_words", "projector", "fusion", "vision_tower"):
        assert PARTS[part][0].rstrip(".") in SKIP_QUANTIZATION, part
