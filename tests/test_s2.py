"""S2 multi-scale fusion (polyfocus/model/fusion/s2.py; spec densefusion.md §8): the chessboard split/merge, parity
with the reference s2wrapper's forward (transcribed below) and with a naive per-tile loop, the config switch, the
model (one scale == the plain model), checkpoints (ours and LLaVA-S2's config), the image size, and training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_checkpoints import llava_config, llava_state_dict, write_clip_tower, write_shards  # noqa: E402

from polyfocus import PolyfocusConfig, PolyfocusForConditionalGeneration
from polyfocus.checkpoints import load_model
from polyfocus.model.fusion.s2 import merge_chessboard, split_chessboard
from polyfocus.model.presets import tiny_config
from polyfocus.model.vision import TowerOutputs

from train_helpers import write_tiny_backbones  # noqa: E402

IMG = 4
SIDE = 28  # the tiny tower's image_size: a 2x2 patch grid of 14 px patches


def s2_config(scales=(28, 56, 84), **overrides):
    return tiny_config(image_size=SIDE, fusion="s2", s2_scales=list(scales), **overrides)


def plain_and_s2(scales=(28, 56, 84), **overrides):
    """A plain model and the same weights with S2 switched on (the projector reads 3x the channels, so it differs)."""
    torch.manual_seed(0)
    s2 = PolyfocusForConditionalGeneration(s2_config(scales, **overrides)).eval()
    plain = PolyfocusForConditionalGeneration(tiny_config(image_size=SIDE, **overrides)).eval()
    plain.load_state_dict({k: v for k, v in s2.state_dict().items() if not k.startswith("mm_projector.")},
                          strict=False)
    return plain, s2


# ---- 1. the chessboard -------------------------------------------------------------------------------------------


def test_split_is_tile_major_and_merge_inverts_it():
    x = torch.arange(2 * 1 * 4 * 4).view(2, 1, 4, 4)
    tiles = split_chessboard(x, 2)  # [4*2, 1, 2, 2]: top-left tiles of both images, then top-right, ...
    assert tiles.shape == (8, 1, 2, 2)
    assert tiles[0, 0].tolist() == [[0, 1], [4, 5]] and tiles[1, 0].tolist() == [[16, 17], [20, 21]]
    assert tiles[2, 0].tolist() == [[2, 3], [6, 7]] and tiles[6, 0].tolist() == [[10, 11], [14, 15]]
    assert torch.equal(merge_chessboard(tiles, 2), x)
    assert torch.equal(merge_chessboard(split_chessboard(x, 1), 1), x)


# ---- 2. parity with the reference -------------------------------------------------------------------------------


def reference_forward(model, input, img_sizes, max_split_size):
    """s2wrapper.core.forward (bfshi/scaling_on_scales) with split_mode="resize", num_prefix_token=0,
    output_shape="bnc", resize_output_to_idx=0, as LLaVA-S2 calls it; einops replaced by reshape."""
    b, c, input_h, input_w = input.shape
    img_sizes = [(size, size) for size in img_sizes]
    input_multiscale = [F.interpolate(input.to(torch.float32), size=size, mode="bicubic").to(input.dtype)
                        for size in img_sizes]
    num_splits = [(math.ceil(size[0] / max_split_size), math.ceil(size[1] / max_split_size)) for size in img_sizes]
    original_img_sizes = img_sizes
    img_sizes = [(n[0] * max_split_size, n[1] * max_split_size) for n in num_splits]
    input_multiscale = [F.interpolate(x.to(torch.float32), size=size, mode="bicubic").to(x.dtype)
                        for size, x in zip(img_sizes, input_multiscale)]

    def split(x, num_split):
        B, C, H, W = x.shape
        h, w = H // num_split[0], W // num_split[1]
        return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(num_split[0])
                          for j in range(num_split[1])], dim=0)

    def merge(x, num_split):
        B = x.shape[0]
        bb = B // (num_split[0] * num_split[1])
        return torch.cat([torch.cat([x[(i * num_split[1] + j) * bb:(i * num_split[1] + j + 1) * bb]
                                     for j in range(num_split[1])], dim=-1) for i in range(num_split[0])], dim=-2)

    input_multiscale = [split(x, num_split=n) for n, x in zip(num_splits, input_multiscale)]
    outs = [model(x) for x in input_multiscale]
    outs = [o.transpose(1, 2).reshape(o.shape[0], o.shape[2], int(o.shape[1] ** 0.5), int(o.shape[1] ** 0.5))
            for o in outs]
    outs = [merge(o, num_split=n) for n, o in zip(num_splits, outs)]
    original_feature_sizes = [(math.ceil(o[0] / s[0] * f[0]), math.ceil(o[1] / s[1] * f[1]))
                              for o, s, f in zip(original_img_sizes, img_sizes, [out.shape[-2:] for out in outs])]
    outs = [F.interpolate(out.to(torch.float32), size=size, mode="area").to(out.dtype)
            for size, out in zip(original_feature_sizes, outs)]
    output_size = outs[0].shape[-2:]
    out = torch.cat([F.interpolate(o.to(torch.float32), size=output_size, mode="area").to(o.dtype) for o in outs],
                    dim=1)
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("scales", [(28, 56, 84), (28, 42, 56), (28, 70)])
def test_matches_the_reference_forward(scales):
    """Multiples of the tile (LLaVA-S2's 336/672/1008) and not (42: resized up to 2 tiles, pooled to 3x3 first)."""
    _, model = plain_and_s2(scales)
    pixels = torch.randn(2, 3, max(scales), max(scales), generator=torch.Generator().manual_seed(1))
    tower = TowerOutputs(model.config, model.vision_tower, None, pixels)
    ours = model.mm_fusion(tower)
    theirs = reference_forward(tower.select, pixels, list(scales), SIDE)
    assert ours.shape == (2, 4, 32 * len(scales))
    assert torch.equal(ours, theirs)


def test_matches_a_naive_per_tile_loop():
    """Independently: each tile through the tower alone, its 2x2 patch map written into the scale's grid, the grid
    mean-pooled by n (the area resize of an n-times-larger map), scales concatenated, then the projector."""
    _, model = plain_and_s2()
    pixels = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(2))
    columns = []
    for scale in (28, 56, 84):
        n = scale // SIDE
        image = F.interpolate(pixels, size=(scale, scale), mode="bicubic") if scale != 84 else pixels
        grid = torch.zeros(32, 2 * n, 2 * n)
        for i in range(n):
            for j in range(n):
                tile = image[:, :, i * SIDE:(i + 1) * SIDE, j * SIDE:(j + 1) * SIDE]
                hidden = model.vision_tower(tile, output_hidden_states=True).hidden_states[-2][0, 1:]  # [4, 32]
                grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = hidden.T.reshape(32, 2, 2)
        columns.append(F.avg_pool2d(grid[None], n)[0].flatten(1).T)  # [4, 32]
    want = model.mm_projector(torch.cat(columns, dim=1))[None]
    torch.testing.assert_close(model.get_image_features(pixels), want, rtol=1e-5, atol=1e-5)


