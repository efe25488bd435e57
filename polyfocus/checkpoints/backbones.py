"""A new polyfocus model from a pretrained LLM directory and a pretrained vision-tower directory (LLaVA's stage-1
starting point: Vicuna + CLIP-L/336, projector freshly initialised)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, ConvNextConfig

from polyfocus.checkpoints.common import vision_config_of, vision_state
from polyfocus.checkpoints.convnext import load_hires_tower
from polyfocus.config import PolyfocusConfig
from polyfocus.model.fusion import build_fusion
from polyfocus.model.hires import build_hires_tower
from polyfocus.model.modeling import PolyfocusForConditionalGeneration
from polyfocus.model.projector import build_projector
from polyfocus.model.vision import build_vision_tower
from polyfocus.model.visual_words import build_visual_word_head, init_visual_word_head


def from_backbones(llm_path: str | Path, tower_path: str | Path, image_token_id: int, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None, hires_tower: str | Path | None = None,
                   **config_fields) -> PolyfocusForConditionalGeneration:
    """config_fields: any PolyfocusConfig field (mm_vision_select_layer, mm_projector_type, fusion, ...).
    hires_tower: MG-LLaVA's high-resolution ConvNeXt (fusion="convgate" / object_tokens): a transformers ConvNeXt
    directory or open_clip CLIP-ConvNeXt weights; None: a fresh one of `hires_config`."""
    for path, what in ((llm_path, "LLM"), (tower_path, "vision tower")):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; the {what} must be a local model directory")
    if hires_tower is not None and not (config_fields.get("fusion") == "convgate" or config_fields.get("object_tokens")):
        raise ValueError(f"hires_tower {hires_tower} given, but nothing uses it: add fusion='convgate' or "
                         "object_tokens")
    if hires_tower is not None:  # MG-LLaVA's ConvNeXt; its own config (or its weights' shapes) is the truth
        given = config_fields.get("hires_config")
        hires = load_hires_tower(hires_tower, ConvNextConfig(**given) if given else None)
        config_fields["hires_config"] = hires.config.to_dict()
    config = PolyfocusConfig(
        vision_config=vision_config_of(Path(tower_path)).to_dict(),
        text_config=AutoConfig.from_pretrained(llm_path).to_dict(),
        image_token_id=image_token_id,
        mm_vision_tower=str(tower_path),
        **config_fields,
    )
    # Build on the meta device, then put the pretrained parts in: no random init of billions of weights.
    with torch.device("meta"):
        model = PolyfocusForConditionalGeneration(config)
    model.language_model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype,
                                                                attn_implementation=attn_implementation)
    # The tower and projector are rebuilt for real (to_empty would leave non-persistent buffers such as CLIP's
    # position_ids uninitialised).
    model.vision_tower = build_vision_tower(config)
    model.vision_tower.load_state_dict(vision_state(AutoModel.from_pretrained(tower_path)), strict=True)
    model.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.text_config.hidden_size)
    model.mm_projector.apply(model._init_weights)
    model.mm_fusion = build_fusion(config)  # MMFuser & co. initialise themselves (an identity at first); None: plain
    if config.uses_hires:  # MG-LLaVA's ConvNeXt, and the object tokens' projector
        model.hires_tower = hires if hires_tower is not None else build_hires_tower(config)
    if config.object_tokens:
        model.mm_object_projector = build_projector(config.mm_projector_type, config.object_feature_size,
                                                    config.text_config.hidden_size)
        model.mm_object_projector.apply(model._init_weights)
    if config.visual_words:  # VW-LMM's head, rebuilt off the meta device as a copy of the loaded LM head
        model.vm_head = build_visual_word_head(config)
        init_visual_word_head(model.vm_head, model.get_output_embeddings())
    if dtype is not None:
        model.to(dtype)
    model.config.text_config = model.language_model.config
    return model
