"""remask: masked diffusion language models in the style of LLaDA (arXiv 2502.09992).

The package attributes load on first use, so `import remask` (and the CLI's start-up) stays
cheap until torch is actually needed.
"""

import importlib

__all__ = ["PRESETS", "ModelConfig", "Pipeline", "Transformer", "build_model", "preset"]
__version__ = "0.1.0"

_LAZY = {"PRESETS": "remask.config", "ModelConfig": "remask.config", "preset": "remask.config",
         "Transformer": "remask.model", "build_model": "remask.model", "Pipeline": "remask.pipeline"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'remask' has no attribute {name!r}")
