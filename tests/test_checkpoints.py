"""Loading and converting checkpoints, each written here in its real on-disk layout."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

from polyfocus import PolyfocusForConditionalGeneration
from polyfocus.checkpoints import checkpoint_format, load_model, save_llava_hf
from polyfocus.model.presets import tiny_config

IMG = 4


def make_model(vision_config_seed=None, **overrides):
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(tiny_config(**overrides)).eval()
    if vision_config_seed is not None:  # same LLM and projector, another tower
        torch.manual_seed(vision_config_seed)
        for p in model.vision_tower.parameters():
            p.data.normal_(std=0.02)
    return model


def logits(model, image_token_id=IMG):
    torch.manual_seed(5)
    ids = torch.tensor([[1, 9, *[image_token_id] * 16, 7, 8], [0, 1, *[image_token_id] * 16, 11, 12]])
    mask = torch.tensor([[1] * 20, [0] + [1] * 19])
    return model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 56, 56)).logits[mask.bool()]


def test_llava_hf_export_loads_in_plain_transformers_and_back(tmp_path):
    model = make_model()
    save_llava_hf(model, tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (logits(hf) - logits(model)).abs().max() <= 1e-5
    assert checkpoint_format(tmp_path) == "llava-hf"
    back = load_model(tmp_path).eval()
    assert isinstance(back, PolyfocusForConditionalGeneration)
    assert torch.equal(logits(back), logits(model))


def test_llava_hf_old_key_layout(tmp_path):
    """Before transformers 4.52: language_model.model.*, language_model.lm_head, multi_modal_projector.*."""
    model = make_model()
    save_llava_hf(model, tmp_path / "new")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "new")
    old = {}
    for key, value in hf.state_dict().items():
        key = key.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
        old[key.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.multi_modal_projector.", "multi_modal_projector.")] = value
    assert any(k.startswith("language_model.model.layers.") for k in old)
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    assert torch.equal(logits(load_model(tmp_path / "old").eval()), logits(model))


def write_clip_tower(model, path, full_clip=False):
    """The vision tower as its own checkpoint directory, as LLaVA's `mm_vision_tower` points at."""
    vision_config = model.config.vision_config
    if full_clip:  # a whole CLIPModel (openai/clip-vit-large-patch14-336's layout)
        clip = CLIPModel(CLIPConfig(vision_config=vision_config.to_dict(),
                                    text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                 "num_attention_heads": 4}))
        clip.vision_model.load_state_dict(model.vision_tower.state_dict())
        clip.save_pretrained(path)
    else:
        tower = CLIPVisionModel(vision_config)
        tower.load_state_dict(model.vision_tower.state_dict())
        tower.save_pretrained(path)


def write_base_llm(model, path):
    """The LLM alone, as the base (Vicuna) directory a stage-1 projector-only checkpoint is applied to."""
    base = LlamaForCausalLM(model.config.text_config)
    base.load_state_dict(model.language_model.state_dict())
    base.save_pretrained(path)


