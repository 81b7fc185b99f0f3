"""Scaled FP8 cast with a fused amax, per tensor or per row.

``scaled_fp8_cast(x, "e4m3")`` returns ``x * scale`` cast to FP8 (saturating, round to nearest
even), the float32 ``scale`` used, and the ``amax`` of ``x`` itself, which delayed scaling keeps
in its history. With ``scale=None`` (current scaling) the scale comes from that amax; with a
given scale (delayed scaling) the amax is computed in the same pass as the cast.

The reference is :mod:`lowprec.formats` (``amax``, ``scale_from_amax``, ``quantize``), which is
both the CPU path and the oracle: the Triton kernel agrees with it bit for bit, on a GPU and
under ``TRITON_INTERPRET=1``.

Kernel shapes: per tensor, one program per ``BLOCK`` elements; with ``scale=None`` an amax pass
runs first (the scale needs the whole tensor's amax), then the cast. Per row, one program per
``BLOCK_M`` rows loops over the row twice when it must find the scale (amax, then cast; the
second read hits cache for rows that fit) and once when the scale is given.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowprec.formats import (
    FloatFormat,
    Format,
    Granularity,
    _check_input,
    _check_scale,
    _check_scale_shape,
    amax,
    get_format,
    quantize,
    scale_from_amax,
)
from lowprec.kernels.dispatch import Backend, choose_backend, tensors_loadable
from lowprec.kernels.triton_helpers import NARROW_FLOATS, tl, triton

FP8_FORMATS = ("e4m3", "e5m2")
BLOCK = 2048  # elements per program, per tensor
BLOCK_M = 4  # rows per program, per row
MAX_BLOCK_N = 1024  # columns per step of the per-row loop


class ScaledCast(NamedTuple):
    """``data``: FP8 tensor of x's shape; ``scale``: float32, shape () per tensor or (..., 1) per
    row (``x ~ data / scale``); ``amax``: float32 amax of x, same shape as ``scale``."""

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor


def _fp8_format(fmt: str | Format) -> FloatFormat:
    f = get_format(fmt)
    if not isinstance(f, FloatFormat) or f.name not in FP8_FORMATS:
        raise ValueError(f"scaled_fp8_cast casts to 'e4m3' or 'e5m2'; got format {f.name!r}")
    return f


def _validate(x: torch.Tensor, fmt: str | Format, scale, granularity: str) -> tuple[FloatFormat, torch.Tensor | None]:
    _check_input(x)
    f = _fp8_format(fmt)
    if granularity not in ("tensor", "row"):
        raise ValueError(f"scaled_fp8_cast supports granularity 'tensor' or 'row'; got {granularity!r} "
                         f"(block-wise FP8 scaling lives in lowprec.matmul)")
    if granularity == "row" and x.dim() == 0:
        raise ValueError("scaled_fp8_cast: granularity 'row' needs a tensor with at least one dimension")
    s = None
    if scale is not None:
        s = _check_scale(scale).to(x.device)
        _check_scale_shape(s, x, granularity, None)
        group = () if granularity == "tensor" else (*x.shape[:-1], 1)
        s = s.reshape(()) if granularity == "tensor" else s.expand(group).contiguous()
    return f, s


def scaled_fp8_cast_reference(
    x: torch.Tensor,
    fmt: str | Format = "e4m3",
    scale: torch.Tensor | float | None = None,
    granularity: Granularity = "tensor",
    margin: int = 0,
    power_of_two: bool = False,
) -> ScaledCast:
    """The PyTorch reference, built only from :mod:`lowprec.formats`."""
    f, s = _validate(x, fmt, scale, granularity)
    a = amax(x, granularity)
    if s is None:
        s = scale_from_amax(a, f, power_of_two=power_of_two, margin=margin)
    return ScaledCast(quantize(x, f, s, granularity).data, s, a)


def scaled_fp8_cast(
    x: torch.Tensor,
    fmt: str | Format = "e4m3",
    scale: torch.Tensor | float | None = None,
    granularity: Granularity = "tensor",
    margin: int = 0,
    power_of_two: bool = False,
    backend: Backend | None = None,
) -> ScaledCast:
    """Cast ``x * scale`` to FP8 and return the data, the scale and the amax of ``x``.

    ``scale=None``: scale = ``fmt.max / amax / 2**margin`` over the granularity (optionally a
    power of two); otherwise the given scale (scalar, or one per row of shape ``(..., 1)``).
    ``backend`` overrides :func:`lowprec.kernels.dispatch.choose_backend`.
    """
    f, s = _validate(x, fmt, scale, granularity)
    chosen = backend or choose_backend(x, kernel="scaled_fp8_cast")
    if not tensors_loadable(x):  # e.g. E4M3 input below sm_89: the kernel cannot load it
        chosen = "torch"
    if chosen == "torch":
        if x.element_size() == 1:  # FP8 input: torch's CPU amax has no FP8 kernel; widening is exact
            x = x.float()
        return scaled_fp8_cast_reference(x, f, s, granularity, margin, power_of_two)
    return _triton_cast(x, f, s, granularity, margin, power_of_two)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


def _fmt_consts(f: FloatFormat) -> dict:
    mant, emin, max_code, nan_code, _ = NARROW_FLOATS[f.name]
    return dict(FMAX=f.max, MANT=mant, EMIN=emin, MAX_CODE=max_code, NAN_CODE=nan_code)


def _triton_cast(x, f, s, granularity, margin, power_of_two) -> ScaledCast:
    if triton is None:
        raise RuntimeError("scaled_fp8_cast: the triton backend was chosen but triton is not importable")
    xc = x.contiguous()
    dev = x.device
    consts = _fmt_consts(f)
    margin_div = float(2.0**margin)
    out = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    if granularity == "tensor":
        n = xc.numel()
        amax_bits = torch.zeros((), dtype=torch.int32, device=dev)
        if s is None:
            if n:
                _fp8_amax_kernel[(triton.cdiv(n, BLOCK),)](xc, amax_bits, n, BLOCK=BLOCK)
            a = amax_bits.view(torch.float32)
            s = scale_from_amax(a, f, power_of_two=power_of_two, margin=margin)
            want_amax = False
        else:
            want_amax = True
        if n:
            _fp8_cast_tensor_kernel[(triton.cdiv(n, BLOCK),)](
                xc, out, s, amax_bits, n, FUSE_AMAX=want_amax, BLOCK=BLOCK, **consts)
        return ScaledCast(out.view(f.dtype), s.float(), amax_bits.view(torch.float32).clone())

    cols = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    group = (*x.shape[:-1], 1)
    amax_out = torch.zeros(group, dtype=torch.float32, device=dev)
    scale_out = torch.empty(group, dtype=torch.float32, device=dev)
    if s is not None:
        scale_out.copy_(s)
    if rows:
        block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(cols, 1)))
        _fp8_cast_rows_kernel[(triton.cdiv(rows, BLOCK_M),)](
            xc, out, scale_out, amax_out, rows, cols, HAS_SCALE=s is not None, MARGIN_DIV=margin_div,
            POW2=power_of_two, BLOCK_M=BLOCK_M, BLOCK_N=block_n, **consts)
    return ScaledCast(out.view(f.dtype), scale_out, amax_out)


if triton is not None:
    from lowprec.kernels.triton_helpers import abs_bits_of, encode_float, scale_from_amax_bits

    @triton.jit
    def _fp8_amax_kernel(x_ptr, amax_bits_ptr, n, BLOCK: tl.constexpr):
        """amax of a flat tensor as an atomic integer max over float32 |x| bit patterns."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.atomic_max(amax_bits_ptr, tl.max(abs_bits_of(x), axis=0))

    @triton.jit
    def _fp8_cast_tensor_kernel(x_ptr, out_ptr, scale_ptr, amax_bits_ptr, n, FUSE_AMAX: tl.constexpr,
                                BLOCK: tl.constexpr, FMAX: tl.constexpr, MANT: tl.constexpr,
                                EMIN: tl.constexpr, MAX_CODE: tl.constexpr, NAN_CODE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FUSE_AMAX:
            tl.atomic_max(amax_bits_ptr, tl.max(abs_bits_of(x), axis=0))
        y = x * tl.load(scale_ptr)
        code = encode_float(y, x.to(tl.int32, bitcast=True), MANT, EMIN, MAX_CODE, NAN_CODE, 7, True)
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)

    @triton.jit
    def _fp8_cast_rows_kernel(x_ptr, out_ptr, scale_ptr, amax_ptr, n_rows, n_cols, HAS_SCALE: tl.constexpr,
                              MARGIN_DIV: tl.constexpr, POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, FMAX: tl.constexpr, MANT: tl.constexpr,
                              EMIN: tl.constexpr, MAX_CODE: tl.constexpr, NAN_CODE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        base = rows[:, None] * n_cols
        cols = tl.arange(0, BLOCK_N)
        amax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=rmask, other=1.0)
        else:
            for c0 in range(0, n_cols, BLOCK_N):
                m = rmask[:, None] & ((c0 + cols)[None, :] < n_cols)
                x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
                amax_bits = tl.maximum(amax_bits, tl.max(abs_bits_of(x), axis=1))
            s = scale_from_amax_bits(amax_bits, FMAX, MARGIN_DIV, POW2)
            tl.store(scale_ptr + rows, s, mask=rmask)
        for c0 in range(0, n_cols, BLOCK_N):
            m = rmask[:, None] & ((c0 + cols)[None, :] < n_cols)
            x = tl.load(x_ptr + base + c0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_SCALE:
                amax_bits = tl.maximum(amax_bits, tl.max(abs_bits_of(x), axis=1))
            code = encode_float(x * s[:, None], x.to(tl.int32, bitcast=True), MANT, EMIN, MAX_CODE, NAN_CODE,
                                7, True)
            tl.store(out_ptr + base + c0 + cols[None, :], code.to(tl.uint8), mask=m)
        tl.store(amax_ptr + rows, amax_bits.to(tl.float32, bitcast=True), mask=rmask)
