"""Named model configs: tiny ones for tests, the demo and benches (random weights, built offline), and
the LLaVA-1.5 real sizes (whose weights load from local directories)."""

from __future__ import annotations

from polyfocus.config import PolyfocusConfig

TINY_TEXT = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3"},  # Qwen3's per-head RMSNorm on queries and keys (QK-norm)
}
TINY_VISION = {
    "clip": {"model_type": "clip_vision_model"},
    "siglip": {"model_type": "siglip_vision_model"},
    "dinov2": {"model_type": "dinov2", "layerscale_value": 0.5},  # a visible layer scale (1e-5 would hide the layers)
}


def tiny_config(
    text: str = "llama",
    vision: str = "clip",
    vocab_size: int = 2048,
    image_token_id: int = 4,
    hidden_size: int = 64,
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden_size: int = 32,
    text_layers: int = 2,
    **overrides,
) -> PolyfocusConfig:
    """A few-layer model that runs in milliseconds on a CPU; same code paths as the real sizes."""
    heads = 4
    text_config = dict(
        TINY_TEXT[text], vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
        head_dim=hidden_size // heads,  # Llama's own default; Qwen3's is 128 whatever the width
    )
    vision_config = dict(
        TINY_VISION[vision], hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    return PolyfocusConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id, **overrides)
