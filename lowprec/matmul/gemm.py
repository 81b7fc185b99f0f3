"""GEMM backends: what a low-precision linear layer calls to compute ``x @ w.T + b``.

The contract every backend keeps: an ``nn.Module`` (so scaling state such as amax histories is
registered, saved and moved with the model) whose ``forward(x, weight, bias)`` returns the
same thing as ``torch.nn.functional.linear(x, weight, bias)`` up to the format's rounding,
with gradients for ``x``, ``weight`` and ``bias``. Weights, their gradients and the optimizer
stay in the high-precision dtype; only the GEMM operands are cast.

Unit-scaled linears (:mod:`lowprec.scaling`) and :class:`lowprec.matmul.linear.LowPrecisionLinear`
hold one of these as ``.gemm``; ``None`` means a plain high-precision ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.formats import FloatFormat, get_format
from lowprec.matmul.functional import resolve_cast_backend


def _round16(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``t`` rounded to the 16-bit format ``fmt``, saturating at +-max (NaN stays NaN), as a tensor
    of ``fmt.dtype``: the same value as ``fake_quantize(t, fmt, 1.0)`` (which returns it in t's
    dtype), without that function's host-side argument checks (a graph break each under
    ``torch.compile``)."""
    return t.float().clamp(-fmt.max, fmt.max).to(fmt.dtype)


def _fq(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return _round16(t, fmt).to(t.dtype)


def _sat(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """A native 16-bit GEMM's result saturated like the emulation's (an overflow gives inf in the
    GEMM; the emulation clamps to +-max)."""
    return t.clamp(-fmt.max, fmt.max)


class _CastLinearFn(torch.autograd.Function):
    """``y = cast(cast(x) @ cast(w).T + b)``; in backward the incoming gradient and both
    outgoing gradients are cast too (every matmul input and output in the format).

    The operands are saved for the backward in the 16-bit format (half the memory of float32).
    ``backend`` (:func:`lowprec.matmul.functional.resolve_cast_backend`): ``"emulated"`` widens
    them and multiplies in the input's dtype (float32 accumulation), then rounds the result;
    ``"native"`` multiplies the 16-bit tensors themselves (on CUDA, fp16/bf16 GEMMs accumulating
    in float32, the result rounded to the format once) and saturates the result like the emulation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fmt, backend):  # type: ignore[override]
        xq, wq = _round16(x, fmt), _round16(weight, fmt)
        ctx.save_for_backward(xq, wq)
        ctx.fmt, ctx.backend = fmt, backend
        ctx.has_bias = bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if backend == "native":
            b = _round16(bias, fmt) if bias is not None else None
            return _sat(F.linear(xq, wq, b), fmt).to(x.dtype)
        return _fq(F.linear(xq.to(x.dtype), wq.to(weight.dtype), bias), fmt)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        fmt = ctx.fmt
        native = ctx.backend == "native"
        gyq = _round16(gy, fmt)
        if not native:  # the emulation multiplies the rounded values in the original dtypes
            gyq, xq, wq = gyq.to(gy.dtype), xq.to(ctx.x_dtype), wq.to(ctx.w_dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (_sat(gyq @ wq, fmt) if native else _fq(gyq @ wq, fmt)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2, x2 = gyq.reshape(-1, gyq.shape[-1]), xq.reshape(-1, xq.shape[-1])
            gw = (_sat(g2.t() @ x2, fmt) if native else _fq(g2.t() @ x2, fmt)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g2 = gyq.reshape(-1, gyq.shape[-1])
            gb = g2.float().sum(0).to(ctx.w_dtype) if native else g2.sum(0)
        return gx, gw, gb, None, None


class CastGemm(nn.Module):
    """16-bit GEMM: operands, result and gradients rounded to FP16 or BF16 (saturating),
    accumulation in fp32; real fp16/bf16 GEMMs on a GPU with 16-bit tensor cores, emulated
    (rounded operands, float32 GEMM) elsewhere (:func:`lowprec.matmul.functional.resolve_cast_backend`). This is what ``unit-fp16`` runs: no loss scaling, so gradients that
    are not unit-scaled underflow here and show it."""

    def __init__(self, fmt: str = "fp16") -> None:
        super().__init__()
        f = get_format(fmt)
        if not isinstance(f, FloatFormat) or f.bits != 16:
            raise ValueError(f"CastGemm takes a 16-bit float format (fp16, bf16); got {fmt!r}")
        self.fmt = f

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _CastLinearFn.apply(x, weight, bias, self.fmt, resolve_cast_backend(self.fmt.dtype, x.device))

    def extra_repr(self) -> str:
        return self.fmt.name


# The FP8 backend lives in its own module (scaling state, three GEMMs); re-exported here so every
# GEMM backend can be imported from one place.
from lowprec.matmul.fp8_gemm import Fp8Gemm  # noqa: E402

__all__ = ["CastGemm", "Fp8Gemm"]
