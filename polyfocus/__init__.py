"""polyfocus: LLaVA-style multimodal LLMs that see more of an image."""

import polyfocus.synthworld.detector  # noqa: F401  (registers the "synthworld" box detector and expert: see there)
from polyfocus.config import PolyfocusConfig
from polyfocus.model.modeling import PolyfocusForConditionalGeneration

__version__ = "0.1.0"
__all__ = ["PolyfocusConfig", "PolyfocusForConditionalGeneration", "__version__"]
