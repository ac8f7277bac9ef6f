"""remask: masked diffusion language models in the style of LLaDA (arXiv 2502.09992)."""

from remask.config import PRESETS, ModelConfig, preset
from remask.model import Transformer, build_model

__all__ = ["PRESETS", "ModelConfig", "Transformer", "build_model", "preset"]
__version__ = "0.1.0"
