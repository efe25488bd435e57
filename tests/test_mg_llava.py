"""MG-LLaVA (spec mg_llava.md): the high-resolution ConvNeXt branch (open_clip weights onto transformers' ConvNeXt, the
image pair), the Conv-Gate (the reference's formula; the plain model at initialisation), object tokens (after the
image tokens, one per box, from the multi-stage map), checkpoints (ours, and MG-LLaVA's layouts).

RoIAlign itself: tests/test_roi_align.py; boxes, detectors, data and inference: tests/test_mg_llava_boxes.py;
recipes and training: tests/test_mg_llava_train.py.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from test_checkpoints import write_base_llm, write_clip_tower  # noqa: E402
from transformers import ConvNextConfig, ConvNextModel

from polyfocus import PolyfocusConfig, PolyfocusForConditionalGeneration
from polyfocus.checkpoints import checkpoint_format, load_model, to_llava_hf
from polyfocus.checkpoints.convnext import load_hires_tower
from polyfocus.data.images import ImageProcessor
from polyfocus.model.fusion.convgate import ConvGate
from polyfocus.model.hires import hires_stages, low_res_pixels
from polyfocus.model.objects import naive_box_features
from polyfocus.model.presets import tiny_config

IMG = 4
TINY_HIRES = {"depths": [1, 1, 2, 1], "hidden_sizes": [8, 16, 24, 32]}  # ConvNeXt's stride pattern, tiny widths


def mg_config(**fields):
    """tiny_config (CLIP 56 px / 14: a 4x4 grid) with the high-resolution branch (128 px: 4 x 32)."""
    return tiny_config(**{"hires_config": TINY_HIRES, "fusion": "convgate", **fields})


def plain_and_mg(vision="clip", **fields):
    """A plain model and an MG-LLaVA one sharing every plain weight."""
    mg_cfg = mg_config(vision=vision, **fields)
    plain_cfg = tiny_config(vision=vision)
    torch.manual_seed(0)
    plain = PolyfocusForConditionalGeneration(plain_cfg).eval()
    mg = PolyfocusForConditionalGeneration(mg_cfg).eval()
    result = mg.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("mm_fusion.", "hires_tower.", "mm_object_projector.")) for k in result.missing_keys)
    return plain, mg


def randomise(module, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def hires_pixels(n=2, size=128, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- 1. the high-resolution tower --------------------------------------------------------------------------------


def layer_norm_2d(x, weight, bias):
    """timm's LayerNorm2d: over channels, eps 1e-6."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, 1e-6).permute(0, 3, 1, 2)