def llava_config(model, tower_path, **extra):
    """config.json of an original LLaVA-1.5 checkpoint: the Llama config plus LLaVA's mm_* fields."""
    text = model.config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    return {**text, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": str(tower_path), "mm_hidden_size": 32, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
            "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, **extra}


def llava_state_dict(model, with_tower):
    """Our weights under LLaVA's LlavaLlamaForCausalLM key names."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower."):
            if with_tower:
                state["model.vision_tower.vision_tower.vision_model." + key[len("vision_tower."):]] = value
        elif key.startswith("mm_projector."):
            state["model." + key] = value
        elif key.startswith("language_model.model."):
            state[key[len("language_model."):]] = value
        else:
            state[key[len("language_model."):]] = value  # lm_head.weight
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these; dropped
    return state


def write_shards(state, path, fmt):
    """Two shards plus the index, as `save_pretrained` of transformers 4.37 wrote them (.bin or .safetensors)."""
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves, 1):
        if fmt == "bin":
            name = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save({k: state[k].clone() for k in half}, path / name)
        else:
            name = f"model-0000{i}-of-00002.safetensors"
            save_file({k: state[k].contiguous() for k in half}, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in half})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("fmt,with_tower,full_clip", [("bin", False, True), ("safetensors", True, False)])
def test_original_llava_checkpoint(tmp_path, fmt, with_tower, full_clip):
    model = make_model()
    # A checkpoint that carries its tower is read from it (it may have been tuned); else from mm_vision_tower.
    tower_source = make_model(vision_config_seed=1) if with_tower else model
    write_clip_tower(tower_source, tmp_path / "clip", full_clip)
    ckpt = tmp_path / "llava-v1.5-tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llava_config(model, tmp_path / "clip")))
    write_shards(llava_state_dict(model, with_tower), ckpt, fmt)
    assert checkpoint_format(ckpt) == "llava"
    loaded = load_model(ckpt).eval()
    assert loaded.config.image_token_id == -200 and loaded.config.image_aspect_ratio == "pad"
    assert torch.equal(logits(loaded, image_token_id=-200), logits(model))
    loaded.save_pretrained(tmp_path / "ours")  # and it saves in polyfocus's own layout
    assert checkpoint_format(tmp_path / "ours") == "polyfocus"
    assert torch.equal(logits(load_model(tmp_path / "ours").eval(), image_token_id=-200), logits(model))


def test_original_llava_missing_tower_names_the_path(tmp_path):
    model = make_model()
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llava_config(model, "openai/clip-vit-large-patch14-336")))
    write_shards(llava_state_dict(model, True), ckpt, "safetensors")
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14-336"):
        load_model(ckpt)
    write_clip_tower(model, tmp_path / "elsewhere")
    assert torch.equal(logits(load_model(ckpt, vision_tower=tmp_path / "elsewhere").eval(), -200), logits(model))


def test_stage1_projector_on_top_of_base_llm(tmp_path):
    model = make_model()
    write_clip_tower(model, tmp_path / "clip")
    write_base_llm(model, tmp_path / "vicuna")
    stage1 = tmp_path / "llava-v1.5-tiny-pretrain"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps(llava_config(model, tmp_path / "clip", tune_mm_mlp_adapter=True)))
    torch.save({"model." + k: v for k, v in model.state_dict().items() if k.startswith("mm_projector.")},
               stage1 / "mm_projector.bin")
    assert checkpoint_format(stage1) == "projector"
    with pytest.raises(ValueError, match="model_base"):
        load_model(stage1)
    loaded = load_model(stage1, model_base=tmp_path / "vicuna").eval()
    assert torch.equal(logits(loaded, -200), logits(model))


def test_sentinel_image_token_exports_with_a_real_token(tmp_path):
    """An original-LLaVA model (image id -200, a tokenizer without <image> or <pad>, as Vicuna's) gets both
    tokens on export, new rows padded to a multiple of 64, and the same outputs over the old vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 2048)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = make_model(image_token_id=-200)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    save_llava_hf(model, tmp_path / "hf", src_dir=tmp_path / "src")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.image_token_id == 2048 and hf.config.text_config.vocab_size == 2112
    assert (logits(hf, 2048)[:, :2048] - logits(make_model(image_token_id=-200), -200)).abs().max() <= 1e-5
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 2048


def test_cli_convert_to_hf_and_back(tmp_path):
    from polyfocus.cli import main

    model = make_model()
    model.save_pretrained(tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert torch.equal(logits(PolyfocusForConditionalGeneration.from_pretrained(tmp_path / "back").eval()), logits(model))
    with pytest.raises(SystemExit, match="--from hf but the directory holds a polyfocus checkpoint"):
        main(["convert", "--from", "hf", str(tmp_path / "ours"), str(tmp_path / "x")])


def test_llava_hf_with_missing_weights_is_refused(tmp_path):
    model = make_model()
    save_llava_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file
    state = load_file(tmp_path / "hf" / "model.safetensors")
    dropped = next(k for k in state if "down_proj" in k)
    del state[dropped]
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights"):
        load_model(tmp_path / "hf")


def test_partial_vision_tower_in_checkpoint_is_refused(tmp_path):
    model = make_model()
    write_clip_tower(model, tmp_path / "clip")
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llava_config(model, tmp_path / "clip")))
    state = llava_state_dict(model, with_tower=True)
    del state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"]
    write_shards(state, ckpt, "safetensors")
    with pytest.raises(ValueError, match="part of the vision tower"):
        load_model(ckpt)


