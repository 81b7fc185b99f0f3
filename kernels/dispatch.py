"""Pick the Triton kernel or its PyTorch reference for a call.

Triton runs on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``, which is how the
tests check kernels on a machine without a GPU); the reference runs everywhere else.
``LOWPREC_KERNELS=torch|triton`` forces one backend.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
ENV_VAR = "LOWPREC_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> Backend | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "triton"):
        raise ValueError(f"{ENV_VAR} must be 'torch', 'triton' or 'auto'; got {value!r}")
    return value  # type: ignore[return-value]


def choose_backend(*tensors: torch.Tensor, kernel: str = "kernel") -> Backend:
    """The backend for a kernel call on ``tensors``.

    Raises when ``LOWPREC_KERNELS=triton`` is forced but a tensor is on a device Triton cannot
    run on (a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    forced = forced_backend()
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    triton_devices = {"cuda"} | ({"cpu"} if interpreter_on() else set())
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not importable (needed for {kernel})")
        bad = devices - triton_devices
        if bad:
            raise RuntimeError(
                f"{ENV_VAR}=triton but {kernel} got tensors on {', '.join(sorted(bad))}; Triton runs on CUDA "
                f"tensors, or on CPU tensors under TRITON_INTERPRET=1"
            )
        return "triton"
    if devices and devices <= {"cuda"} and triton_available():
        return "triton"
    return "torch"
