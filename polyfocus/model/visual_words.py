"""VW-LMM's visual words (spec vw_lmm.md): a head that reads each projected visual token as a distribution over the
LLM's vocabulary, the KL term that trains the LM's prediction before each image position towards that position's
visual word, pseudo image features (PIF), and the per-patch words behind `polyfocus visual-words`.

Switched on by `PolyfocusConfig.visual_words`; the model (modeling.py) calls into this module:

    F   = projector(tower(images))                    [n_images, N, D]   what LLaVA splices into the sequence
    U   = vm_head(F)                                  [n_images, N, V]   visual words, as logits: q = softmax(U)
    PIF: F~ = softmax(U) @ embed_tokens.weight        [n_images, N, D]   spliced instead of F
    loss = CE(text) + vw_loss_weight * mean over image positions i (with a position before them) of
           KL(q_i || p_LM(i-1))     ("forward", the reference's active "stage4" code)
        or KL(p_LM(i-1) || q_i)     ("reverse", its commented-out "stage3" code)

Image positions are found as `input_ids == config.image_token_id`: unlike VW-LMM's splice (one -200 per image,
sequences rebuilt inside the model), polyfocus expands every <image> into N image ids before the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

KL_DIRECTIONS = ("forward", "reverse")


# ---- the head --------------------------------------------------------------------------------------------------


def build_visual_word_head(config) -> nn.Linear | None:
    """The reference's `vm_head`: Linear(d, V, bias=False), next to the LM head; None for a plain model."""
    if not config.visual_words:
        return None
    # The real init (a copy of the LM head) comes later; drawing nn.Linear's default init from a forked generator
    # leaves the rest of the model's random init exactly as a plain model's with the same seed.
    with torch.random.fork_rng(devices=[]):
        return nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)


def init_visual_word_head(head: nn.Linear, lm_head: nn.Module) -> None:
    """Start from the LM head's weights: visual words then begin as what the LM head reads in the visual features.
    Our choice (spec §6); the reference's code leaves the head at the standard random init. `init.copy_` skips a
    head whose weights were loaded from a checkpoint."""
    init.copy_(head.weight, lm_head.weight)


def add_visual_word_head(model) -> None:
    """Turn a plain model into a visual-word one (e.g. a LLaVA-1.5 checkpoint before VW-LMM's stages 3-4)."""
    if model.vm_head is not None:
        return
    lm_head = model.get_output_embeddings()
    if lm_head.weight.numel() == 0:
        raise RuntimeError("the LM head is partitioned (DeepSpeed ZeRO-3): add the visual-word head in a ZeRO-2 or "
                           "single-process run (VW-LMM's stage-3 recipe uses ZeRO-2) and start ZeRO-3 runs from it")
    model.config.visual_words = True
    head = build_visual_word_head(model.config).to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(lm_head.weight)
    model.vm_head = head


# ---- pseudo image features -------------------------------------------------------------------------------------


