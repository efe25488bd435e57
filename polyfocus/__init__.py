"""polyfocus: LLaVA-style multimodal LLMs that see more of an image."""

from polyfocus.config import PolyfocusConfig
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

__version__ = "0.1.0"
__all__ = ["PolyfocusConfig", "PolyfocusForConditionalGeneration", "__version__"]