def timm_convnext_stages(state, x, depths):
    """timm's ConvNeXt trunk written out from the spec (§3) on open_clip's state dict: stem conv 4/4 + LN2d; stage
    i > 0: LN2d + conv 2/2; block: dw 7x7 → LN → fc1 → GELU → fc2 → gamma → + residual. → the 4 stage outputs."""
    p = lambda name: state[f"visual.trunk.{name}"]  # noqa: E731
    x = layer_norm_2d(F.conv2d(x, p("stem.0.weight"), p("stem.0.bias"), stride=4), p("stem.1.weight"),
                      p("stem.1.bias"))
    outs = []
    for i, depth in enumerate(depths):
        if i > 0:
            x = layer_norm_2d(x, p(f"stages.{i}.downsample.0.weight"), p(f"stages.{i}.downsample.0.bias"))
            x = F.conv2d(x, p(f"stages.{i}.downsample.1.weight"), p(f"stages.{i}.downsample.1.bias"), stride=2)
        for j in range(depth):
            b = f"stages.{i}.blocks.{j}."
            y = F.conv2d(x, p(b + "conv_dw.weight"), p(b + "conv_dw.bias"), padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], p(b + "norm.weight"), p(b + "norm.bias"), 1e-6)
            y = F.linear(F.gelu(F.linear(y, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"),
                         p(b + "mlp.fc2.bias"))
            x = x + (p(b + "gamma") * y).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def open_clip_state(depths, dims, seed=0):
    """A random open_clip CLIP-ConvNeXt state dict (trunk keys as in open_clip_pytorch_model.bin, plus a text-tower
    and head key that must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {"visual.trunk.stem.0.weight": r(dims[0], 3, 4, 4), "visual.trunk.stem.0.bias": r(dims[0]),
         "visual.trunk.stem.1.weight": 1 + r(dims[0]), "visual.trunk.stem.1.bias": r(dims[0]),
         "visual.head.mlp.fc1.weight": r(4, dims[-1]), "text.token_embedding.weight": r(5, 4), "logit_scale": r(1)}
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i > 0:
            s |= {f"visual.trunk.stages.{i}.downsample.0.weight": 1 + r(dims[i - 1]),
                  f"visual.trunk.stages.{i}.downsample.0.bias": r(dims[i - 1]),
                  f"visual.trunk.stages.{i}.downsample.1.weight": r(dim, dims[i - 1], 2, 2),
                  f"visual.trunk.stages.{i}.downsample.1.bias": r(dim)}
        for j in range(depth):
            b = f"visual.trunk.stages.{i}.blocks.{j}."
            s |= {b + "conv_dw.weight": r(dim, 1, 7, 7), b + "conv_dw.bias": r(dim), b + "norm.weight": 1 + r(dim),
                  b + "norm.bias": r(dim), b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                  b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "gamma": r(dim)}
    return s


@pytest.mark.parametrize("file", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_weights_load_into_transformers_convnext(tmp_path, file):
    """open_clip's CLIP-ConvNeXt (timm trunk keys) → ConvNextModel: every stage output equals the timm trunk's."""
    state = open_clip_state(TINY_HIRES["depths"], TINY_HIRES["hidden_sizes"])
    if file.endswith(".bin"):
        torch.save(state, tmp_path / file)
    else:
        save_file(state, tmp_path / file)
    tower = load_hires_tower(tmp_path, ConvNextConfig(**TINY_HIRES)).eval()
    x = hires_pixels(size=64)
    want = timm_convnext_stages(state, x, TINY_HIRES["depths"])
    got = hires_stages(tower, x)
    assert [tuple(s.shape) for s in got] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert load_hires_tower(tmp_path / file, ConvNextConfig(**TINY_HIRES)).state_dict().keys() == tower.state_dict().keys()


def test_open_clips_own_convnext_large_d_320_where_installed(tmp_path):
    """open_clip's CLIP-ConvNeXt-L-d-320 (random weights): its trunk's stage outputs equal ours after loading its
    state dict (open_clip needs torchvision, which polyfocus does not install: skipped without it)."""
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("convnext_large_d_320", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    tower = load_hires_tower(tmp_path).eval()
    x = hires_pixels(1, 64)
    with torch.no_grad():
        h, want = model.visual.trunk.stem(x), []
        for stage in model.visual.trunk.stages:
            h = stage(h)
            want.append(h)
        got = hires_stages(tower, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_open_clip_weights_of_the_wrong_size_are_refused(tmp_path):
    torch.save(open_clip_state([1, 1, 1, 1], [8, 16, 24, 32]), tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="do not match the ConvNeXt config"):
        load_hires_tower(tmp_path, ConvNextConfig(**TINY_HIRES))
    with pytest.raises(FileNotFoundError, match="nothing: no such file or directory"):
        load_hires_tower(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no high-resolution tower here"):
        load_hires_tower(tmp_path / "empty")


def test_real_size_branch_shapes_and_conv_gate_parameters():
    """CLIP-L/336 + CLIP-ConvNeXt-L: 768 px, stages 192^2x192 ... 24^2x1536 (on the meta device: shapes only); the
    Conv-Gate has the reference's ~6.1 M parameters."""
    config = PolyfocusConfig(fusion="convgate", object_tokens=True)
    assert (config.hires_image_size, config.image_input_size, config.object_feature_size) == (768, 768, 2880)
    assert config.num_image_tokens == 576 and config.mm_hidden_size == 1024
    with torch.device("meta"):
        tower = ConvNextModel(config.hires_config)
        stages = hires_stages(tower, torch.empty(1, 3, 768, 768))
    assert [tuple(s.shape) for s in stages] == [(1, 192, 192, 192), (1, 384, 96, 96), (1, 768, 48, 48),
                                                (1, 1536, 24, 24)]
    gate = ConvGate.from_config(config)
    assert sum(p.numel() for p in gate.parameters()) == 6_085_121
    assert gate.gate[0].out_features == 512


def test_the_low_resolution_image_is_a_bilinear_downsample_of_the_high_resolution_one():
    """Spec §1: the tower's 336 input is F.interpolate(bilinear, no antialias) of the normalised 768 tensor, and the
    processor makes the 768 tensor (pad to square with the mean colour, bicubic)."""
    processor = ImageProcessor(image_size=768, aspect_ratio="pad")
    image = Image.new("RGB", (400, 250), (200, 30, 30))
    pixels = processor([image])
    assert pixels.shape == (1, 3, 768, 768)
    top = torch.tensor([122, 116, 104]) / 255.0  # the pad colour, at the top edge
    want = (top - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(pixels[0, :, 0, 384], want.float())
    low = low_res_pixels(pixels, 336)
    assert torch.equal(low, F.interpolate(pixels, size=(336, 336), mode="bilinear", align_corners=False))
    assert torch.equal(low_res_pixels(low, 336), low)


# ---- 1. Conv-Gate ------------------------------------------------------------------------------------------------


def test_conv_gate_is_the_references_formula():
    """h = slow_proj(gelu(slow_conv(E_H))); l = E_L + fast_proj(gelu(fast_conv(E_L grid))); g = gate(mean(cat(l, h)));
    E_F = l + tanh(g) h. Row-major tokens; one scalar gate per image."""
    torch.manual_seed(0)
    gate = ConvGate(16, 24, (3, 5)).double()
    randomise(gate, scale=0.3)
    low, high = torch.randn(2, 15, 16, dtype=torch.float64), torch.randn(2, 24, 3, 5, dtype=torch.float64)
    h = gate.slow_proj(F.gelu(gate.slow_conv(high))).flatten(2).transpose(1, 2)
    grid = low.transpose(1, 2).reshape(2, 16, 3, 5)
    l = (grid + gate.fast_proj(F.gelu(gate.fast_conv(grid)))).flatten(2).transpose(1, 2)
    g = gate.gate(torch.cat([l, h], -1).mean(1))  # [2, 1]
    out = gate.fuse(low, high)
    torch.testing.assert_close(out, l + torch.tanh(g)[:, None] * h, rtol=0, atol=1e-12)
    ratio = (out - l) / h  # the same factor for every token and channel of an image
    assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio))
    assert not torch.allclose(ratio[0, 0, 0], ratio[1, 0, 0])


def test_conv_gate_starts_as_the_identity_with_the_references_init():
    torch.manual_seed(0)
    gate = ConvGate(16, 24, (3, 3))
    assert not gate.slow_proj.weight.any() and not gate.fast_proj.weight.any()
    assert not gate.slow_conv.bias.any() and not gate.fast_conv.bias.any()
    bound = math.sqrt(6 / (24 + 24))  # xavier_uniform of a 1x1 conv 24 → 24
    assert gate.slow_conv.weight.abs().max() <= bound and gate.slow_conv.weight.std() > bound / 3
    low = torch.randn(2, 9, 16)
    assert torch.equal(gate.fuse(low, torch.randn(2, 24, 3, 3)), low)
    with pytest.raises(ValueError, match="3x3 grid"):
        gate.fuse(torch.randn(2, 16, 16), torch.randn(2, 24, 4, 4))


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_the_model_equals_the_plain_model_at_init(vision):
    """Conv-Gate on: for 128 px images, the same logits as the plain model fed their 56 px bilinear downsample."""
    plain, mg = plain_and_mg(**({"vision": vision} if vision != "clip" else {}))
    pixels = hires_pixels()
    n = mg.config.num_image_tokens
    ids = torch.tensor([[1, 9, *[IMG] * n, 7, 8]] * 2)
    low = low_res_pixels(pixels, 56)
    assert torch.equal(mg.get_image_features(pixels), plain.get_image_features(low))
    assert torch.equal(mg(input_ids=ids, pixel_values=pixels).logits, plain(input_ids=ids, pixel_values=low).logits)
    randomise(mg.mm_fusion)  # and the gate is really in the path
    assert not torch.allclose(mg.get_image_features(pixels), plain.get_image_features(low))


def test_a_five_stage_convnext_doubles_the_high_resolution_side():
    """The side follows the ConvNeXt's total stride (stem x 2^(stages-1)): 5 stages on a 4x4 grid → 256 px (the demo's
    tower: 512 px over 8x8); the object vectors hold every stage's channels."""
    five = {"num_stages": 5, "depths": [1, 1, 1, 1, 1], "hidden_sizes": [4, 8, 12, 16, 20]}
    plain, mg = plain_and_mg(object_tokens=True, hires_config=five)
    assert (mg.config.hires_image_size, mg.config.object_feature_size) == (256, 60)
    pixels = hires_pixels(size=256)
    features, objects = mg.image_features(pixels, BOXES)
    assert torch.equal(features, plain.get_image_features(low_res_pixels(pixels, 56))) and objects.shape == (3, 64)


def test_box_pool_precision_reference_changes_only_a_bf16_models_object_tokens():
    """MG-LLaVA's casts in box pooling (box_pool_precision "reference") change nothing in fp32; in bf16 the object
    tokens move (the image tokens never do), by what bench/box_pool_precision.py measures."""
    _, mg = plain_and_mg(object_tokens=True)
    randomise(mg.hires_tower)
    pixels = hires_pixels()
    for dtype, same in ((torch.float32, True), (torch.bfloat16, False)):
        model = mg.to(dtype)
        results = {}
        for precision in ("fp32", "reference"):
            model.config.box_pool_precision = precision
            with torch.no_grad():
                results[precision] = model.image_features(pixels.to(dtype), BOXES)
        (features, objects), (features_ref, objects_ref) = results["fp32"], results["reference"]
        assert torch.equal(features, features_ref) and objects.dtype == objects_ref.dtype == dtype
        assert torch.allclose(objects.float(), objects_ref.float(), rtol=1e-5, atol=1e-6) == same, dtype
    mg.config.box_pool_precision = "fp32"
    mg.float()


def test_images_of_the_wrong_size_are_a_clear_error():
    _, mg = plain_and_mg()
    with pytest.raises(ValueError, match="takes 128x128 images"):
        mg.get_image_features(torch.randn(1, 3, 56, 56))


@pytest.mark.parametrize("fields,message", [
    ({"fusion": "convgate", "mm_vision_select_feature": "cls_patch"}, "fuses the patch grid"),
    ({"hires_config": TINY_HIRES}, "nothing uses the high-resolution tower"),
    ({"box_limit_num": 5}, "object_tokens is off"),
    ({"object_tokens": True, "hires_config": TINY_HIRES, "box_limit_mode": "per_box"}, "box_limit_mode"),
    ({"object_tokens": True, "hires_config": TINY_HIRES, "box_iou_threshold": 2.0}, "box_iou_threshold"),
    ({"box_pool_precision": "reference"}, "object_tokens is off"),
    ({"object_tokens": True, "hires_config": TINY_HIRES, "box_pool_precision": "fp16"}, "box_pool_precision"),
    ({"fusion": "convgate", "hires_config": {"model_type": "swin"}}, "must be a ConvNeXt config"),
    ({"fusion": "s2", "object_tokens": True}, "S2 takes its own image sizes"),
    ({"fusion": "convgate", "hires_config": {"depths": [1] * 5, "hidden_sizes": [4, 8, 12, 16, 20]}},
     r"must both have num_stages \(4\) entries"),  # 5 stages listed, ConvNextConfig's num_stages left at 4
])
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_plain_checkpoint_with_the_branch_switched_on_gets_each_parts_own_init(tmp_path):
    """from_pretrained(plain checkpoint, config with convgate + object tokens): the gate is the identity, the ConvNeXt
    has its own init (layer scale 1e-6, LayerNorms 1/0), the object projector the projector's; logits unchanged."""
    plain, _ = plain_and_mg()
    plain.save_pretrained(tmp_path)
    config = PolyfocusConfig(**{**PolyfocusConfig.from_pretrained(tmp_path).to_dict(), "fusion": "convgate",
                                "hires_config": TINY_HIRES})
    model, info = PolyfocusForConditionalGeneration.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"mm_fusion", "hires_tower"}
    layer = model.hires_tower.encoder.stages[1].layers[0]
    assert torch.equal(layer.layer_scale_parameter, torch.full_like(layer.layer_scale_parameter, 1e-6))
    assert torch.equal(layer.layernorm.weight, torch.ones_like(layer.layernorm.weight))
    assert 0.01 < layer.pwconv1.weight.std() < 0.03 and not model.mm_fusion.fast_proj.weight.any()
    pixels = hires_pixels()
    ids = torch.tensor([[1, *[IMG] * 16, 7]] * 2)
    assert torch.equal(model.eval()(input_ids=ids, pixel_values=pixels).logits,
                       plain(input_ids=ids, pixel_values=low_res_pixels(pixels, 56)).logits)