def pseudo_image_features(visual_words: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """Each patch as the expectation of the token embeddings under its visual word (spec §7).

    visual_words [..., V] logits, embedding_weight [V, D] (the LLM's input embeddings) → [..., D]
    """
    probs = visual_words.float().softmax(dim=-1)  # fp32 softmax over the whole vocabulary
    return probs.to(embedding_weight.dtype) @ embedding_weight


# ---- the loss --------------------------------------------------------------------------------------------------


@dataclass
class CausalLMOutputWithVisualWords(CausalLMOutputWithPast):
    """`loss` = lm_loss + vw_loss_weight * vw_loss."""

    lm_loss: torch.FloatTensor | None = None  # the text cross-entropy, as the LM computed it
    vw_loss: torch.FloatTensor | None = None  # the visual-word KL, unweighted


def visual_word_loss(lm_logits: torch.Tensor, is_image: torch.Tensor, visual_words: torch.Tensor,
                     direction: str = "forward", detach_target: bool = False,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """KL between the LM's prediction at position t and the visual word of the image position t+1, averaged over
    those positions (PyTorch's `reduction="batchmean"`, as the reference). Zero, not NaN, when there are none.

    lm_logits:    [B, L, V] the LM's output logits
    is_image:     [B, L]    True at image positions
    visual_words: [n, V]    logits of the image positions, in the row-major order of is_image's True entries
                            (the order in which the features were scattered into the sequence)
    direction:    "forward" KL(q_visual_word || p_LM); "reverse" KL(p_LM || q_visual_word)
    detach_target: stop the gradient through the KL's reference distribution (q for forward, p_LM for reverse).
                  The reference detaches nothing.
    position_ids: [B, L] or [1, L], when the sequence's positions are not simply its indices. An image at position 0
                  has no predictor: in a packed row (polyfocus.data.packing: positions restart at every sample) the
                  token before it is the previous sample's last one, which cannot see this sample.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"vw_kl_direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    positions = is_image.nonzero()  # [n, 2] (row, index), row-major
    if positions.shape[0] != visual_words.shape[0]:
        raise ValueError(f"{positions.shape[0]} image positions but {visual_words.shape[0]} visual words")
    if position_ids is None:
        has_predictor = positions[:, 1] > 0  # an image at index 0 has no position before it
    else:  # the first position of a sample, wherever it sits in the row
        has_predictor = position_ids.expand_as(is_image)[is_image] > 0  # row-major, as nonzero()
    row, index = positions[has_predictor].unbind(dim=-1)
    lm_logp = F.log_softmax(lm_logits[row, index - 1].float(), dim=-1)  # [M, V] prediction made at t
    vw_logp = F.log_softmax(visual_words[has_predictor].float(), dim=-1)  # [M, V] visual word of t+1
    if direction == "forward":
        reference, other = vw_logp, lm_logp
    else:
        reference, other = lm_logp, vw_logp
    if detach_target:
        reference = reference.detach()
    # kl_div(input=log p, target=log q, log_target=True) = sum q * (log q - log p) = KL(q || p).
    total = F.kl_div(other, reference, reduction="sum", log_target=True)
    return total / max(row.shape[0], 1)  # M = 0: a zero that keeps the head in the graph


# ---- per-patch words: the picture of the README (polyfocus visual-words) ----------------------------------------


def grid_side(config) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


@torch.no_grad()
def patch_visual_words(model, pixel_values: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visual words of every patch: (probs, ids), each [n_images, side, side, k], row-major patch grid.

    A CLS token (mm_vision_select_feature "cls_patch") has no place on the grid and is left out.
    """
    if model.vm_head is None:
        raise ValueError("this model has no visual-word head (config.visual_words is false)")
    features = model.get_image_features(pixel_values.to(model.device))  # [n, N, D]
    side = grid_side(model.config)
    features = features[:, -side * side:]  # drop a leading CLS
    probs = model.vm_head(features).float().softmax(dim=-1)  # [n, side*side, V]
    top = probs.topk(k, dim=-1)
    n = features.shape[0]
    return top.values.reshape(n, side, side, k).cpu(), top.indices.reshape(n, side, side, k).cpu()


def patch_boxes(image_size: tuple[int, int], side: int, image_processor) -> list[list[tuple[float, ...]]]:
    """Box (x1, y1, x2, y2) of every grid cell in the pixels of the original image, [row][col], following the
    processor's geometry (pad to square / resize / shortest edge + centre crop); clipped to the image."""
    width, height = image_size
    s = image_processor.image_size
    aspect = image_processor.aspect_ratio
    if aspect == "pad":  # the square of side max(w, h), image pasted at the centre
        big = max(width, height)
        scale_x = scale_y = big / s
        off_x, off_y = -((big - width) // 2), -((big - height) // 2)
    elif aspect == "resize":
        scale_x, scale_y, off_x, off_y = width / s, height / s, 0, 0
    else:  # "square": as ImageProcessor.resize_and_crop
        new_w, new_h = (s, int(s * height / width)) if width <= height else (int(s * width / height), s)
        scale_x, scale_y = width / new_w, height / new_h
        off_x, off_y = (new_w - s) // 2 * scale_x, (new_h - s) // 2 * scale_y
    cell = s / side

    def clip(v, hi):
        return min(max(v, 0.0), float(hi))

    return [[(clip(c * cell * scale_x + off_x, width), clip(r * cell * scale_y + off_y, height),
              clip((c + 1) * cell * scale_x + off_x, width), clip((r + 1) * cell * scale_y + off_y, height))
             for c in range(side)] for r in range(side)]


def token_text(tokenizer, token_id: int) -> str:
    """A vocabulary entry as text ("Ġred" / "▁red" → " red")."""
    return tokenizer.decode([int(token_id)])


def visual_word_map(model, tokenizer, image_processor, image: Image.Image, k: int = 5) -> dict:
    """Everything the picture shows, as JSON-ready data: per patch its box in the image and its top-k words."""
    pixel_values = image_processor([image])
    probs, ids = patch_visual_words(model, pixel_values, k)
    probs, ids = probs[0], ids[0]  # [side, side, k]
    side = ids.shape[0]
    boxes = patch_boxes(image.size, side, image_processor)
    patches = [{"row": r, "col": c, "box": [round(v, 2) for v in boxes[r][c]],
                "top": [{"id": int(i), "token": token_text(tokenizer, i), "prob": round(float(p), 6)}
                        for i, p in zip(ids[r, c], probs[r, c])]}
               for r in range(side) for c in range(side)]
    return {
        "image_size": list(image.size),
        "grid": [side, side],
        "topk": k,
        "argmax_ids": ids[..., 0].tolist(),
        "argmax": [[token_text(tokenizer, i).strip() for i in row] for row in ids[..., 0].tolist()],
        "patches": patches,
    }


def draw_visual_words(image: Image.Image, word_map: dict) -> Image.Image:
    """The README figure of VW-LMM: the image with its patch grid, each cell labelled with its argmax word."""
    canvas = image.convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for patch in word_map["patches"]:
        x1, y1, x2, y2 = patch["box"]
        if x2 <= x1 or y2 <= y1:  # a cell on the padding, outside the image
            continue
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255, 110))
        word = patch["top"][0]["token"].strip()
        if not word:  # whitespace and newline tokens: an empty cell, as in the reference figure
            continue
        size = max(6, int(min(y2 - y1, 1.6 * (x2 - x1) / max(len(word), 1)) * 0.6))
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), word, font=_font(size), anchor="mm", fill=(255, 255, 255, 255),
                  stroke_width=1, stroke_fill=(0, 0, 0, 255))
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to download
