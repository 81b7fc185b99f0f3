"""``torch.compile`` for lowprec's CPU hot paths, with a permanent eager fallback.

The quantized optimizers' CPU step and the FP8 emulated GEMM's cast each compile one function
and reuse it for every call. A compiler failure (no C++ compiler, an unsupported op) is a speed
problem, never a wrong result: the function then runs eagerly, for that key, from then on, and
one warning says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

_COMPILED: dict[str, Callable[..., Any]] = {}
_FAILED: set[str] = set()


def run_compiled(key: str, fn: Callable[..., Any], *args: Any, dynamic_args: Iterable[torch.Tensor] = (),
                 **compile_options: Any) -> Any:
    """``fn(*args)`` through the ``torch.compile(fn, **compile_options)`` cached under ``key``.

    ``dynamic_args``: tensors whose first dimension is marked dynamic before the call (one graph
    for every size). If compiling or running the compiled function raises, ``fn`` runs eagerly
    instead, now and for every later call with this ``key``.
    """
    if key in _FAILED:
        return fn(*args)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(fn, **compile_options)
    for t in dynamic_args:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    try:
        return compiled(*args)
    except Exception as e:  # compile unavailable (no C++ compiler, unsupported op...): eager from now on
        _FAILED.add(key)
        warnings.warn(f"lowprec: torch.compile of {key} failed ({type(e).__name__}: {e}); running it eagerly",
                      RuntimeWarning, stacklevel=2)
        return fn(*args)