# ---- 1b. composed with MMFuser ------------------------------------------------------------------------------------


def test_fusion_chain_feeds_mmfusers_features_to_the_conv_gate(tmp_path):
    """fusion "mmfuser,convgate": the Conv-Gate fuses the high-resolution stage into MMFuser's refined features
    (each module's own forward, composed by hand); the chain is the plain model at initialisation; its weights keep
    their modules' names and survive a save and load."""
    from polyfocus.model.vision import TowerOutputs

    plain, _ = plain_and_mg()
    torch.manual_seed(0)
    model = PolyfocusForConditionalGeneration(mg_config(fusion="mmfuser,convgate", mmfuser_num_heads=4)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    pixels = hires_pixels()
    tower = TowerOutputs(model.config, model.vision_tower, model.hires_tower, pixels)
    with torch.no_grad():
        torch.testing.assert_close(model.projector_inputs(tower), tower.features, rtol=0, atol=0)  # identity at init
        randomise(model.mm_fusion)
        tower = TowerOutputs(model.config, model.vision_tower, model.hires_tower, pixels)
        refined = model.mm_fusion["mmfuser"](tower)
        by_hand = model.mm_fusion["convgate"].fuse(refined, tower.hires_stages[-1])
        chained = model.projector_inputs(tower)
    assert not torch.allclose(refined, tower.features) and not torch.allclose(by_hand, refined)
    torch.testing.assert_close(chained, by_hand, rtol=0, atol=0)
    names = {k.split(".")[1] for k in model.state_dict() if k.startswith("mm_fusion.")}
    assert names == {"mmfuser", "convgate"}
    model.save_pretrained(tmp_path)
    loaded = PolyfocusForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.fusions == ["mmfuser", "convgate"]
    with torch.no_grad():
        again = loaded.projector_inputs(TowerOutputs(loaded.config, loaded.vision_tower, loaded.hires_tower, pixels))
    # Equal to float noise, not bitwise: on some machines the reloaded model's fused features differ by 1.2e-7 on 33 of
    # 1,024 values although every weight and both towers' outputs are bitwise equal (the kernels' choice: the thread
    # count alone moves the same model's output by 4.8e-7 there).
    torch.testing.assert_close(again, chained, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fusion,message", [
    ("convgate,mmfuser", "MMFuser reads the tower's hidden states.*put it first"),
    ("s2,convgate", "combines with no other fusion"),
    ("mmfuser,mmfuser", "several of them in the order they apply"),
    ("mmfuser,", "several of them in the order they apply"),
])
def test_bad_fusion_chain_is_a_clear_error(fusion, message):
    with pytest.raises(ValueError, match=message):
        mg_config(fusion=fusion, mmfuser_num_heads=4)


