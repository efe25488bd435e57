"""`polyfocus train CONFIG.yaml [--key value ...]`: one training stage, from arguments to a saved model.

Runs unchanged under `python`, `torchrun` and `accelerate launch` (the Trainer reads the launcher's environment).
The output directory is a loadable polyfocus checkpoint (weights, config, tokenizer with the training template as
its chat_template, image processor), plus the resolved arguments (`train_args.yaml`), the metrics
(`trainer_state.json`), the samples left out of training by reason (`skipped.json`) and `loss.png`. A run whose
output directory already holds checkpoints resumes from the last one, as LLaVA's train.py does.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from polyfocus.config import BUILD, METHOD_FIELDS, MODEL_PARTS, SETTING
from polyfocus.data.dataset import DataCollator, SupervisedDataset
from polyfocus.data.files import require_local, write_atomic
from polyfocus.data.images import CONFIG_NAME as IMAGE_PROCESSOR_FILE
from polyfocus.data.images import ImageProcessor
from polyfocus.data.packing import PackingCollator
from polyfocus.data.templates import AUTO_NAMES, get_template
from polyfocus.model.vision import FeatureCache, TowerOutputs
from polyfocus.train.args import parse_args, resolved_config
from polyfocus.train.freeze import configure_trainable, parameter_summary, trainable_parts
from polyfocus.train.trainer import PolyfocusTrainer

logger = logging.getLogger(__name__)
SKIPPED_FILE = "skipped.json"  # the samples left out of training, by reason (strict_data: false)
# The methods' config fields (polyfocus/config.py): those that shape a new model (from backbones or model_config; a
# multimodal checkpoint's are fixed), and the settings any model takes, a checkpoint included.
BUILD_FIELDS = tuple(name for name, f in METHOD_FIELDS.items() if f.when == BUILD)
SETTING_FIELDS = tuple(name for name, f in METHOD_FIELDS.items() if f.when == SETTING)
# The LLM attention implementations on which transformers keeps packed samples apart from their position ids alone
# (polyfocus.data.packing): a block-diagonal causal mask, or FlashAttention's varlen kernel over one row.
PACKING_MASKED = ("sdpa", "eager")
PACKING_VARLEN = ("flash_attention_2", "flash_attention_3")


def train(config: str | None = None, overrides: list[str] | tuple[str, ...] = (),
          feature_cache: FeatureCache | None = None) -> PolyfocusTrainer:
    """One run of `polyfocus train`. feature_cache: with cache_vision_features, the cache of an earlier run on the
    same frozen tower to go on filling (the demo hands stage 1's to stage 2, which trains on the same images; the
    trainer's model holds it after the run: `trainer.model.vision_feature_cache`)."""
    model_args, data_args, training_args = parse_args(config, overrides)
    if not training_args.output_dir:
        raise ValueError("output_dir is required (in the YAML or --output_dir)")
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    model = build_model(model_args, data_args, training_args, tokenizer)
    image_processor = build_image_processor(model_args, model, data_args.image_aspect_ratio)
    template = get_template(model_args.version, tokenizer)
    dataset = build_dataset(data_args, training_args, model, tokenizer, template, image_processor)
    if training_args.cache_vision_features:
        if feature_cache is None:
            feature_cache = FeatureCache(int(training_args.vision_feature_cache_gb * 2**30))
        feature_cache.bind(model.config)
    else:
        feature_cache = None
    calibrate_feature_norm(model, dataset, training_args.calibration_images, quiet=training_args.quiet,
                           cache=feature_cache)

    model = set_trainable(model, model_args, training_args.output_dir)
    if feature_cache is not None:
        cache_vision_features(model, feature_cache)
    if training_args.activation_checkpointing and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input (LLaVA does this)
    collator = build_collator(training_args, tokenizer, model)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and training_args.world_size == 1:
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the Trainer is not distributed "
                           "(on a CPU-only machine pass --use_cpu true); refusing to train one copy per process")
    trainer = PolyfocusTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                               processing_class=tokenizer)
    if training_args.quiet:  # the log lines stay in trainer_state.json, loss.png and report_to
        trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        args_file = Path(training_args.output_dir) / "train_args.yaml"
        args_file.write_text(yaml.safe_dump(resolved_config(model_args, data_args, training_args), sort_keys=False))
        say(training_args, f"trainable parameters:\n{parameter_summary(model)}")

    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(training_args.output_dir):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume:
            logger.warning("resuming from %s (the output directory already holds checkpoints)", resume)
    trainer.train(resume_from_checkpoint=resume)

    save_final(trainer, tokenizer, template, image_processor, data_args, training_args)
    return trainer