def test_saved_keys_are_polyfocus_keys_after_loading_a_foreign_layout(tmp_path):
    from safetensors import safe_open

    model = make_model()
    save_llava_hf(model, tmp_path / "hf")
    load_model(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"vision_tower", "mm_projector", "language_model"}


@pytest.mark.parametrize("aspect", ["pad", "square", "resize"])
def test_hf_export_keeps_image_settings(tmp_path, aspect):
    """The exported processor uses the source's own mean/std (SigLIP's 0.5) and the model's aspect ratio,
    and converting back recovers the aspect ratio."""
    from transformers import AutoProcessor

    from polyfocus.data.images import ImageProcessor
    from polyfocus.data.tokenizer import default_tokenizer

    model = make_model(vision="siglip", image_aspect_ratio=aspect)
    model.save_pretrained(tmp_path / "src")
    default_tokenizer().save_pretrained(tmp_path / "src")
    ImageProcessor(image_size=56, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                   aspect_ratio=aspect).save_pretrained(tmp_path / "src")
    save_llava_hf(model, tmp_path / "hf", src_dir=tmp_path / "src")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert load_model(tmp_path / "hf").config.image_aspect_ratio == aspect


def test_hf_export_round_trip_keeps_the_image_processor_and_takes_list_content(tmp_path):
    """polyfocus -> llava-hf -> polyfocus brings the image processor back (SigLIP's mean/std, pad), with or without a
    tokenizer; the exported chat template takes OpenAI-style list content in plain transformers, and renders it as
    the string "<image>\\n" + text."""
    from transformers import AutoProcessor

    from polyfocus.cli import main
    from polyfocus.data.images import ImageProcessor
    from polyfocus.data.templates import get_template, render
    from polyfocus.data.tokenizer import default_tokenizer

    model = make_model(vision="siglip", image_aspect_ratio="pad")
    images = ImageProcessor(image_size=56, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), aspect_ratio="pad")
    for src in ("bare", "src"):
        model.save_pretrained(tmp_path / src)
        images.save_pretrained(tmp_path / src)
    tokenizer = default_tokenizer()
    tokenizer.chat_template = get_template("vicuna_v1").to_jinja()  # as a training run saves it
    tokenizer.save_pretrained(tmp_path / "src")
    for src in ("bare", "src"):  # without a tokenizer, the weights and the image settings still go together
        main(["convert", str(tmp_path / src), str(tmp_path / f"{src}_hf"), "--to", "hf"])
        main(["convert", "--from", "hf", str(tmp_path / f"{src}_hf"), str(tmp_path / f"{src}_back")])
        assert ImageProcessor.from_pretrained(tmp_path / f"{src}_back") == images

    processor = AutoProcessor.from_pretrained(tmp_path / "src_hf")
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    question = "What colour is the circle?"
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = [{"role": "user", "content": "<image>\n" + question}]
    prompt = processor.apply_chat_template(listed, add_generation_prompt=True)
    assert prompt == processor.apply_chat_template(text, add_generation_prompt=True)
    assert prompt == render(text, "vicuna_v1", add_generation_prompt=True)
    reply = listed + [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    assert processor.apply_chat_template(reply).endswith("ASSISTANT: Red.</s>")
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], images([image]))  # padded to a square, SigLIP-normalised
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 16


# ---- VW-LMM's released layout (pengts/VW-LMM, spec vw_lmm.md) --------------------------------------------------------