def test_fusion_chain_as_a_list_is_the_same_model():
    assert mg_config(fusion=["mmfuser", "convgate"], mmfuser_num_heads=4).fusions == ["mmfuser", "convgate"]
    assert tiny_config(fusion="mmfuser", mmfuser_num_heads=4).fusions == ["mmfuser"] and tiny_config().fusions == []


# ---- 2. object tokens ----------------------------------------------------------------------------------------------

BOXES = torch.tensor([[0, 10.0, 20.0, 60.0, 90.0], [0, 0.0, 0.0, 0.0, 0.0], [1, 100.0, 3.0, 128.0, 40.0]])


def test_object_tokens_follow_each_images_tokens():
    """Sequence: [text][16 fused image tokens][one token per box][text] per image; a box's token is the object
    projector's MLP of the mean of RoIAlign over the upsampled, concatenated ConvNeXt stages (built here for real)."""
    _, mg = plain_and_mg(object_tokens=True)
    randomise(mg.mm_fusion)
    pixels = hires_pixels()
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7], [1, *[IMG] * 17, 5, 6, 2]])
    embeds = mg.embed_inputs(ids, pixels, image_boxes=BOXES)
    features, objects = mg.image_features(pixels, BOXES)
    stages = hires_stages(mg.hires_tower, pixels)
    pooled = torch.cat([naive_box_features([s[0] for s in stages], BOXES[:2, 1:], 128),
                        naive_box_features([s[1] for s in stages], BOXES[2:, 1:], 128)])
    torch.testing.assert_close(objects, mg.mm_object_projector(pooled), rtol=1e-4, atol=1e-5)
    assert torch.equal(embeds[0, 2:18], features[0]) and torch.equal(embeds[0, 18:20], objects[:2])
    assert torch.equal(embeds[1, 1:17], features[1]) and torch.equal(embeds[1, 17], objects[2])
    text = mg.get_input_embeddings()(torch.tensor([1, 9, 7]))
    assert torch.equal(embeds[0, [0, 1, 20]], text)
    logits = mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES).logits
    assert logits.shape == (2, 21, 2048)