# ---- 3. the config switch and the model --------------------------------------------------------------------------


def test_config_sizes():
    config = PolyfocusConfig(fusion="s2")  # CLIP-L/336 by default
    assert config.s2_scale_list() == [336, 672, 1008]  # the reference's default "336,672,1008"
    assert (config.image_input_size, config.mm_hidden_size, config.num_image_tokens) == (1008, 3072, 576)
    assert PolyfocusConfig(fusion="s2", s2_scales=[1008, 336]).s2_scale_list() == [336, 1008]
    plain = PolyfocusConfig()
    assert (plain.image_input_size, plain.mm_hidden_size) == (336, 1024)
    layers = PolyfocusConfig(fusion="s2", mm_vision_select_layer=[-3, -2])
    assert layers.mm_hidden_size == 1024 * 2 * 3


@pytest.mark.parametrize("fields,message", [
    (dict(fusion="s2", s2_scales=[56, 112]), "must be its image_size 28"),
    (dict(fusion="s2", s2_scales=[28, 28]), "distinct positive"),
    (dict(fusion="s2", s2_scales=[]), "distinct positive"),
    (dict(fusion="s2", mm_vision_select_feature="cls_patch"), "must be 'patch'"),
    (dict(s2_scales=[28, 56]), "add fusion='s2'"),
    (dict(fusion="s2", mmfuser_num_heads=8), "fusion is 's2': add fusion='mmfuser'"),
])
def test_bad_s2_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(image_size=SIDE, **fields)


