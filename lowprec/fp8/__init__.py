"""The old name of :mod:`lowprec.matmul`, kept so that existing imports keep working.

The folder held FP8 only; with MXFP8 and NVFP4 it holds every low-precision matmul, so it
moved. ``import lowprec.fp8.scaling`` (or any other submodule) gives the same module object as
``lowprec.matmul.scaling``: state, monkeypatches and ``isinstance`` checks are shared.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import lowprec.matmul as _matmul
from lowprec.matmul import *  # noqa: F401,F403
from lowprec.matmul import __all__  # noqa: F401

for _info in pkgutil.iter_modules(_matmul.__path__):
    sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"lowprec.matmul.{_info.name}")