def test_object_tokens_need_their_boxes_and_the_right_count():
    _, mg = plain_and_mg(object_tokens=True)
    ids = torch.tensor([[1, *[IMG] * 18]])
    pixels = hires_pixels(1)
    with pytest.raises(ValueError, match="give image_boxes"):
        mg(input_ids=ids, pixel_values=pixels)
    with pytest.raises(ValueError, match=r"1 image\(s\) give 17 visual tokens \(16 each plus 1 object tokens\)"):
        mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES[1:2])


def test_beam_search_keeps_each_images_boxes():
    """generate repeats tensor arguments row by row for beams: image_boxes' image indices must not be scrambled by
    it (the image id is in the vocabulary here). Same beams as from the prompt's embeddings, made once."""
    _, mg = plain_and_mg(object_tokens=True)
    randomise(mg.mm_object_projector, scale=1.0)
    pixels, boxes = hires_pixels(1), torch.tensor([[0, 10.0, 20.0, 60.0, 90.0], [0, 70.0, 3.0, 128.0, 40.0]])
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7]])
    kwargs = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False, "return_dict_in_generate": True,
              "output_scores": True, "pad_token_id": 0}
    out = mg.generate(input_ids=ids, pixel_values=pixels, image_boxes=boxes, **kwargs)
    want = mg.generate(input_ids=ids, inputs_embeds=mg.embed_inputs(ids, pixels, image_boxes=boxes), **kwargs)
    torch.testing.assert_close(out.sequences_scores, want.sequences_scores)
    assert torch.equal(out.sequences, want.sequences)


