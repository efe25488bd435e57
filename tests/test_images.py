import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from polyfocus.data.images import CONFIG_NAME, ImageLoadError, ImageProcessor, expand2square, load_image

BG = (122, 116, 104)
# Odd sizes, extreme aspect ratios, already-square, smaller and larger than 336.
SIZES = [(598, 453), (31, 601), (337, 336), (96, 123), (700, 20), (336, 336), (17, 17)]


def random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_pixels(processor, img):
    return torch.from_numpy(np.stack(processor(img, return_tensors=None)["pixel_values"]))


def test_background_is_truncated_clip_mean():
    assert ImageProcessor().background_rgb == BG


def test_expand2square_wide_image_hand_computed():
    # 3x1 image -> 3x3, offset (3-1)//2 = 1 row of background on top, 1 below.
    img = Image.new("RGB", (3, 1))
    img.putdata([(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    out = np.asarray(expand2square(img, BG))
    assert out.shape == (3, 3, 3)
    assert (out[0] == BG).all() and (out[2] == BG).all()
    assert out[1].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_expand2square_tall_image_hand_computed():
    # 2x5 image -> 5x5, offset (5-2)//2 = 1: background column 0 and columns 3-4.
    img = Image.new("RGB", (2, 5), (200, 0, 0))
    out = np.asarray(expand2square(img, BG))
    assert out.shape == (5, 5, 3)
    assert (out[:, 0] == BG).all() and (out[:, 3:] == BG).all()
    assert (out[:, 1:3] == (200, 0, 0)).all()


def test_expand2square_square_is_untouched():
    img = random_image(4, 4)
    assert expand2square(img, BG) is img


@pytest.mark.parametrize("w,h", SIZES)
def test_square_mode_matches_hf_clip(w, h):
    img = random_image(w, h, seed=w * h)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = ImageProcessor(aspect_ratio="square")([img])
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == torch.float32
    assert (ours - hf_pixels(hf, img)).abs().max() <= 1e-6  # bit-identical in practice: same dtypes, same PIL resize


@pytest.mark.parametrize("w,h", SIZES)
def test_pad_mode_matches_hf_clip_on_expand2square(w, h):
    img = random_image(w, h, seed=w + h)
    ours = ImageProcessor(aspect_ratio="pad")([img])
    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert (ours - hf_pixels(clip, expand2square(img, BG))).abs().max() <= 1e-6
    llava = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    assert (ours - hf_pixels(llava, img)).abs().max() <= 1e-6


def test_pad_mode_keeps_the_borders_that_square_mode_crops():
    # A wide image whose left/right thirds are white: square mode crops them away, pad mode keeps them.
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 100))
    white = (1 - torch.tensor(ImageProcessor().image_mean)) / torch.tensor(ImageProcessor().image_std)
    sq = ImageProcessor(image_size=30, aspect_ratio="square")([img])[0]
    pad = ImageProcessor(image_size=30, aspect_ratio="pad")([img])[0]
    assert not torch.allclose(sq[:, 15, 0], white)
    assert torch.allclose(pad[:, 15, 0], white, atol=1e-5)
    # pad rows above the image are the background colour
    bg = (torch.tensor(BG) / 255 - torch.tensor(ImageProcessor().image_mean)) / torch.tensor(ImageProcessor().image_std)
    assert torch.allclose(pad[:, 0, 15], bg, atol=1e-5)


def test_resize_mode_matches_hf_plain_resize():
    img = random_image(90, 50)
    hf = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    ours = ImageProcessor(image_size=64, aspect_ratio="resize")([img])
    assert (ours - hf_pixels(hf, img)).abs().max() <= 1e-6


def test_batch_shape_and_mode_conversion():
    imgs = [random_image(40, 30).convert("L"), random_image(30, 40).convert("RGBA"), random_image(20, 20)]
    out = ImageProcessor(image_size=32)(imgs)
    assert out.shape == (3, 3, 32, 32)
    assert ImageProcessor(image_size=32)([]).shape == (0, 3, 32, 32)


def test_rejects_unknown_aspect_ratio():
    with pytest.raises(ValueError, match="aspect_ratio"):
        ImageProcessor(aspect_ratio="anyres")


@pytest.mark.parametrize("aspect_ratio", ["pad", "square", "resize"])
def test_save_load_round_trip_and_hf_reads_ours(tmp_path, aspect_ratio):
    proc = ImageProcessor(image_size=32, aspect_ratio=aspect_ratio)
    proc.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path) == proc
    assert ImageProcessor.from_pretrained(tmp_path / CONFIG_NAME) == proc
    # transformers' own processor, configured by our file, computes the same pixels.
    img = random_image(50, 90)
    hf = LlavaImageProcessorPil.from_pretrained(tmp_path)
    assert (proc([img]) - hf_pixels(hf, img)).abs().max() <= 1e-6


def test_reads_llava_hf_and_old_clip_and_siglip_configs(tmp_path):
    llava_hf = {  # llava-hf/llava-1.5-7b-hf
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
    }
    old_clip = {  # openai/clip-vit-large-patch14-336 (CLIPFeatureExtractor era: int sizes)
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
    }
    siglip = {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384},
    }
    for name, cfg in [("llava_hf", llava_hf), ("old_clip", old_clip), ("siglip", siglip)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text(json.dumps(cfg))
    assert ImageProcessor.from_pretrained(tmp_path / "llava_hf") == ImageProcessor(aspect_ratio="square")
    assert ImageProcessor.from_pretrained(tmp_path / "old_clip") == ImageProcessor(aspect_ratio="square")
    # An original LLaVA checkpoint keeps image_aspect_ratio in its model config: pass it as an override.
    assert ImageProcessor.from_pretrained(tmp_path / "old_clip", aspect_ratio="pad") == ImageProcessor()
    sig = ImageProcessor.from_pretrained(tmp_path / "siglip")
    assert (sig.image_size, sig.aspect_ratio, sig.resample, sig.image_mean) == (384, "resize", 2, (0.5, 0.5, 0.5))
    assert sig.background_rgb == (127, 127, 127)


def test_unsupported_config_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"size": {"shortest_edge": 256}, "crop_size": 224}))
    with pytest.raises(ValueError, match=CONFIG_NAME):
        ImageProcessor.from_pretrained(tmp_path)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "a.png"
    random_image(7, 5).convert("RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="not found.*missing.jpg"):
        load_image(missing)

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        load_image(garbage)

    truncated = tmp_path / "truncated.png"
    random_image(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)

    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(ImageLoadError, match="too large.*big.png"):
        load_image(big, max_pixels=100 * 99)
