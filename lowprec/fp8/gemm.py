"""GEMM backends: what a low-precision linear layer calls to compute ``x @ w.T + b``.

The contract every backend keeps: an ``nn.Module`` (so scaling state such as amax histories is
registered, saved and moved with the model) whose ``forward(x, weight, bias)`` returns the
same thing as ``torch.nn.functional.linear(x, weight, bias)`` up to the format's rounding,
with gradients for ``x``, ``weight`` and ``bias``. Weights, their gradients and the optimizer
stay in the high-precision dtype; only the GEMM operands are cast.

Unit-scaled linears (:mod:`lowprec.scaling`) and :class:`lowprec.fp8.linear.LowPrecisionLinear`
hold one of these as ``.gemm``; ``None`` means a plain high-precision ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.formats import FloatFormat, fake_quantize, get_format


def _fq(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return fake_quantize(t, fmt, 1.0)


class _CastLinearFn(torch.autograd.Function):
    """``y = cast(cast(x) @ cast(w).T + b)``; in backward the incoming gradient and both
    outgoing gradients are cast too (every matmul input and output in the format)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fmt):  # type: ignore[override]
        xq, wq = _fq(x, fmt), _fq(weight, fmt)
        ctx.save_for_backward(xq, wq)
        ctx.fmt = fmt
        ctx.has_bias = bias is not None
        return _fq(F.linear(xq, wq, bias), fmt)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        fmt = ctx.fmt
        gyq = _fq(gy, fmt)
        gx = _fq(gyq @ wq, fmt) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = _fq(gyq.reshape(-1, gyq.shape[-1]).t() @ xq.reshape(-1, xq.shape[-1]), fmt)
        gb = gyq.reshape(-1, gyq.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class CastGemm(nn.Module):
    """Simulated 16-bit GEMM: operands, result and gradients rounded to FP16 or BF16 (saturating),
    accumulation in fp32. This is what ``unit-fp16`` runs: no loss scaling, so gradients that
    are not unit-scaled underflow here and show it."""

    def __init__(self, fmt: str = "fp16") -> None:
        super().__init__()
        f = get_format(fmt)
        if not isinstance(f, FloatFormat) or f.bits != 16:
            raise ValueError(f"CastGemm takes a 16-bit float format (fp16, bf16); got {fmt!r}")
        self.fmt = f

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _CastLinearFn.apply(x, weight, bias, self.fmt)

    def extra_repr(self) -> str:
        return self.fmt.name


# The FP8 backend lives in its own module (scaling state, three GEMMs); re-exported here so every
# GEMM backend can be imported from one place.
from lowprec.fp8.fp8_gemm import Fp8Gemm  # noqa: E402

__all__ = ["CastGemm", "Fp8Gemm"]