def test_one_scale_is_the_plain_model():
    plain, s2 = plain_and_s2(scales=(28,))
    s2.mm_projector.load_state_dict(plain.mm_projector.state_dict())
    ids = torch.tensor([[1, 9, *[IMG] * 4, 7, 8]] * 2)
    pixels = torch.randn(2, 3, SIDE, SIDE)
    assert torch.equal(s2(input_ids=ids, pixel_values=pixels).logits, plain(input_ids=ids, pixel_values=pixels).logits)


def test_no_parameters_and_text_only_training_works():
    _, s2 = plain_and_s2()
    assert not list(s2.mm_fusion.parameters())
    s2.train()
    ids = torch.tensor([[1, 5, 6, 7]])
    s2(input_ids=ids, labels=ids).loss.backward()
    assert s2.mm_projector[0].weight.grad is not None


def test_save_load_round_trip_and_image_processor(tmp_path):
    from polyfocus.infer.pipeline import load_image_processor

    _, s2 = plain_and_s2()
    s2.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["fusion"], saved["s2_scales"]) == ("s2", [28, 56, 84])
    loaded = load_model(tmp_path).eval()
    pixels = torch.randn(1, 3, 84, 84)
    assert torch.equal(loaded.get_image_features(pixels), s2.get_image_features(pixels))
    assert load_image_processor(tmp_path, loaded.config).image_size == 84  # the largest scale, not the tower's 28


def test_llava_s2_original_checkpoint_loads(tmp_path):
    """LLaVA's / DenseFusion's `--s2 True --s2_scales "28,56,84"` in config.json gives fusion='s2'."""
    _, s2 = plain_and_s2()
    write_clip_tower(s2, tmp_path / "clip")
    ckpt = tmp_path / "llava-s2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(llava_config(s2, tmp_path / "clip", s2=True, s2_scales="28,56,84",
                                                              mm_hidden_size=96)))
    write_shards(llava_state_dict(s2, with_tower=False), ckpt, "safetensors")
    loaded = load_model(ckpt).eval()
    assert (loaded.config.fusion, loaded.config.s2_scale_list()) == ("s2", [28, 56, 84])
    pixels = torch.randn(1, 3, 84, 84)
    assert torch.equal(loaded.get_image_features(pixels), s2.get_image_features(pixels))


def test_export_to_transformers_llava_is_refused():
    from polyfocus.checkpoints import to_llava_hf

    with pytest.raises(ValueError, match="no fusion module"):
        to_llava_hf(plain_and_s2()[1])


# ---- 4. training ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from polyfocus.data.images import ImageProcessor
    from polyfocus.synthworld.scenes import export

    root = tmp_path_factory.mktemp("s2_train")
    write_tiny_backbones(root, SIDE)
    ImageProcessor(image_size=SIDE).save_pretrained(root / "clip")  # the tower's own processor says 28
    export(str(root / "data"), 4, image_size=84, families=["caption"], split="pretrain")
    return root


def test_training_from_backbones_with_s2(backbones, tmp_path):
    """`fusion: s2` in a stage-1 recipe: the model is built with 3x the projector input, the images are prepared at
    the largest scale (not the tower's own 28 px), and the saved checkpoint carries both."""
    from polyfocus.data.images import ImageProcessor
    from polyfocus.train.run import train

    recipe = {"stage": "pretrain", "model_name_or_path": str(backbones / "vicuna"),
              "vision_tower": str(backbones / "clip"), "fusion": "s2", "s2_scales": [28, 56, 84],
              "data_path": [str(backbones / "data" / "pretrain.json")], "output_dir": str(tmp_path / "out"),
              "max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no",
              "dataloader_num_workers": 0, "bf16": False, "plot_loss": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    trainer = train(str(tmp_path / "r.yaml"))
    assert trainer.model.mm_projector[0].in_features == 96
    assert trainer.train_dataset.image_processor.image_size == 84
    assert ImageProcessor.from_pretrained(tmp_path / "out").image_size == 84
    assert load_model(tmp_path / "out").config.s2_scale_list() == [28, 56, 84]
