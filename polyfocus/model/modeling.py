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
from transformers.modeling_outputs import CausalLMOutputWithPast

from polyfocus.config import IGNORE_INDEX, PolyfocusConfig
from polyfocus.model.projector import build_projector
from polyfocus.model.vision import build_vision_tower, select_features


class PolyfocusPreTrainedModel(PreTrainedModel):
    config: PolyfocusConfig
    config_class = PolyfocusConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        # Only our own modules: the tower and the LM were initialised by their own classes.
        if isinstance(module, nn.Linear) and any(module is m for m in self.mm_projector.modules()):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class PolyfocusForConditionalGeneration(PolyfocusPreTrainedModel, GenerationMixin):
    def __init__(self, config: PolyfocusConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.mm_projector = build_projector(
            config.mm_projector_type, config.mm_hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
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

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] → [n_images, N, D]."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
        features = select_features(self.config, out.hidden_states)
        projector_dtype = next(self.mm_projector.parameters(), features).dtype  # identity has no parameters
        return self.mm_projector(features.to(projector_dtype))

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered, in order, into the image-token positions."""
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
            return embeds
        # Image positions are overwritten below, so an out-of-vocabulary id (LLaVA's -200) is never looked up.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, L, D]
        features = self.get_image_features(pixel_values)  # [n_images, N, D]
        n_positions, n_features = int(is_image.sum()), features.shape[0] * features.shape[1]
        if n_positions != n_features:
            raise ValueError(
                f"input_ids hold {n_positions} image-token positions but {features.shape[0]} image(s) give "
                f"{n_features} features ({features.shape[1]} each): was a sequence truncated inside an image, "
                f"or do the <image> tags not match the images?"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
            if labels is not None:  # image positions are never supervised
                labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None, **kwargs):
        """transformers' generate. With an image id outside the vocabulary (LLaVA's -200), logits processors that
        index the vocabulary with input_ids (repetition penalty, ...) would fail, so the prompt goes in as
        embeddings and image positions show id 0 in the returned sequences."""
        image_id = self.config.image_token_id
        out_of_vocab = not 0 <= image_id < self.get_input_embeddings().num_embeddings
        if input_ids is not None and pixel_values is not None and out_of_vocab:
            kwargs["inputs_embeds"] = self.embed_inputs(input_ids, pixel_values)
            input_ids, pixel_values = input_ids.masked_fill(input_ids == image_id, 0), None
        return super().generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    def chat(self, image, question: str, tokenizer=None, **kwargs):
        """`model.chat(image, question)`: one chat turn, with the tokenizer and image processor of the directory
        the model was loaded from. See `polyfocus.infer.pipeline.Pipeline.chat` (history=, stream=, ...)."""
        from polyfocus.infer.pipeline import model_chat  # lazy: the pipeline imports this module

        return model_chat(self, image, question, tokenizer=tokenizer, **kwargs)


# `AutoModelForImageTextToText.from_pretrained(dir)` finds us once polyfocus is imported.
AutoModelForImageTextToText.register(PolyfocusConfig, PolyfocusForConditionalGeneration)