# ---- parts of a run ---------------------------------------------------------------------------------------------


def say(training_args, text: str) -> None:
    if not training_args.quiet:
        print(text, flush=True)


def load_tokenizer(model_args):
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source is None:
        raise ValueError("no tokenizer: give tokenizer_name_or_path (or model_name_or_path)")
    what = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
    tokenizer = AutoTokenizer.from_pretrained(require_local(source, what))
    if tokenizer.pad_token is None:  # LLaVA pads with <unk> for Llama-family tokenizers
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_model(model_args, data_args, training_args, tokenizer):
    """Start from a checkpoint, from an LLM + vision tower, or from a fresh `model_config`."""
    from polyfocus.checkpoints import checkpoint_format, load_model

    dtype = torch.bfloat16 if training_args.bf16 else None
    overrides = {k: getattr(model_args, k) for k in BUILD_FIELDS if getattr(model_args, k) is not None}
    for what in ("model_name_or_path", "vision_tower", "model_base", "hires_tower"):  # before any hub lookup
        if getattr(model_args, what):
            require_local(getattr(model_args, what), what, directory=what != "hires_tower")
    path = model_args.model_name_or_path
    if path and _is_multimodal_checkpoint(path):
        if overrides or model_args.hires_tower:
            fixed = sorted(overrides) + (["hires_tower"] if model_args.hires_tower else [])
            raise ValueError(f"{path} is a multimodal checkpoint; its {fixed} cannot be changed")
        kwargs = {"model_base": model_args.model_base, "vision_tower": model_args.vision_tower, "dtype": dtype,
                  "attn_implementation": model_args.attn_implementation}
        if model_args.lora_enable and model_args.bits in (4, 8):  # QLoRA: the LLM is loaded quantized (CUDA)
            from polyfocus.checkpoints import load_quantized

            model = load_quantized(path, bits=model_args.bits, **kwargs)
        else:
            model = load_model(path, **kwargs)
        say(training_args, f"loaded {checkpoint_format(path)} checkpoint {path}")
    elif path:
        from polyfocus.checkpoints.backbones import from_backbones

        if not model_args.vision_tower:
            raise ValueError(f"{path} is a plain LLM: give vision_tower (a local CLIP/SigLIP directory)")
        add_token = "<image>" not in tokenizer.get_vocab()
        if add_token:
            tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        model = from_backbones(path, model_args.vision_tower, tokenizer.convert_tokens_to_ids("<image>"), dtype=dtype,
                               attn_implementation=model_args.attn_implementation, hires_tower=model_args.hires_tower,
                               **overrides)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    elif model_args.model_config is not None:
        from polyfocus.model.modeling import PolyfocusForConditionalGeneration
        from polyfocus.model.presets import tiny_config

        kwargs = model_args.model_config
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
        kwargs.setdefault("vocab_size", len(tokenizer))
        kwargs.setdefault("image_token_id", tokenizer.convert_tokens_to_ids("<image>"))
        model = PolyfocusForConditionalGeneration(tiny_config(**kwargs, **overrides))
        model.config._attn_implementation = model_args.attn_implementation
        if model_args.hires_tower:  # MG-LLaVA's ConvNeXt from its directory (its config must match hires_config)
            from polyfocus.checkpoints.convnext import load_hires_tower

            if model.hires_tower is None:
                raise ValueError("hires_tower given, but nothing uses it: add fusion: convgate or object_tokens: true")
            model.hires_tower.load_state_dict(load_hires_tower(model_args.hires_tower, model.config.hires_config)
                                              .state_dict())
    else:
        raise ValueError("nothing to start from: give model_name_or_path or model_config")

    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    apply_settings(model, model_args)
    if model_args.truncate_vision_tower:
        kept = model.truncate_vision_tower()
        say(training_args, f"vision tower: {kept} layers kept (the deepest read: mm_vision_select_layer "
                           f"{model.config.mm_vision_select_layer})")
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = training_args.model_max_length
    model.config.use_cache = False  # training; generation turns it back on
    return model


