"""lowprec: low-precision training for PyTorch.

Three jobs, one package:

* ``lowprec.convert(model, "unit-fp8")`` wraps a model for unit-scaled FP8/FP16 training;
* ``lowprec.optim.AdamW4bit`` (and ``AdamW8bit``, ``AdamWFp8``) keep Adam's moments in 4/8 bits;
* ``lowprec.sensitivity.score`` / ``select_bits`` choose a bit width per layer for QAT.

Submodules load lazily so that ``import lowprec`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "formats",
    "kernels",
    "scaling",
    "fp8",
    "optim",
    "sensitivity",
    "qat",
    "recipes",
    "data",
    "models",
    "training",
    "inspect",
    "checkpoint",
    "cli",
}
_EXPORTS = {"convert": "recipes", "Recipe": "recipes", "export": "export"}

__all__ = sorted(_SUBMODULES | set(_EXPORTS))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lowprec' has no attribute {name!r}")