def vw_lmm_checkpoint(model, path, tower_path):
    """A checkpoint as VW-LMM's vwLlamaForCausalLM saves one: LLaVA's keys plus a top-level `vm_head.weight`, and
    LLaVA's flat config under VW-LMM's config class name (model_type "llava")."""
    from types import SimpleNamespace

    path.mkdir()
    config = llava_config(model, tower_path, model_type="llava", architectures=["vwLlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("vm_head.")}
    state = llava_state_dict(SimpleNamespace(state_dict=lambda: plain), with_tower=False)
    write_shards({**state, "vm_head.weight": model.vm_head.weight.detach()}, path, "safetensors")
    return path


def vw_model(pif=False):
    model = make_model(visual_words=True, pseudo_image_features=pif)
    with torch.no_grad():  # a trained head, not the copy of lm_head a new one starts from
        model.vm_head.weight.add_(torch.randn_like(model.vm_head.weight))
    return model


@pytest.mark.parametrize("pif", [False, True])
def test_vw_lmm_checkpoint_loads(tmp_path, pif):
    """VW-LMM's loader picks the PIF class when the model's name contains "pif"; so does ours."""
    model = vw_model(pif)
    write_clip_tower(model, tmp_path / "clip")
    name = "VW-LMM-Vicuna-pif-7b" if pif else "VW-LMM-Vicuna-7b"
    ckpt = vw_lmm_checkpoint(model, tmp_path / name, tmp_path / "clip")
    assert checkpoint_format(ckpt) == "llava"
    loaded = load_model(ckpt).eval()
    assert loaded.config.visual_words and loaded.config.pseudo_image_features is pif
    assert torch.equal(loaded.vm_head.weight, model.vm_head.weight)
    assert torch.equal(logits(loaded, image_token_id=-200), logits(model))
    if pif:  # the head is on PIF's inference path: without PIF the outputs differ
        loaded.config.pseudo_image_features = False
        assert not torch.allclose(logits(loaded, image_token_id=-200), logits(model))
        loaded.config.pseudo_image_features = True
    loaded.save_pretrained(tmp_path / "ours")  # and it saves in polyfocus's layout, head included
    again = load_model(tmp_path / "ours").eval()
    assert again.config.pseudo_image_features is pif and torch.equal(again.vm_head.weight, model.vm_head.weight)
    with pytest.raises(ValueError, match="no transformers Llava equivalent"):
        save_llava_hf(again, tmp_path / "hf")


def test_vw_lmm_readme_inference_through_the_pipeline(tmp_path):
    """VW-LMM's README: load_pretrained_model(path, name, "llama"), a vicuna_v1 prompt "<image>\\n" + question, greedy
    generate, decode the new tokens. Ours: Pipeline.from_pretrained(path, template="vicuna_v1").chat(...): the same
    prompt, and the same answer as the same weights saved in polyfocus's own format."""
    from polyfocus.data.templates import render
    from polyfocus.data.tokenizer import default_tokenizer
    from polyfocus.infer.pipeline import Pipeline

    question = "Write an exhaustive depiction of the given image."
    messages = [{"role": "user", "content": "<image>\n" + question}]
    assert render(messages, "vicuna_v1", add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\n" + question + " ASSISTANT:")
    mistral = render(messages, "mistral_instruct", add_generation_prompt=True)
    assert mistral == "[INST] <image>\n" + question + " [/INST]"

    model = vw_model()
    write_clip_tower(model, tmp_path / "clip")
    ckpt = vw_lmm_checkpoint(model, tmp_path / "VW-LMM-Vicuna-7b", tmp_path / "clip")
    default_tokenizer().save_pretrained(ckpt)  # VW-LMM ships its tokenizer in the model directory
    model.save_pretrained(tmp_path / "ours")
    default_tokenizer().save_pretrained(tmp_path / "ours")
    image = Image.effect_noise((56, 56), 60).convert("RGB")
    answers = [Pipeline.from_pretrained(path, template="vicuna_v1", device="cpu").chat(
        image, question, temperature=0, max_new_tokens=8) for path in (ckpt, tmp_path / "ours")]
    assert answers[0] == answers[1]