def apply_settings(model, model_args) -> None:
    """The methods' settings the run names (config values, not weights: any model takes them, a checkpoint
    included), checked together. `visual_words` is the one that adds weights: VW-LMM's head, from the LM head."""
    from polyfocus.model.visual_words import add_visual_word_head

    if model_args.visual_words:
        add_visual_word_head(model)
    given = [key for key in SETTING_FIELDS if key != "visual_words" and getattr(model_args, key) is not None]
    for switch, what in dict.fromkeys(METHOD_FIELDS[key].needs for key in given if METHOD_FIELDS[key].needs):
        unmet = [key for key in given if METHOD_FIELDS[key].needs == (switch, what)]
        if not getattr(model.config, switch):  # they would change nothing: never silently ignored
            raise ValueError(f"{', '.join(unmet)} set, but the model has no {what}: set {switch}: true")
    for key in given:
        setattr(model.config, key, getattr(model_args, key))
    if given:
        model.config.check()  # the combined values


@torch.no_grad()
def calibrate_feature_norm(model, dataset, n_images: int = 256, batch_size: int = 32, quiet: bool = False,
                           cache: FeatureCache | None = None) -> None:
    """mm_standardize_features: the per-channel statistics of what the projector reads, measured on the first
    `n_images` images of the training data (once: a model that has them, e.g. a stage-1 output, keeps them). cache:
    the run's feature cache, so that training does not compute these images' features again."""
    norm = model.mm_feature_norm
    if norm is None or int(norm.images) > 0:
        return
    pixels = []
    for i in range(len(dataset)):
        item = dataset[i]  # a Skipped (a sample that failed to load, strict_data off) has no pixels to measure
        if isinstance(item, dict) and item.get("pixel_values") is not None:
            pixels += list(item["pixel_values"])
        if len(pixels) >= n_images:
            break
    if not pixels:
        raise ValueError("mm_standardize_features: the training data has no images to measure the features on")
    pixels = torch.stack(pixels[:n_images])
    features = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size].to(model.device)
        features.append(model.projector_inputs(TowerOutputs(model.config, model.vision_tower, model.hires_tower,
                                                            batch, cache)).float().cpu())
    norm.calibrate(torch.cat(features), len(pixels))
    if not quiet:
        print(f"projector input standardised: statistics of {len(pixels)} training images "
              f"(channel std median {norm.std.median():.3g}, mean |mean| {norm.mean.abs().mean():.3g})")


