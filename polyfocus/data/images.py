"""Image loading and CLIP-style preprocessing (LLaVA-1.5 spec §1.3), in PIL + torch only.

`ImageProcessor` reproduces transformers' `CLIPImageProcessor` (PIL backend) bit for bit, plus LLaVA's
pad-to-square:

    aspect_ratio="square"  resize shortest edge to S (bicubic), centre-crop S×S  (LLaVA stage 1, CLIP default)
    aspect_ratio="pad"     expand2square on the mean colour, then resize to S×S  (LLaVA-1.5 stage 2 and eval)
    aspect_ratio="resize"  plain resize to S×S, no crop                          (SigLIP-style processors)

then rescale by 1/255 and normalise with mean/std. Its `preprocessor_config.json` uses HF's field names, so it
reads a CLIP / llava-hf / SigLIP checkpoint's file and HF's CLIP/Llava image processors read ours.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from polyfocus.data.files import read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's (and most ImageNet-trained towers')
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
CONFIG_NAME = "preprocessor_config.json"
ASPECT_RATIOS = ("pad", "square", "resize")

# Refuse images above PIL's own warning threshold (~89.5 Mpx, a 256 MiB RGB buffer per decoded image, per
# dataloader worker): in a training set such a file is a mistake or a decompression bomb, not a photo.
MAX_IMAGE_PIXELS = 89_478_485


class ImageLoadError(ValueError):
    """An image file is missing, unreadable, corrupt, truncated or too large. The message names the path."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image as RGB. Raises ImageLoadError naming `path` on any failure.

    `.load()` runs inside the try so truncated files fail here rather than later inside a transform.
    Alpha is dropped by `convert("RGB")` as in LLaVA (HF's processor composites onto white instead).
    """
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; PIL would only warn between 1x and 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(
                        f"image too large: {path} is {img.width}x{img.height} pixels (limit {max_pixels})"
                    )
                img.load()
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError), truncation as OSError and some
        # malformed headers as SyntaxError/ValueError.
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def check_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The cheap check of an image file: its header parses as an image of a sane size (no pixel is decoded).
    Returns (width, height); raises ImageLoadError naming `path`. Catches missing, empty, truncated-header,
    non-image and over-large files; a file whose pixel data is cut short passes (only `load_image` finds that)."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageLoadError(f"image size out of range: {path} is {width}x{height} pixels (limit {max_pixels})")
    return width, height


def expand2square(img: Image.Image, background_rgb: tuple[int, ...]) -> Image.Image:
    """Paste `img` centred on a max(w, h) square of `background_rgb`; the offset on the short axis is (max-min)//2."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), tuple(background_rgb))
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass
class ImageProcessor:
    image_size: int = 336
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.BICUBIC  # PIL filter id, as in HF's `resample`: 3 = bicubic
    rescale_factor: float = 1 / 255
    # "pad" is what every released LLaVA-1.5 model was finetuned and evaluated with; stage-1 recipes pass "square".
    aspect_ratio: str = "pad"

    def __post_init__(self):
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"aspect_ratio must be one of {ASPECT_RATIOS}, got {self.aspect_ratio!r}")
        self.image_mean = tuple(float(m) for m in self.image_mean)
        self.image_std = tuple(float(s) for s in self.image_std)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """LLaVA's pad colour: the mean in 0..255, truncated (CLIP: (122, 116, 104))."""
        return tuple(int(m * 255) for m in self.image_mean)

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: an RGB image -> an S×S RGB image, per `aspect_ratio`."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        s = self.image_size
        if self.aspect_ratio == "pad":
            img = expand2square(img, self.background_rgb)
        if self.aspect_ratio in ("pad", "resize"):
            return img.resize((s, s), resample=self.resample)
        # "square": shortest edge -> S with the long edge truncated as in HF's get_resize_output_image_size,
        # then a centre crop with the (size - S)//2 offsets of HF's center_crop.
        width, height = img.size
        if width <= height:
            new_w, new_h = s, int(s * height / width)
        else:
            new_w, new_h = int(s * width / height), s
        img = img.resize((new_w, new_h), resample=self.resample)
        left, top = (new_w - s) // 2, (new_h - s) // 2
        return img.crop((left, top, left + s, top + s))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """S×S RGB image -> normalised float32 [3, S, S]. Same dtypes as HF (rescale in float64, normalise in
        float32), so the result is bit-identical to CLIPImageProcessor's."""
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        x = (x.double() * self.rescale_factor).float()
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """Images (any size/mode) -> pixel_values float32 [N, 3, S, S]."""
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.to_tensor(self.resize_and_crop(img)) for img in images])

    # ---- HF-compatible preprocessor_config.json ------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        s = self.image_size
        square = self.aspect_ratio == "square"
        return {
            # Llava's processor is the HF class that implements do_pad; CLIP's is understood by older tools.
            "image_processor_type": "LlavaImageProcessor" if self.aspect_ratio == "pad" else "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_pad": self.aspect_ratio == "pad",
            "do_resize": True,
            "size": {"shortest_edge": s} if square else {"height": s, "width": s},
            "resample": int(self.resample),
            "do_center_crop": square,
            "crop_size": {"height": s, "width": s},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict, **overrides) -> "ImageProcessor":
        """Read HF image-processor fields (CLIP, llava-hf, SigLIP; old int `size`/`crop_size` too).

        `overrides` replace fields afterwards, e.g. `aspect_ratio=config.image_aspect_ratio` for an original LLaVA
        checkpoint, whose vision tower's file is plain CLIP and whose padding lives in the model config.
        """
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if cfg.get(flag, True) is False:
                raise ValueError(f"unsupported image processor config: {flag}=false")
        size, crop = cfg.get("size", 224), cfg.get("crop_size")
        if isinstance(size, int):  # old CLIPFeatureExtractor files: an int means the shortest edge
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if crop is not None and crop["height"] != crop["width"]:
            raise ValueError(f"unsupported image processor config: non-square crop_size {crop}")
        do_crop = cfg.get("do_center_crop", crop is not None) and crop is not None

        if "shortest_edge" in size:
            # After a shortest-edge resize only a centre crop makes the output square.
            if not do_crop or crop["height"] != size["shortest_edge"]:
                raise ValueError(f"unsupported image processor config: size={size} with crop_size={crop}")
            image_size, aspect = size["shortest_edge"], "square"
        elif "height" in size and size["height"] == size["width"]:
            if do_crop and crop["height"] != size["height"]:
                raise ValueError(f"unsupported image processor config: size={size} with crop_size={crop}")
            image_size, aspect = size["height"], "resize"
        else:
            raise ValueError(f"unsupported image processor config: size={size}")
        if cfg.get("do_pad", False):
            aspect = "pad"

        proc = cls(
            image_size=image_size,
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
            resample=int(cfg.get("resample", Image.BICUBIC)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            aspect_ratio=aspect,
        )
        return replace(proc, **overrides) if overrides else proc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "ImageProcessor":
        """`path`: a checkpoint directory holding preprocessor_config.json, or that file itself."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        cfg = read_json(file)
        try:
            return cls.from_hf_dict(cfg, **overrides)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        file = os.path.join(save_directory, CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")
        return file
