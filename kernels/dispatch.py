"""Pick the Triton kernel or its PyTorch reference for a call.

Triton runs on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``, which is how the
tests check kernels on a machine without a GPU); the reference runs everywhere else.
``LOWPREC_KERNELS=torch|triton`` forces one backend.

Capability: a GPU below compute capability 8.9 (A100 is 8.0) has no FP8 E4M3 type, and Triton
refuses to compile a kernel that loads one there ("type fp8e4nv not supported in this
architecture"). :func:`triton_loads` says which input dtypes a target's kernels can read;
:func:`choose_backend` sends every other call to the PyTorch reference (same results), so no
launcher ever compiles an E4M3 load for sm_80. ``tests/test_kernels_compile.py`` compiles every
kernel for sm_80/89/90/100 and checks that the only compile failures are exactly these.
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


# Input dtypes the Triton kernels read, and the compute capability each needs (None: any).
# float64 and the exotic FP8 variants (fnuz, e8m0) go to the reference.
TRITON_DTYPES: dict[torch.dtype, tuple[int, int] | None] = {
    torch.float32: None,
    torch.float16: None,
    torch.bfloat16: None,
    torch.uint8: None,
    torch.int8: None,
    torch.int32: None,
    torch.int64: None,
    torch.float8_e5m2: None,  # Triton emulates E5M2 conversions below sm_89
    torch.float8_e4m3fn: (8, 9),  # "fp8e4nv": Ada / Hopper and later only
}


def capability_of(device: torch.device | str) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for every other device (no limits apply: the
    interpreter reads every dtype)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def triton_loads(dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """Whether Triton kernels built for ``capability`` (None: no limit) can load ``dtype``."""
    if dtype not in TRITON_DTYPES:
        return False
    need = TRITON_DTYPES[dtype]
    return need is None or capability is None or tuple(capability) >= need


def tensors_loadable(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's dtype can be loaded by a kernel on that tensor's device."""
    return all(triton_loads(t.dtype, capability_of(t.device)) for t in tensors if isinstance(t, torch.Tensor))


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
    run on (a CPU tensor without ``TRITON_INTERPRET=1``). A tensor whose dtype the device's
    kernels cannot load (:func:`triton_loads`: FP8 E4M3 below sm_89, float64) always takes the
    reference, forced or not: the results are the same, only the speed differs.
    """
    forced = forced_backend()
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    triton_devices = {"cuda"} | ({"cpu"} if interpreter_on() else set())
    if forced == "torch" or not tensors_loadable(*tensors):
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
