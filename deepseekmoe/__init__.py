"""DeepSeekMoE: fine-grained and shared-expert Mixture-of-Experts language models on PyTorch.

The names below are imported on first use: every `deepseekmoe.*` import runs this file first, and the command line
(`deepseekmoe --help`, `info`) must not pay for torch and the model to get here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MKL's strict conditional numerical reproducibility, read at MKL's first call (hence here, before any). Without it
# MKL is free to take other code paths from one call to the next (by memory alignment, among others): on an AVX2
# machine a resumed run drifted from the uninterrupted one within three steps (tests/test_train.py;
# deepseekmoe.runtime.cpu.mkl_strict). A value the user sets is kept (MKL_CBWR= empty: MKL's default; the cost:
# benchmarks/README.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .version import __version__

_EXPORTS = {"ModelConfig": ".config", "MoE": ".model", "RouterOutput": ".model", "Transformer": ".model",
            "TransformerOutput": ".model", "load_preset": ".presets", "preset_names": ".presets"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