def cache_vision_features(model, cache: FeatureCache) -> None:
    """Keep each training image's tower features after the first time it is seen (model/vision.py's FeatureCache):
    exact while the tower is frozen, which is required."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "vision_tower." in name]
    if trainable:
        raise ValueError(f"cache_vision_features needs a frozen vision tower; {trainable[0]} trains "
                         "(unfreeze_vision_layers / freeze_modules)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.vision_feature_cache = cache


def _is_multimodal_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return (Path(path) / "adapter_config.json").is_file()
    model_type = json.loads(config.read_text()).get("model_type", "")
    return model_type in ("polyfocus", "llava") or model_type.startswith("llava_")


def load_projector(model, file: str) -> None:
    """Projector (and fuser) weights of a stage-1 run: LLaVA's or MMFuser's mm_projector.bin (keys
    model.mm_projector.*) or ours (convert.load_projector_weights)."""
    from safetensors.torch import load_file

    from polyfocus.checkpoints.llava import load_projector_weights

    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no projector weights (pretrain_mm_mlp_adapter)")
    state = load_file(file) if file.endswith(".safetensors") else torch.load(file, map_location="cpu", weights_only=True)
    load_projector_weights(model, state, file)


def build_image_processor(model_args, model, aspect_ratio: str) -> ImageProcessor:
    """The tower's own normalisation (e.g. SigLIP's 0.5/0.5) when a preprocessor file is found, else CLIP's; the
    size the model takes (the tower's, or S2's largest scale)."""
    size = model.config.image_input_size
    for source in (model_args.model_name_or_path, model_args.vision_tower):
        if source and (Path(source) / IMAGE_PROCESSOR_FILE).is_file():
            return ImageProcessor.from_pretrained(source, aspect_ratio=aspect_ratio, image_size=size)
    return ImageProcessor(image_size=size, aspect_ratio=aspect_ratio)


def build_collator(training_args, tokenizer, model):
    """Padded batches (LLaVA's), or packed ones with `packing: true`."""
    if not training_args.packing:
        if training_args.packing_max_length is not None:
            raise ValueError("packing_max_length set, but packing is off: set packing: true")
        return DataCollator(tokenizer.pad_token_id, "right", training_args.model_max_length)
    attention = model.config.text_config._attn_implementation
    if attention not in PACKING_MASKED + PACKING_VARLEN:
        raise ValueError(f"packing: with attn_implementation {attention!r} packed samples are not known to stay "
                         f"apart; use one of {PACKING_MASKED + PACKING_VARLEN}, or packing: false")
    budget = training_args.packing_max_length or training_args.model_max_length
    if attention in PACKING_VARLEN:
        if training_args.packing_max_length is not None:
            raise ValueError(f"packing_max_length: with {attention} each batch is packed into one row (the varlen "
                             "kernel costs per sample, whatever the row's width); leave packing_max_length unset")
        budget = None
    return PackingCollator(tokenizer.pad_token_id, budget, training_args.model_max_length)


def build_dataset(data_args, training_args, model, tokenizer, template, image_processor):
    if not data_args.data_path:
        raise ValueError("data_path is required (one or more LLaVA JSON files)")
    box_files = [f for f in data_args.box_json_path if f]  # --box_json_path "" clears a recipe's
    if box_files and not model.config.object_tokens:
        raise ValueError("box_json_path given, but the model has no object tokens (object_tokens: true)")
    if len(box_files) not in (0, 1, len(data_args.data_path)):
        raise ValueError(f"box_json_path: one box JSON for all {len(data_args.data_path)} data_path files or one "
                         f"each, got {len(box_files)}")
    parts, boxes_by_json = [], {}  # one ObjectBoxes per box JSON (or detector): read or loaded once, then shared
    for i, path in enumerate(data_args.data_path):
        object_boxes = None
        if model.config.object_tokens:  # MG-LLaVA: boxes from the box JSON, or the model's detector
            from polyfocus.data.boxes import ObjectBoxes
            from polyfocus.experts.detectors import model_detector

            box_json = box_files[i if len(box_files) > 1 else 0] if box_files else None
            if box_json not in boxes_by_json:
                detector = None if box_json else model_detector(model.config)
                boxes_by_json[box_json] = ObjectBoxes.for_model(model.config, image_processor, box_json,
                                                                training_args.model_max_length, detector=detector)
            object_boxes = boxes_by_json[box_json]
        dataset = SupervisedDataset(path, data_args.image_folder, tokenizer, template, image_processor,
                                    model.config.image_token_id, model.config.num_image_tokens,
                                    training_args.model_max_length, strict=data_args.strict_data,
                                    object_boxes=object_boxes)
        if data_args.validate_data:
            dataset.validate(data_args.validate_images)
        if dataset.skipped:
            logger.warning("%s: skipped %s", path, {r: len(n) for r, n in dataset.skipped.items()})
        parts.append(dataset)
    return parts[0] if len(parts) == 1 else ConcatSupervised(parts)


class ConcatSupervised(torch.utils.data.ConcatDataset):
    """Several annotation files as one dataset; keeps `modality_lengths` for the grouped sampler."""

    @property
    def modality_lengths(self) -> list[int]:
        return [n for d in self.datasets for n in d.modality_lengths]


def set_trainable(model, model_args, output_dir: str):
    parts = trainable_parts(model_args.tune_mm_mlp_adapter, model_args.freeze_backbone,
                            model_args.freeze_mm_mlp_adapter)
    if model_args.lora_enable:
        from polyfocus.train.lora import apply_lora, lora_config

        if not _is_multimodal_checkpoint(model_args.model_name_or_path or ""):
            model = _save_base(model, Path(output_dir) / "base")  # the adapter needs a base directory to merge into
        # What trains in full beside the adapters (saved in the adapter): the model's own modules, the ConvNeXt
        # only when it trains.
        full = [name for name, (part, _) in MODEL_PARTS.items()
                if part not in ("language_model", "vision_tower") and getattr(model, name, None) is not None
                and any(True for _ in getattr(model, name).parameters())
                and (part != "hires_tower" or model_args.tune_hires_tower)]
        config = lora_config(r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                             target_modules=model_args.lora_target_modules, bias=model_args.lora_bias,
                             modules_to_save=full)
        model = apply_lora(model, config, bits=model_args.bits)
        parts -= {"language_model"}  # the LLM trains through its adapters
    if model_args.tune_hires_tower:  # MG-LLaVA keeps its ConvNeXt frozen; this trains it (mm_hires_tower_lr)
        if getattr(model, "hires_tower", None) is None:
            raise ValueError("tune_hires_tower: the model has no high-resolution tower")
        parts |= {"hires_tower"}
    configure_trainable(model, parts, model_args.unfreeze_vision_layers, model_args.freeze_modules)
    return model


def _save_base(model, base: Path):
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(base)
    state.wait_for_everyone()
    model.name_or_path = str(base.resolve())
    return model


def save_final(trainer, tokenizer, template, image_processor, data_args, training_args) -> None:
    out = training_args.output_dir
    trainer.save_model(out)
    trainer.save_state()
    skipped = trainer.skipped_samples()  # every rank takes part in gathering them
    if not trainer.is_world_process_zero():
        return
    report_skipped(skipped, Path(out) / SKIPPED_FILE, quiet=training_args.quiet)
    if getattr(template, "name", None) not in AUTO_NAMES and hasattr(template, "to_jinja"):
        tokenizer.chat_template = template.to_jinja()  # chat/serve/export then use the training template
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    if training_args.plot_loss:
        plot_loss(trainer.state.log_history, Path(out) / "loss.png")


def report_skipped(skipped: list[tuple[str, str, str]], path: Path, quiet: bool = False) -> None:
    """The samples left out of training (strict_data: false), by reason: one line printed (quiet: only when some
    were), and `path` ({"total", "by_reason", "samples": {file: {reason: [sample, ...]}}}), written even when none
    was."""
    by_reason = dict(sorted(Counter(reason for _, reason, _ in skipped).items()))
    samples: dict[str, dict[str, list[str]]] = {}
    for file, reason, name in skipped:
        samples.setdefault(file, {}).setdefault(reason, []).append(name)
    write_atomic(path, json.dumps({"total": len(skipped), "by_reason": by_reason, "samples": samples}, indent=2))
    counts = ", ".join(f"{reason} {n}" for reason, n in by_reason.items())
    if quiet and not skipped:
        return
    print(f"skipped samples: {len(skipped)}{f' ({counts})' if counts else ''}; listed in {path}", flush=True)


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*points), linewidth=1)
    ax.set(xlabel="step", ylabel="training loss (log scale)", title=path.parent.name, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
