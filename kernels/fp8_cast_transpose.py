"""Fused FP8 cast + transpose (+ amax): one read of ``x`` gives ``cast(x * scale)``, its transpose
and ``amax(|x|)``.

The FP8 linear's backward needs ``X^T`` (grad-weight) and ``dY^T`` (grad-weight) in FP8, and the
GPU GEMM wants its second operand column-major; casting and transposing in one pass avoids a
second read of the high-precision tensor (TransformerEngine's ``cast_transpose``).

Rounding: the kernel rounds to nearest even with integer operations on the float32 bit pattern
and writes the FP8 byte as ``uint8`` (viewed as the FP8 dtype on the host). The Triton
interpreter's own float->FP8 conversion mis-rounds when rounding carries into the exponent
(design.md), so the kernel never uses it; the result is bit-identical to torch's casts.
Saturation: values are clamped to +-max before the cast (E4M3 448, E5M2 57344); NaN stays NaN.
"""

from __future__ import annotations

import torch

from lowprec.formats import FloatFormat, get_format
from lowprec.kernels.dispatch import choose_backend

try:  # Triton is optional: the reference runs everywhere.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

# (exponent bias, mantissa bits, NaN byte) per FP8 format; NaN bytes as torch writes them.
_FP8_BITS = {"e4m3": (7, 3, 0x7F), "e5m2": (15, 2, 0x7F)}


def _check(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"fp8 cast_transpose takes a 2-D tensor x; got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"fp8 cast_transpose: x must be floating point, got {x.dtype}")
    if fmt.name not in _FP8_BITS:
        raise ValueError(f"fp8 cast_transpose casts to e4m3 or e5m2; got format {fmt.name!r}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError("fp8 cast_transpose: scale must be a one-element float32 tensor")


def cast_transpose_reference(x: torch.Tensor, scale: torch.Tensor, fmt: str | FloatFormat = "e4m3",
                             transpose: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """PyTorch reference: ``(q, q.T contiguous or None, amax(|x|))`` with ``q = cast(x*scale)``."""
    f = get_format(fmt)
    _check(x, scale, f)
    s = scale.float().reshape(())
    q = (x.float() * s).clamp_(-f.max, f.max).to(f.dtype)
    amax = x.detach().abs().float().amax() if x.numel() else torch.zeros((), device=x.device)
    return q, (q.t().contiguous() if transpose else None), amax


if triton is not None:

    @triton.jit
    def _rne_fp8_bits(v, FP8_MAX: tl.constexpr, BIAS: tl.constexpr, MBITS: tl.constexpr, NAN_BYTE: tl.constexpr):
        """float32 -> FP8 byte (int32 holding 0..255), saturating, round to nearest even, by bit ops."""
        is_nan = v != v
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
        bits = v.to(tl.int32, bitcast=True)
        sign = (bits >> 31) & 1
        u = bits & 0x7FFFFFFF
        exp = u >> 23
        # Normal FP8 range: drop 23 - MBITS mantissa bits with round-half-even; a carry moves
        # into the exponent field, which is exactly the next binade.
        SHIFT: tl.constexpr = 23 - MBITS
        lsb = (u >> SHIFT) & 1
        rounded = (u + ((1 << (SHIFT - 1)) - 1) + lsb) >> SHIFT
        normal_code = rounded - ((127 - BIAS) << MBITS)
        # Subnormal FP8 range (|v| < 2**(1 - BIAS)): count units of 2**(1 - BIAS - MBITS).
        mant = (u & 0x7FFFFF) | 0x800000
        rshift = tl.minimum((151 - BIAS - MBITS) - exp, 31)
        rshift = tl.maximum(rshift, 1)
        q = mant >> rshift
        rem = mant & ((1 << rshift) - 1)
        half = 1 << (rshift - 1)
        up = (rem > half) | ((rem == half) & ((q & 1) == 1))
        sub_code = q + up.to(tl.int32)
        sub_code = tl.where(exp == 0, 0, sub_code)  # float32 denormals are far below FP8's range
        code = tl.where(exp >= (128 - BIAS), normal_code, sub_code)
        code = code | (sign << 7)
        return tl.where(is_nan, NAN_BYTE, code)

    @triton.jit
    def _cast_transpose_kernel(x_ptr, scale_ptr, q_ptr, qt_ptr, amax_ptr, M, N, stride_xm, stride_xn,
                               FP8_MAX: tl.constexpr, BIAS: tl.constexpr, MBITS: tl.constexpr,
                               NAN_BYTE: tl.constexpr, TRANSPOSE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # 64-bit offsets: M * N past 2**31 elements must not wrap
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr)
        code = _rne_fp8_bits(x * s, FP8_MAX, BIAS, MBITS, NAN_BYTE).to(tl.uint8)
        tl.store(q_ptr + rm[:, None] * N + rn[None, :], code, mask=mask)
        if TRANSPOSE:
            tl.store(qt_ptr + rn[None, :] * M + rm[:, None], code, mask=mask)
        # amax as the max of |x|'s float32 bit patterns (integer order is float order, and NaN
        # patterns sort above inf, so a NaN wins as in torch.amax): reduced over the tile, then
        # one atomic per program
        a = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        tl.atomic_max(amax_ptr, tl.max(tl.max(a, axis=1), axis=0))


def cast_transpose_triton(x: torch.Tensor, scale: torch.Tensor, fmt: str | FloatFormat = "e4m3",
                          transpose: bool = True, block_m: int = 32, block_n: int = 32,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); same results as the reference."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not importable")
    f = get_format(fmt)
    _check(x, scale, f)
    bias, mbits, nan_byte = _FP8_BITS[f.name]
    m, n = x.shape
    q = torch.empty((m, n), dtype=torch.uint8, device=x.device)
    qt = torch.empty((n, m), dtype=torch.uint8, device=x.device) if transpose else q
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    if x.numel():
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _cast_transpose_kernel[grid](x, scale.float().reshape(1).contiguous(), q, qt, amax_bits, m, n,
                                     x.stride(0), x.stride(1), FP8_MAX=f.max, BIAS=bias, MBITS=mbits,
                                     NAN_BYTE=nan_byte, TRANSPOSE=transpose, BLOCK_M=block_m, BLOCK_N=block_n)
    a = amax_bits.view(torch.float32).reshape(())
    return q.view(f.dtype), (qt.view(f.dtype) if transpose else None), a


def cast_transpose(x: torch.Tensor, scale: torch.Tensor, fmt: str | FloatFormat = "e4m3", transpose: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(q, q^T, amax)``: FP8 cast of ``x * scale`` (saturating, RNE), its contiguous transpose
    (None when ``transpose=False``) and ``amax(|x|)`` (NaN if x has a NaN). Triton on CUDA (or
    under the interpreter), the PyTorch reference elsewhere."""
    if choose_backend(x, kernel="fp8_cast_transpose") == "triton":
        return cast_transpose_triton(x, scale, fmt, transpose)
    return cast_transpose_reference(x, scale, fmt, transpose)
