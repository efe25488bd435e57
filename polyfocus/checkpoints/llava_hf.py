"""transformers' llava-hf layout (`LlavaForConditionalGeneration`): loading it (both key layouts) and exporting to it
(`polyfocus convert --to hf`), with its processor files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from polyfocus.checkpoints.common import has_tokenizer, load_renamed
from polyfocus.config import TOWERS_WITH_CLS, PolyfocusConfig
from polyfocus.data.images import ImageProcessor
from polyfocus.model.modeling import PolyfocusForConditionalGeneration
from polyfocus.model.projector import fold_standardizer

# llava-hf keys → ours: the in-memory layout of transformers ≥ 4.52 (model.*) and the on-disk one that
# older checkpoints have (and that transformers 5 still writes: language_model.model.*, vision_tower.*).
HF_TO_POLYFOCUS = {
    r"^model\.language_model\.": "language_model.model.",
    r"^(model\.)?vision_tower\.(vision_model\.)?": "vision_tower.",  # transformers 5 dropped "vision_model."
    r"^(model\.)?multi_modal_projector\.linear_1\.": "mm_projector.0.",
    r"^(model\.)?multi_modal_projector\.linear_2\.": "mm_projector.2.",
    r"^lm_head\.": "language_model.lm_head.",
}


POLYFOCUS_TO_HF = {
    "language_model.model.": "model.language_model.",
    "vision_tower.": "model.vision_tower.",
    "mm_projector.0.": "model.multi_modal_projector.linear_1.",
    "mm_projector.2.": "model.multi_modal_projector.linear_2.",
    "language_model.lm_head.": "lm_head.",
}


def hf_image_processor_fields(path: str | Path) -> dict | None:
    """The image processor's fields: preprocessor_config.json, or (transformers 5) processor_config.json."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = Path(path) / name
        if file.is_file():
            fields = json.loads(file.read_text())
            fields = fields.get(key) if key else fields
            if fields:
                return fields
    return None


def load_llava_hf(path: str | Path, **from_pretrained_kwargs) -> PolyfocusForConditionalGeneration:
    """A llava-hf directory (either key layout) as a polyfocus model."""
    config = config_from_llava_hf(LlavaConfig.from_pretrained(path))
    image_fields = hf_image_processor_fields(path)
    if image_fields:  # pad vs crop lives in the image processor's file, not in the model config
        config.image_aspect_ratio = ImageProcessor.from_hf_dict(image_fields).aspect_ratio
    return load_renamed(path, config, HF_TO_POLYFOCUS, **from_pretrained_kwargs)


def config_from_llava_hf(config: LlavaConfig) -> PolyfocusConfig:
    has_cls = config.vision_config.model_type in TOWERS_WITH_CLS
    full = config.vision_feature_select_strategy == "full"
    if not config.multimodal_projector_bias or config.projector_hidden_act != "gelu":
        raise ValueError("only LLaVA's projector (bias, exact GELU) converts; got "
                         f"bias={config.multimodal_projector_bias}, act={config.projector_hidden_act}")
    if not has_cls and not full:
        raise ValueError(f"{config.vision_config.model_type} has no CLS token, yet the strategy 'default' drops one")
    return PolyfocusConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        mm_vision_select_layer=config.vision_feature_layer,
        mm_vision_select_feature="cls_patch" if full and has_cls else "patch",
        mm_projector_type="mlp2x_gelu",
    )


def llava_hf_config(config: PolyfocusConfig) -> LlavaConfig:
    if config.fusion is not None:  # never silently drop weights
        raise ValueError(f"transformers' Llava has no fusion module; a model with fusion={config.fusion!r} stays in "
                         "the polyfocus format")
    if config.object_tokens:
        raise ValueError("transformers' Llava has no object tokens (MG-LLaVA); the model stays in the polyfocus format")
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(f"transformers' Llava has an mlp2x_gelu projector only; this model has {config.mm_projector_type}")
    drops_cls = config.vision_has_cls and config.mm_vision_select_feature == "patch"
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy="default" if drops_cls else "full",
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def to_llava_hf(model: PolyfocusForConditionalGeneration) -> LlavaForConditionalGeneration:
    """The same weights in transformers' `LlavaForConditionalGeneration` (current key layout)."""
    _refuse_visual_words(model)
    if not 0 <= model.config.image_token_id < model.config.text_config.vocab_size:
        raise ValueError(f"image_token_id {model.config.image_token_id} is not in the vocabulary; transformers' "
                         "Llava looks it up: add an <image> token first (add_image_token)")
    with torch.device("meta"):  # no random init, no second copy: the weights are assigned below
        hf = LlavaForConditionalGeneration(llava_hf_config(model.config))
    state = model.state_dict()
    if model.mm_feature_norm is not None:  # the standardisation folded into the projector's first Linear
        folded = fold_standardizer(model.mm_projector[0], model.mm_feature_norm)
        state = {k: v for k, v in state.items() if not k.startswith("mm_feature_norm.")}
        state["mm_projector.0.weight"], state["mm_projector.0.bias"] = folded.weight, folded.bias
    hf.load_state_dict({_hf_key(k): v for k, v in state.items()}, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary inv_freq, ...) are not in the state dict
        if name.startswith("mm_feature_norm."):
            continue
        module_name, _, attr = _hf_key(name).rpartition(".")
        setattr(hf.get_submodule(module_name), attr, buffer)
    hf.tie_weights()
    return hf.train(model.training)