def test_object_tokens_without_conv_gate():
    """object_tokens alone: the ConvNeXt feeds the boxes only; the image tokens are the plain model's."""
    plain, mg = plain_and_mg(fusion=None, object_tokens=True)
    assert mg.mm_fusion is None and mg.hires_tower is not None
    pixels = hires_pixels()
    features, objects = mg.image_features(pixels, BOXES)
    assert torch.equal(features, plain.get_image_features(low_res_pixels(pixels, 56))) and objects.shape == (3, 64)


def test_object_tokens_with_mmfuser():
    """The switches compose: MMFuser refines the downsampled image's tower features, the ConvNeXt gives the boxes."""
    plain, mg = plain_and_mg(fusion="mmfuser", object_tokens=True)
    pixels = hires_pixels()
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7], [1, *[IMG] * 17, 5, 6, 2]])
    assert mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES).logits.shape == (2, 21, 2048)
    features, _ = mg.image_features(pixels, BOXES)
    assert torch.equal(features, plain.get_image_features(low_res_pixels(pixels, 56)))  # MMFuser: identity at init


def test_text_only_training_batch_keeps_the_new_parts_in_the_graph():
    _, mg = plain_and_mg(object_tokens=True)
    mg.train()
    ids = torch.tensor([[1, 5, 6, 7]])
    mg(input_ids=ids, labels=ids).loss.backward()
    for module in (mg.mm_fusion, mg.mm_object_projector):
        assert all(p.grad is not None for p in module.parameters())


def test_the_frozen_convnext_runs_without_autograd():
    _, mg = plain_and_mg(object_tokens=True)
    mg.hires_tower.requires_grad_(False)
    stages = hires_stages(mg.hires_tower, hires_pixels())
    assert not any(s.requires_grad for s in stages)
    mg.hires_tower.requires_grad_(True)
    assert all(s.requires_grad for s in hires_stages(mg.hires_tower, hires_pixels()))


def test_bf16_model_runs_on_cpu():
    _, mg = plain_and_mg(object_tokens=True)
    randomise(mg.mm_fusion)
    pixels = hires_pixels()
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7], [1, *[IMG] * 17, 5, 6, 2]])
    want = mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES).logits
    mg.to(torch.bfloat16).train()
    out = mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert (out.logits.float() - want).abs().max() < 0.1
    out.loss.backward()
    assert mg.mm_object_projector[0].weight.grad.any() and mg.mm_fusion.gate[0].weight.grad is not None


# ---- 4. checkpoints ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    _, mg = plain_and_mg(object_tokens=True, box_detector="synthworld", box_limit_num=30)
    randomise(mg.mm_fusion)
    mg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["fusion"], saved["object_tokens"], saved["box_detector"], saved["box_limit_num"]) == \
        ("convgate", True, "synthworld", 30)
    assert saved["hires_config"]["hidden_sizes"] == [8, 16, 24, 32]
    keys = load_file(tmp_path / "model.safetensors")
    assert {k.split(".")[0] for k in keys} >= {"hires_tower", "mm_fusion", "mm_object_projector"}
    loaded = load_model(tmp_path).eval()
    for key, value in mg.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7], [1, *[IMG] * 17, 5, 6, 2]])
    pixels = hires_pixels()
    assert torch.equal(loaded(input_ids=ids, pixel_values=pixels, image_boxes=BOXES).logits,
                       mg(input_ids=ids, pixel_values=pixels, image_boxes=BOXES).logits)


