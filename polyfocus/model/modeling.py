"""The polyfocus model: vision tower → feature selection → projector → features spliced into an LLM.

A plain configuration is numerically transformers' `LlavaForConditionalGeneration`: the tokenizer side
expands each `<image>` into `config.num_image_tokens` copies of `image_token_id`, and the model
scatters the projected features into those positions. Unlike LLaVA's splice (sentinel -200, one id
per image, sequences rebuilt inside the model), sequence lengths are exact before the model runs, so
batching, padding side, position ids and `generate` are transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from polyfocus.config import IGNORE_INDEX, PolyfocusConfig
from polyfocus.model.fusion import FUSION_MODULES, build_fusion
from polyfocus.model.hires import build_hires_tower
from polyfocus.model.objects import box_features, with_object_tokens
from polyfocus.model.projector import FeatureStandardizer, build_projector
from polyfocus.model.vision import TowerOutputs, build_vision_tower
from polyfocus.model.visual_words import (
    CausalLMOutputWithVisualWords,
    build_visual_word_head,
    init_visual_word_head,
    pseudo_image_features,
    visual_word_loss,
)


class PolyfocusPreTrainedModel(PreTrainedModel):
    config: PolyfocusConfig
    config_class = PolyfocusConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers takes a module of custom code to be initialised when its *own* parameters were all loaded:
        # vacuously true for a deformable attention (its parameters live in its Linears), so with a plain checkpoint
        # and fusion switched on its init would be skipped. Fusion modules initialise through transformers' `init`
        # functions, which leave loaded tensors alone, so their init always runs.
        if isinstance(module, FUSION_MODULES):
            self._init_weights(module)
        else:
            super()._initialize_weights(module, is_custom_code)

    def _init_weights(self, module):
        # Only our own modules: the tower and the LM were initialised by their own classes.
        projectors = [p for p in (self.mm_projector, getattr(self, "mm_object_projector", None)) if p is not None]
        if isinstance(module, nn.Linear) and any(module is m for p in projectors for m in p.modules()):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, FUSION_MODULES):  # their published init (MMFuser: Deformable-DETR's, zero gammas)
            module._reset_parameters()
        elif isinstance(module, FeatureStandardizer):  # uncalibrated: the identity (train calibrates it)
            init.zeros_(module.mean)
            init.ones_(module.std)
            init.zeros_(module.images)
        elif module is self.vm_head:  # the LM (a child, so initialised first) is the head's starting point
            # A tied LM head is only tied after loading (still on the meta device here): read its source instead.
            tied = self.config.tie_word_embeddings
            init_visual_word_head(module, self.get_input_embeddings() if tied else self.get_output_embeddings())


class PolyfocusForConditionalGeneration(PolyfocusPreTrainedModel, GenerationMixin):
    def __init__(self, config: PolyfocusConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.mm_projector = build_projector(
            config.mm_projector_type, config.mm_hidden_size, config.text_config.hidden_size
        )
        # the projector's input standardised per channel (config.mm_standardize_features); None: as it comes
        self.mm_feature_norm = FeatureStandardizer(config.mm_hidden_size) if config.mm_standardize_features else None
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vm_head = build_visual_word_head(config)  # VW-LMM's visual-word head; None for a plain model
        self.mm_fusion = build_fusion(config)  # between the tower and the projector (config.fusion); None: plain
        # MG-LLaVA (docs/mg_llava.md): the high-resolution ConvNeXt and the object tokens' projector; None: plain
        self.hires_tower = build_hires_tower(config) if config.uses_hires else None
        self.mm_object_projector = build_projector(config.mm_projector_type, config.object_feature_size,
                                                   config.text_config.hidden_size) if config.object_tokens else None
        # A FeatureCache of what the frozen tower gives each image (`polyfocus train --cache_vision_features`): set from
        # outside, never saved.
        self.vision_feature_cache = None
        self.post_init()

    # Embeddings live in the LLM; resize_token_embeddings and tying go through these.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True) -> nn.Embedding:
        """transformers' resize, plus the visual-word head: its rows are the vocabulary too (VW-LMM's loader resizes
        the embeddings but not its head, which breaks PIF's embedding lookup)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if self.vm_head is not None and self.vm_head.out_features != embeddings.num_embeddings:
            requires_grad = self.vm_head.weight.requires_grad
            self.vm_head = self._get_resized_lm_head(self.vm_head, embeddings.num_embeddings,
                                                     mean_resizing=mean_resizing)
            self.vm_head.requires_grad_(requires_grad)
        return embeddings

    def truncate_vision_tower(self) -> int:
        """Drop the tower's layers after the deepest hidden state the model reads (LLaVA-1.5 reads the 24-layer CLIP's
        hidden_states[-2]: its last layer never counts), so they are never computed; the config is rewritten to
        match (absolute layer indices, the tower's new depth), so the model computes exactly what it did. Returns
        the number of layers kept."""
        config = self.config
        n_states = config.vision_config.num_hidden_layers + 1
        read = [i % n_states for i in config.select_layers]
        kv = None
        if "mmfuser" in config.fusions:
            query, kv = config.mmfuser_layers()
            read += [query, *kv]
        deepest = max(read)  # hidden state k is the output of layer k (0: the embeddings)
        layers = next(m for m in self.vision_tower.modules()
                      if isinstance(m, nn.ModuleList) and len(m) == config.vision_config.num_hidden_layers)
        del layers[deepest:]
        vision = config.vision_config
        vision.num_hidden_layers = deepest
        if hasattr(vision, "stage_names"):  # a backbone config (DINOv2's): its stages follow the layers
            vision.stage_names = ["stem"] + [f"stage{i}" for i in range(1, deepest + 1)]
            vision.set_output_features_output_indices(out_features=None, out_indices=None)
        config.mm_vision_select_layer = read[0] if isinstance(config.mm_vision_select_layer, int) else \
            read[:len(config.select_layers)]
        if kv is not None:
            config.mmfuser_kv_layers = kv
        config.check()
        return deepest

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] → [n_images, N, D] (MG-LLaVA's object tokens aside: see `image_features`)."""
        return self.image_features(pixel_values)[0]

    def image_features(self, pixel_values: torch.Tensor, image_boxes: torch.Tensor | None = None):
        """[n_images, 3, H, W] → (visual tokens [n_images, N, D], object tokens [K, D] or None).

        With MG-LLaVA's high-resolution branch the images come at `config.hires_image_size` and the tower sees them
        downsampled; `image_boxes` [K, 5] (image index, x1, y1, x2, y2 in those pixels) give one object token each
        (config.object_tokens)."""
        tower = TowerOutputs(self.config, self.vision_tower, self.hires_tower, pixel_values, self.vision_feature_cache)
        features = self.projector_inputs(tower)  # [n, N, C]
        if self.mm_feature_norm is not None:
            features = self.mm_feature_norm(features)
        projector_dtype = next(self.mm_projector.parameters(), features).dtype  # identity has no parameters
        features = self.mm_projector(features.to(projector_dtype))  # [n, N, D]
        objects = None
        if self.mm_object_projector is not None and image_boxes is not None:  # MG-LLaVA: one token per box
            dtype = next(self.mm_object_projector.parameters()).dtype
            pooled = box_features(tower.hires_stages, image_boxes, self.config.hires_image_size,
                                  self.config.box_feat_size, precision=self.config.box_pool_precision,
                                  bin_dtype=dtype)  # [K, sum C_s]
            objects = self.mm_object_projector(pooled.to(dtype))
        return features, objects

    def projector_inputs(self, tower: TowerOutputs) -> torch.Tensor:
        """What the projector reads, before any standardisation: the fusion module's output (config.fusion reads
        what it needs of the tower), or without one LLaVA's selection of the tower's hidden states. [n, N, C]"""
        return tower.features if self.mm_fusion is None else self.mm_fusion(tower)

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None,
                     return_visual_words: bool = False, image_boxes: torch.Tensor | None = None):
        """Token embeddings with image features scattered, in order, into the image-token positions.

        return_visual_words: return (embeddings, visual words), the latter the visual-word logits of the image
        positions [n_positions, V] in scatter order (None without images), for the visual-word loss.
        image_boxes: [K, 5] (image index, x1, y1, x2, y2), MG-LLaVA's object boxes; each image's positions are its
        N visual tokens, then one per box."""
        is_image = input_ids == self.config.image_token_id  # [B, L]
        vocab_size = self.get_input_embeddings().num_embeddings
        in_vocab = 0 <= self.config.image_token_id < vocab_size
        if pixel_values is None:
            if not in_vocab and is_image.any():
                raise ValueError(f"input_ids hold {int(is_image.sum())} image-token positions "
                                 f"(id {self.config.image_token_id}) but no pixel_values were given")
            embeds = self.get_input_embeddings()(input_ids)
            if self.training:  # keep the projector in the graph (zero gradient): DDP/ZeRO expect every parameter
                empty = embeds.new_zeros(0, self.config.mm_hidden_size)
                embeds = embeds + self.mm_projector(empty.to(next(self.mm_projector.parameters(), empty).dtype)).sum()
                for module in (self.mm_fusion, self.mm_object_projector):  # and these (an empty slice: exactly 0)
                    if module is not None:
                        embeds = embeds + sum(p.view(-1)[:0].sum() for p in module.parameters())
            return (embeds, None) if return_visual_words else embeds
        # Image positions are overwritten below, so an out-of-vocabulary id (LLaVA's -200) is never looked up.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, L, D]
        features, objects = self.image_features(pixel_values, image_boxes)  # [n_images, N, D], [K, D] or None
        if self.mm_object_projector is None:
            tokens = features.flatten(0, 1)  # [n_positions, D]
        elif image_boxes is None:
            raise ValueError("this model has object tokens (config.object_tokens): give image_boxes [K, 5] with the "
                             "images (polyfocus.data.boxes makes them, one box at least per image)")
        else:
            tokens = with_object_tokens(features, objects, image_boxes[:, 0].long())
        visual_words = None
        if self.vm_head is not None and (return_visual_words or self.config.pseudo_image_features):
            visual_words = self.vm_head(tokens)  # [n_positions, V]
            if self.config.pseudo_image_features:  # PIF: the LLM sees only mixtures of token embeddings
                tokens = pseudo_image_features(visual_words, self.get_input_embeddings().weight)
        n_positions = int(is_image.sum())
        if n_positions != len(tokens):
            boxes = f" plus {len(image_boxes)} object tokens" if self.mm_object_projector is not None else ""
            raise ValueError(
                f"input_ids hold {n_positions} image-token positions but {features.shape[0]} image(s) give "
                f"{len(tokens)} visual tokens ({features.shape[1]} each{boxes}): was a sequence truncated inside an "
                f"image, or do the <image> tags not match the images?"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), tokens.to(embeds.dtype))
        if return_visual_words:
            return embeds, visual_words
        return embeds

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # transformers 5.25 renamed it, as here
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_boxes: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if use_cache is None and labels is not None:
            # A forward with labels scores whole sequences: it keeps no cache, and must build none, because with a
            # cache transformers derives no per-sample mask from position ids that restart (packed rows,
            # polyfocus.data.packing) and the samples of a row would attend to each other. The LLM's config
            # defaults use_cache to True, training included.
            use_cache = False
        # VW-LMM's loss needs the image positions (input_ids) and the visual words of the images.
        visual_word_loss_applies = self.vm_head is not None and labels is not None and input_ids is not None
        visual_words = None
        if inputs_embeds is None:
            if visual_word_loss_applies:
                inputs_embeds, visual_words = self.embed_inputs(input_ids, pixel_values, return_visual_words=True,
                                                                image_boxes=image_boxes)
            else:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_boxes=image_boxes)
            if labels is not None:  # image positions are never supervised
                labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        if supervised_logits_only and labels is not None and not visual_word_loss_applies:
            # The LM head and the softmax over the vocabulary only where a row's next token is supervised (the
            # answers: a fraction of a LLaVA sequence; the image and the prompts skipped, as Liger's fused loss skips
            # every logit): the same loss, less work. PolyfocusTrainer asks for it in training; the logits come back
            # for those positions only, flattened: [N, V]. (VW-LMM's loss reads the image positions' logits: it keeps
            # them all.)
            targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, L]: position i predicts i+1
            logits_to_keep = targets != IGNORE_INDEX  # [B, L] bool: transformers keeps the N True positions
            kwargs["shift_labels"] = targets[logits_to_keep]  # [N]: transformers' loss takes them unshifted
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if not visual_word_loss_applies:
            return outputs
        return self.add_visual_word_loss(outputs, input_ids, visual_words, position_ids)

    def add_visual_word_loss(self, outputs, input_ids: torch.LongTensor, visual_words: torch.Tensor | None,
                             position_ids: torch.LongTensor | None = None):
        """VW-LMM's objective: the text loss plus the weighted KL of the visual-word loss (model/visual_words.py)."""
        if visual_words is None:  # no images in this batch: a zero loss that still reaches the head (DDP, ZeRO)
            visual_words = self.vm_head(self.vm_head.weight.new_zeros(0, self.vm_head.in_features))
        is_image = input_ids == self.config.image_token_id
        vw_loss = visual_word_loss(outputs.logits, is_image, visual_words, self.config.vw_kl_direction,
                                   self.config.vw_detach_target, position_ids)
        fields = {**outputs, "loss": outputs.loss + self.config.vw_loss_weight * vw_loss}
        return CausalLMOutputWithVisualWords(**fields, lm_loss=outputs.loss, vw_loss=vw_loss)

    def generate(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None, **kwargs):
        """transformers' generate, with the prompt's images embedded once, up front. Why: for beams or several
        sequences per prompt, generate repeats every tensor argument row by row, which scrambles images (and
        MG-LLaVA's image_boxes) whenever a prompt holds other than exactly one image: a prompt's images [a, b] become
        [a, a, b, b] where its copies need [a, b, a, b]. And with an image id outside the vocabulary (LLaVA's -200),
        logits processors that index the vocabulary with input_ids (repetition penalty, ...) would fail, so image
        positions show id 0 in the returned sequences then."""
        if input_ids is not None and pixel_values is not None:
            image_id, boxes = self.config.image_token_id, kwargs.pop("image_boxes", None)
            kwargs["inputs_embeds"] = self.embed_inputs(input_ids, pixel_values, image_boxes=boxes)
            if not 0 <= image_id < self.get_input_embeddings().num_embeddings:
                input_ids = input_ids.masked_fill(input_ids == image_id, 0)
            pixel_values = None
        return super().generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)


# `AutoModelForImageTextToText.from_pretrained(dir)` finds us once polyfocus is imported.
AutoModelForImageTextToText.register(PolyfocusConfig, PolyfocusForConditionalGeneration)
