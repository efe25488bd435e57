"""LoRA: what trains, and that the adapter, the merged checkpoint and load_model(adapter) all compute the same."""

import json

import pytest
import torch

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import checkpoint_format, load_adapter, load_model, merge_lora
from polyfocus.cli import main
from polyfocus.data.images import ImageProcessor
from polyfocus.model.presets import tiny_config
from polyfocus.train.lora import apply_lora, lora_config

IMG = 4
# peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def logits(model):
    torch.manual_seed(5)
    ids = torch.tensor([[1, 9, *[IMG] * 16, 7, 8], [0, 1, *[IMG] * 16, 11, 12]])
    mask = torch.tensor([[1] * 20, [0] + [1] * 19])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 56, 56))
    return out.logits[mask.bool()]


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    PolyfocusForConditionalGeneration(tiny_config()).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def trained_adapter(base_dir):
    """A LoRA model as after training: B and the projector nonzero (fresh LoRA is a no-op, B = 0)."""
    model = apply_lora(load_model(base_dir).eval(), lora_config(r=4, alpha=8))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            p.data.normal_(std=0.05)
    return model.eval()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_llm_linears_and_the_projector_only(base_dir):
    model = trained_adapter(base_dir)
    names = trainable(model)
    lora = {n for n in names if ".lora_" in n}
    saved = names - lora
    assert lora and all(".language_model.model.layers." in n for n in lora)  # no tower, projector or lm_head
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    projector = {n for n, _ in model.base_model.model.mm_projector.modules_to_save.named_parameters(prefix="x")}
    assert len(saved) == len(projector) == 4 and all(".mm_projector.modules_to_save." in n for n in saved)
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in names)
    base = load_model(base_dir).eval()
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)  # the adapter does change the outputs


def test_merge_equals_adapter_and_load_model_merges_on_the_fly(base_dir, tmp_path):
    model = trained_adapter(base_dir)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert all(t.startswith("language_model.") for t in config["target_modules"])
    ImageProcessor(image_size=56).save_pretrained(tmp_path / "adapter")

    assert checkpoint_format(tmp_path / "adapter") == "lora"
    (tmp_path / "adapter" / "config.json").write_text((base_dir / "config.json").read_text())  # as LLaVA's trainer does
    assert checkpoint_format(tmp_path / "adapter") == "lora"  # a config, but no model weights
    merge_lora(tmp_path / "adapter", tmp_path / "merged")
    assert checkpoint_format(tmp_path / "merged") == "polyfocus"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()  # processor files come along
    merged = load_model(tmp_path / "merged").eval()
    assert type(merged) is PolyfocusForConditionalGeneration
    assert not any("lora" in k or "modules_to_save" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_model(tmp_path / "adapter").eval()), expected, atol=1e-5, rtol=0)


def test_adapter_reloads_for_resuming_with_the_same_trainable_parameters(base_dir, tmp_path):
    model = trained_adapter(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    resumed = load_adapter(tmp_path / "adapter", is_trainable=True)
    assert trainable(resumed) == trainable(model)
    torch.testing.assert_close(logits(resumed.eval()), logits(model), atol=1e-6, rtol=0)


def test_merge_cli_with_model_base_and_base_processor_files(base_dir, tmp_path, capsys):
    ImageProcessor(image_size=56).save_pretrained(base_dir)  # the adapter has none: the base's are copied
    model = trained_adapter(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    moved = base_dir.rename(tmp_path / "moved-base")
    main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model-base", str(moved)])
    assert "-> " + str(tmp_path / "merged") in capsys.readouterr().out
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
    torch.testing.assert_close(logits(load_model(tmp_path / "merged").eval()), logits(model), atol=1e-5, rtol=0)


def test_missing_base_is_a_clear_error(base_dir, tmp_path):
    trained_adapter(base_dir).save_pretrained(tmp_path / "adapter")
    base_dir.rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json.*base_model_name_or_path.*--model-base"):
        merge_lora(tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(tmp_path / "adapter")
    with pytest.raises(SystemExit, match="--model-base"):
        main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_bits_without_quantization_is_refused(base_dir):
    with pytest.raises(ValueError, match="load_quantized"):
        apply_lora(load_model(base_dir), lora_config(r=4), bits=4)


def test_a_base_that_was_never_saved_is_said_at_wrap_time(caplog):
    apply_lora(PolyfocusForConditionalGeneration(tiny_config()), lora_config(r=4))
    assert "--model-base" in caplog.text


@pytest.mark.gpu
def test_qlora_4bit_keeps_tower_and_projector_unquantized(base_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from polyfocus.checkpoints import load_quantized

    model = load_quantized(base_dir, bits=4)
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in [*model.vision_tower.modules(), *model.mm_projector.modules()])
    peft_model = apply_lora(model, lora_config(r=4, alpha=8), bits=4)
    names = trainable(peft_model)
    assert any(".lora_A." in n for n in names) and all("vision_tower" not in n for n in names)
    ids = torch.tensor([[1, 9, *[IMG] * 16, 7, 8]], device=model.device)
    out = peft_model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56, device=model.device), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_text_only_step_with_checkpointing_reaches_the_lora_weights(base_dir):
    """Frozen embeddings + activation checkpointing: LoRA still gets gradients on a batch without images."""
    base = load_model(base_dir)
    base.activation_checkpointing_enable()
    model = apply_lora(base, lora_config(r=4, alpha=8)).train()
    ids = torch.tensor([[1, 9, 7, 8, 11, 12]])
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