def _refuse_visual_words(model) -> None:
    if model.vm_head is not None:  # never silently drop weights
        raise ValueError("a visual-word (VW-LMM) model has no transformers Llava equivalent: its vm_head has no place "
                         "there; keep it in the polyfocus format")


def _hf_key(key: str) -> str:
    prefix = next(p for p in POLYFOCUS_TO_HF if key.startswith(p))
    return POLYFOCUS_TO_HF[prefix] + key[len(prefix):]


def add_image_token(model: PolyfocusForConditionalGeneration, tokenizer) -> None:
    """Give a model whose image token is a sentinel (LLaVA's -200) a real `<image>` (and `<pad>`) token, as
    transformers' LLaVA conversion does: new rows drawn around the mean embedding, vocab padded to ×64."""
    if "<image>" not in tokenizer.get_vocab():  # <image> first, then <pad>: transformers' ids 32000, 32001
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # grow only: ids past len(tokenizer) may be in use
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")


def save_llava_hf(model: PolyfocusForConditionalGeneration, out_dir: str | Path, src_dir: str | Path | None = None):
    """Write `out_dir` loadable by plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`).

    The image processor's settings always go with the weights (`preprocessor_config.json`: the source's mean/std
    and the model's aspect ratio), so converting back recovers them; with a tokenizer in `src_dir`, the whole
    `LlavaProcessor` too (processor_config.json, the tokenizer and its chat template).

    A model whose image id is outside the vocabulary (an original LLaVA checkpoint's -200) is given an
    `<image>` token first: this resizes `model`'s embeddings and changes its `config.image_token_id` in place.
    """
    from transformers import AutoTokenizer

    _refuse_visual_words(model)  # before add_image_token changes the model
    tokenizer = AutoTokenizer.from_pretrained(src_dir) if src_dir and has_tokenizer(src_dir) else None
    if not 0 <= model.config.image_token_id < model.config.text_config.vocab_size:
        if tokenizer is None:
            raise ValueError(f"{src_dir}: a tokenizer is needed to add the <image> token for transformers")
        add_image_token(model, tokenizer)
    to_llava_hf(model).save_pretrained(out_dir)
    images = _image_processor(model.config, src_dir)
    images.save_pretrained(out_dir)  # transformers 5's processor keeps its own copy inside processor_config.json
    if tokenizer is not None:
        _save_llava_processor(model.config, tokenizer, images, out_dir)


def _image_processor(config: PolyfocusConfig, src_dir: str | Path | None) -> ImageProcessor:
    """The source's own image settings (mean/std of its tower, e.g. SigLIP's 0.5), with the model's aspect ratio."""
    if src_dir and (Path(src_dir) / "preprocessor_config.json").is_file():
        return ImageProcessor.from_pretrained(src_dir, aspect_ratio=config.image_aspect_ratio)
    return ImageProcessor(image_size=config.vision_config.image_size, aspect_ratio=config.image_aspect_ratio)


def _save_llava_processor(config: PolyfocusConfig, tokenizer, images: ImageProcessor, out_dir: str | Path) -> None:
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    hf_fields = {k: v for k, v in images.to_hf_dict().items() if k != "image_processor_type"}
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**hf_fields),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=llava_hf_config(config).vision_feature_select_strategy,
        num_additional_image_tokens=1 if config.vision_has_cls else 0,
        chat_template=tokenizer.chat_template,
        image_token=tokenizer.convert_ids_to_tokens(config.image_token_id),
    )
    processor.save_pretrained(out_dir)

