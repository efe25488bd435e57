"""MG-LLaVA checkpoints (PhoenixZ810/MG-LLaVA, built on xtuner): its state dict (`iter_*.pth`, or a DeepSpeed
directory of that name) or its converted layout, with its three backbones (LLM, CLIP, ConvNeXt).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from polyfocus.checkpoints.backbones import from_backbones
from polyfocus.checkpoints.common import renamed
from polyfocus.config import LLAVA_IMAGE_TOKEN_INDEX
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

# MG-LLaVA (PhoenixZ810/MG-LLaVA, built on xtuner) keeps the LLM as `llm`, the MLP as xtuner's ProjectorModel
# (`projector.model.{0,2}`), the object tokens' MLP as `bbox_projector.model.*` and the Conv-Gate as `fuse_module.*`
# (names as ours); CLIP and the ConvNeXt are frozen and not saved (they load from their own files).
MG_LLAVA_TO_POLYFOCUS = {
    r"^llm\.": "language_model.",
    r"^projector\.model\.": "mm_projector.",
    r"^bbox_projector\.model\.": "mm_object_projector.",
    r"^fuse_module\.": "mm_fusion.",
    r"^visual_encoder\.(vision_model\.)?": "vision_tower.",
}


MG_LLAVA_PARTS = ("projector", "bbox_projector", "fuse_module")


def mg_llava_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Path | None]:
    """(MG-LLaVA's state dict under its own names, the LLM directory or None).

    path: the state dict it trains and releases (`iter_*.pth`: xtuner's mmengine checkpoint, its `state_dict`; with
    DeepSpeed, a directory of that name holding DeepSpeed's checkpoint), or its converted layout: xtuner's
    `pth_to_hf` output (the finetuned LLM + tokenizer at the top, the MLP in `projector/`) plus `bbox_projector/` and
    `fuse_module/` saved the same way, each holding one weight file."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        return _deepspeed_fp32_state(path), None
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the message says what to do
            raise ValueError(f"{path}: not loadable with weights_only=True ({type(e).__name__}); save its state dict "
                             "alone first: torch.save(torch.load(f, weights_only=False)['state_dict'], out)") from e
        return state.get("state_dict", state.get("module", state)), None
    state = {}
    for part in MG_LLAVA_PARTS:
        folder = path / part
        if folder.is_dir():
            state.update({f"{part}.{key}": value for key, value in _weight_file(folder).items()})
    return state, path


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_model_states.pt"))


def _deepspeed_fp32_state(path: Path) -> dict[str, torch.Tensor]:
    """xtuner under DeepSpeed saves `iter_N.pth/` as a DeepSpeed checkpoint whose tag is the directory's name; like
    xtuner's own loader, DeepSpeed's zero_to_fp32 rebuilds the fp32 weights (its pickles need deepspeed anyway)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ValueError(f"{path}: a DeepSpeed checkpoint; reading it needs deepspeed (pip install deepspeed), or "
                         f"run the zero_to_fp32.py DeepSpeed saved in {path.parent} and pass the file it writes") from None
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), path.name)


def _weight_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            file = folder / name
            return load_file(file) if name.endswith(".safetensors") else torch.load(file, weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_mg_llava(path: str | Path, model_base: str | Path | None = None, vision_tower: str | Path | None = None,
                  hires_tower: str | Path | None = None, **from_pretrained_kwargs) -> PolyfocusForConditionalGeneration:
    """An MG-LLaVA checkpoint (`mg_llava_state`) with its three backbones: the LLM (the converted layout's top
    directory, else `model_base`: the state dict's `llm.*` weights, if any, go over it), CLIP (`vision_tower`) and
    the ConvNeXt (`hires_tower`: open_clip's CLIP-ConvNeXt-L-d-320 weights or a transformers ConvNeXt). Its settings
    are MG-LLaVA's: CLIP layer -2 without CLS, padded images, Conv-Gate, object tokens; LLaVA's image id -200."""

    state, llm_dir = mg_llava_state(path)
    llm_dir = llm_dir or model_base
    missing = [name for name, value in (("model_base (the LLM)", llm_dir), ("vision_tower (CLIP)", vision_tower),
                                        ("hires_tower (the ConvNeXt)", hires_tower)) if value is None]
    if missing:
        raise ValueError(f"{path}: an MG-LLaVA checkpoint needs its backbones: give {', '.join(missing)}")
    state = {renamed(key, MG_LLAVA_TO_POLYFOCUS): value for key, value in state.items()}
    depth = sum(1 for key in state if re.fullmatch(r"mm_projector\.\d+\.weight", key))
    if depth == 0:
        raise ValueError(f"{path}: no projector weights (projector.model.*): is this an MG-LLaVA checkpoint?")
    fields = {"mm_vision_select_layer": -2, "mm_projector_type": f"mlp{depth}x_gelu" if depth > 1 else "linear",
              "image_aspect_ratio": "pad", "fusion": "convgate" if any(k.startswith("mm_fusion.") for k in state)
              else None, "object_tokens": any(k.startswith("mm_object_projector.") for k in state)}
    model = from_backbones(llm_dir, vision_tower, LLAVA_IMAGE_TOKEN_INDEX, hires_tower=hires_tower,
                           dtype=from_pretrained_kwargs.get("dtype"),
                           attn_implementation=from_pretrained_kwargs.get("attn_implementation"), **fields)
    result = model.load_state_dict(state, strict=False)
    ours = ("mm_projector.", "mm_fusion.", "mm_object_projector.")
    not_loaded = [k for k in result.missing_keys if k.startswith(ours)]
    if result.unexpected_keys or not_loaded:
        raise ValueError(f"{path}: does not match MG-LLaVA's layout: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {not_loaded[:5]}")
    model.name_or_path = str(path)
    return model

