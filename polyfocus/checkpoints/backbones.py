"""A new polyfocus model from a pretrained LLM directory and a pretrained vision-tower directory (LLaVA's stage-1
starting point: Vicuna + CLIP-L/336, projector freshly initialised)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, ConvNextConfig

from polyfocus.checkpoints.common import quiet_loading_report, vision_config_of, vision_state
from polyfocus.checkpoints.convnext import load_hires_tower
from polyfocus.config import PolyfocusConfig, fusion_names
from polyfocus.model.modeling import PolyfocusForConditionalGeneration


def from_backbones(llm_path: str | Path, tower_path: str | Path, image_token_id: int, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None, hires_tower: str | Path | None = None,
                   **config_fields) -> PolyfocusForConditionalGeneration:
    """config_fields: any PolyfocusConfig field (mm_vision_select_layer, mm_projector_type, fusion, ...).
    hires_tower: MG-LLaVA's high-resolution ConvNeXt (fusion="convgate" / object_tokens): a transformers ConvNeXt
    directory or open_clip CLIP-ConvNeXt weights; None: a fresh one of `hires_config`."""
    for path, what in ((llm_path, "LLM"), (tower_path, "vision tower")):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; the {what} must be a local model directory")
    uses_hires = "convgate" in fusion_names(config_fields.get("fusion")) or config_fields.get("object_tokens")
    if hires_tower is not None and not uses_hires:
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
    # transformers' own loading: the model is built on the meta device, the pretrained parts are loaded into it, and
    # every other module (projector, fusion, object projector, visual-word head) gets its own init, as weights
    # missing from a checkpoint do: no random init of billions of weights, and one place that builds the model.
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    state = {f"language_model.{k}": v for k, v in llm.state_dict().items()}
    state.update({f"vision_tower.{k}": v for k, v in vision_state(AutoModel.from_pretrained(tower_path)).items()})
    if hires_tower is not None:
        state.update({f"hires_tower.{k}": v for k, v in hires.state_dict().items()})
    with quiet_loading_report():  # its MISSING keys are the new modules, initialised on purpose
        model = PolyfocusForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                                  attn_implementation=attn_implementation)
    model.config.text_config = model.language_model.config
    return model