def test_export_to_transformers_llava_is_refused():
    _, mg = plain_and_mg(fusion=None, object_tokens=True)
    with pytest.raises(ValueError, match="no object tokens"):
        to_llava_hf(mg)


def reference_state(model) -> dict[str, torch.Tensor]:
    """Our weights under MG-LLaVA's (xtuner's) names: llm.*, projector.model.*, bbox_projector.model.*, fuse_module.*."""
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in (("language_model.", "llm."), ("mm_projector.", "projector.model."),
                             ("mm_object_projector.", "bbox_projector.model."), ("mm_fusion.", "fuse_module.")):
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = value
    return state


def convnext_to_open_clip(tower) -> dict[str, torch.Tensor]:
    """A transformers ConvNeXt's weights under open_clip's trunk names (the inverse of the loader's mapping)."""
    import re

    out = {}
    for key, value in tower.state_dict().items():
        new = (key.replace("embeddings.patch_embeddings.", "visual.trunk.stem.0.")
               .replace("embeddings.layernorm.", "visual.trunk.stem.1.").replace("encoder.stages.", "visual.trunk.stages.")
               .replace("downsampling_layer.", "downsample.").replace(".dwconv.", ".conv_dw.")
               .replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
               .replace(".layer_scale_parameter", ".gamma"))
        new = re.sub(r"\.layers\.(\d+)\.layernorm\.", r".blocks.\1.norm.", new).replace(".layers.", ".blocks.")
        if new.startswith("visual."):
            out[new] = value
    return out


def mg_llava_model():
    _, mg = plain_and_mg(object_tokens=True)
    for module in (mg.mm_fusion, mg.mm_object_projector, mg.hires_tower):
        randomise(module)
    return mg.eval()


def logits_of(model, image_token_id, boxes=BOXES):
    ids = torch.tensor([[1, 9, *[IMG] * 18, 7], [1, *[IMG] * 17, 5, 6, 2]])
    return model(input_ids=ids.masked_fill(ids == IMG, image_token_id), pixel_values=hires_pixels(),
                 image_boxes=boxes).logits


def write_backbones(model, root: Path):
    write_clip_tower(model, root / "clip")
    torch.save(convnext_to_open_clip(model.hires_tower), root / "open_clip_pytorch_model.bin")


def test_mg_llava_converted_layout_loads(tmp_path):
    """xtuner's `pth_to_hf` layout (the LLM at the top, the MLP in projector/) with MG-LLaVA's bbox_projector/ and
    fuse_module/ beside it; CLIP from its directory, the ConvNeXt from open_clip weights."""
    model = mg_llava_model()
    write_backbones(model, tmp_path)
    ckpt = tmp_path / "mg-llava-vicuna7b"
    model.language_model.save_pretrained(ckpt)
    state = reference_state(model)
    for part in ("projector", "bbox_projector", "fuse_module"):
        (ckpt / part).mkdir()
        prefix = part + "."
        save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
                  ckpt / part / "model.safetensors")
    (ckpt / "projector" / "config.json").write_text(json.dumps({"model_type": "projector", "depth": 2}))
    assert checkpoint_format(ckpt) == "mg-llava"
    loaded = load_model(ckpt, vision_tower=tmp_path / "clip", hires_tower=tmp_path).eval()
    config = loaded.config
    assert (config.fusion, config.object_tokens, config.image_token_id, config.mm_vision_select_layer) == \
        ("convgate", True, -200, -2)
    torch.testing.assert_close(logits_of(loaded, -200), logits_of(model, IMG), rtol=1e-4, atol=1e-4)
    from polyfocus.cli import main

    main(["convert", str(ckpt), str(tmp_path / "ours"), "--from", "mg-llava", "--vision-tower", str(tmp_path / "clip"),
          "--hires-tower", str(tmp_path)])  # and it converts to our layout
    assert checkpoint_format(tmp_path / "ours") == "polyfocus"
    torch.testing.assert_close(logits_of(load_model(tmp_path / "ours").eval(), -200), logits_of(model, IMG),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="give hires_tower"):
        load_model(ckpt, vision_tower=tmp_path / "clip")


def test_mg_llava_state_dict_loads_over_a_base_llm(tmp_path):
    """MG-LLaVA's released iter_*.pth (an mmengine checkpoint: {"meta", "state_dict"}) on top of Vicuna."""
    model = mg_llava_model()
    write_backbones(model, tmp_path)
    write_base_llm(model, tmp_path / "vicuna")
    torch.save({"meta": {"iter": 5198}, "state_dict": reference_state(model)}, tmp_path / "iter_5198.pth")
    assert checkpoint_format(tmp_path / "iter_5198.pth") == "mg-llava"
    loaded = load_model(tmp_path / "iter_5198.pth", model_base=tmp_path / "vicuna", vision_tower=tmp_path / "clip",
                        hires_tower=tmp_path).eval()
    torch.testing.assert_close(logits_of(loaded, -200), logits_of(model, IMG), rtol=1e-4, atol=1e-4)

    from polyfocus.cli import main
    from polyfocus.data.tokenizer import build_tokenizer

    build_tokenizer(save_dir=tmp_path / "vicuna")  # the .pth holds no tokenizer: the converted model takes its LLM's
    main(["convert", str(tmp_path / "iter_5198.pth"), str(tmp_path / "ours"), "--model-base", str(tmp_path / "vicuna"),
          "--vision-tower", str(tmp_path / "clip"), "--hires-tower", str(tmp_path)])
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (tmp_path / "vicuna" / "tokenizer.json").read_bytes()


def test_mg_llava_deepspeed_checkpoint_loads_through_deepspeed(tmp_path, monkeypatch):
    """xtuner under DeepSpeed saves iter_N.pth/ as a directory, DeepSpeed's checkpoint with tag "iter_N.pth"; it is
    read as xtuner reads it, through DeepSpeed's zero_to_fp32 (stood in for here: deepspeed is not installed in CI)."""
    import types

    model = mg_llava_model()
    write_backbones(model, tmp_path)
    write_base_llm(model, tmp_path / "vicuna")
    ckpt = tmp_path / "work_dirs" / "iter_5198.pth"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").touch()
    calls = []

    def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None):
        calls.append((checkpoint_dir, tag))
        return reference_state(model)

    zero_to_fp32 = types.ModuleType("deepspeed.utils.zero_to_fp32")
    zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint = get_fp32_state_dict_from_zero_checkpoint
    assert checkpoint_format(ckpt) == "mg-llava"
    with pytest.raises(ValueError, match="iter_5198.pth: a DeepSpeed checkpoint; reading it needs deepspeed"):
        monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
        load_model(ckpt, model_base=tmp_path / "vicuna", vision_tower=tmp_path / "clip", hires_tower=tmp_path)
    for name in ("deepspeed", "deepspeed.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", zero_to_fp32)
    loaded = load_model(ckpt, model_base=tmp_path / "vicuna", vision_tower=tmp_path / "clip", hires_tower=tmp_path)
    assert calls == [(str(tmp_path / "work_dirs"), "iter_5198.pth")]
    torch.testing.assert_close(logits_of(loaded.eval(), -200), logits_of(model, IMG), rtol=1e-4, atol=1e-4)


def test_mg_llava_stage1_state_dict_as_pretrain_mm_mlp_adapter():
    """Stage 2 starting from MG-LLaVA's stage-1 weights: projector, fuse_module and bbox_projector all load."""
    from polyfocus.checkpoints.llava import load_projector_weights
    from polyfocus.train.run import load_projector  # noqa: F401 (the training path calls load_projector_weights)

    model = mg_llava_model()
    stage1 = {k: v for k, v in reference_state(model).items() if not k.startswith("llm.")}
    _, fresh = plain_and_mg(object_tokens=True)
    load_projector_weights(fresh, stage1, "iter_2181.pth")
    for key, value in model.state_dict().items():
        if key.startswith(("mm_fusion.", "mm_projector.", "mm_object_projector.")):
            assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="object tokens' projector"):
        load_projector_weights(fresh, {k: v for k, v in stage1.items() if not k.startswith("bbox")}, "x.pth")


def test_qlora_keeps_the_new_parts_unquantized():
    """QLoRA quantizes the LLM's body only: bitsandbytes matches skip names as module-name prefixes, so the
    high-resolution ConvNeXt (its pwconv Linears) and the object projector must be listed by their own names
    ("mm_projector" does not cover "mm_object_projector")."""
    from polyfocus.checkpoints import SKIP_QUANTIZATION
    from polyfocus.train.freeze import PARTS

    model = PolyfocusForConditionalGeneration(mg_config(object_tokens=True))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("language_model."):
            assert any(name == key or name.startswith(key + ".") for key in SKIP_QUANTIZATION), name
    for prefix in PARTS["hires_tower"] + PARTS["projector"] + PARTS["fusion"]:
        assert prefix.rstrip(".") in SKIP_QUANTIZATION, prefix
