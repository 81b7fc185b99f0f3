"""The three FP8 GEMMs of a linear layer, as pure functions on already-quantized operands.

``y = x @ w.T``:  forward ``X (M,K) . W^T``  in E4M3 x E4M3;
grad-input  ``dX = dY (M,N) . W (N,K)``       in E5M2 x E4M3;
grad-weight ``dW = dY^T (N,M) . X (M,K)``      in E5M2 x E4M3.

Each GEMM takes FP8 operands and their *inverse* scales (what ``torch._scaled_mm`` wants:
``out = (a_q * inv_sa) @ (b_q * inv_sb)``) and runs either through ``torch._scaled_mm``
(the real FP8 GEMM; it runs on the CPU in torch 2.13) or "emulated": dequantize to float32,
then matmul. Both accumulate in float32.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from lowprec.compiled import run_compiled
from lowprec.formats import FloatFormat
from lowprec.kernels.dispatch import capability_of
from lowprec.matmul.scaling import cast_to_fp8

GEMM_BACKENDS = ("auto", "scaled_mm", "emulated")
# torch._scaled_mm's CUDA kernels need FP8 tensor cores: Ada (8.9), Hopper (9.0) and later.
SCALED_MM_MIN_CAPABILITY = (8, 9)
_warned_no_fp8: set[tuple[int, int]] = set()


class Fp8EmulationWarning(UserWarning):
    """An FP8 recipe runs on a GPU without FP8 tensor cores: the emulated GEMM is used (same
    numerics as FP8, no speed-up)."""
_ZERO = torch.zeros(())  # addmm's (ignored, beta=0) input on the CPU
_WIDEN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def widen(q: torch.Tensor) -> torch.Tensor:
    """FP8 values as float32, exactly. On the CPU a 256-entry table lookup (``torch.take`` on the
    bytes) is about 3x faster than torch's element-wise FP8 -> float32 conversion."""
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return q.float()
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return q.float()  # inside a compiled graph the conversion fuses with its consumer
    key = (q.dtype, q.device)
    table = _WIDEN_TABLES.get(key)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8).view(q.dtype).float().to(q.device)
        _WIDEN_TABLES[key] = table
    return torch.take(table, q.contiguous().view(torch.uint8).long()).reshape(q.shape)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The GEMM a recipe's ``cast.gemm`` means on ``device``: ``"auto"`` is ``torch._scaled_mm`` on
    a CUDA device of compute capability 8.9 or more (FP8 tensor cores) and the emulated GEMM
    everywhere else. Below 8.9 (A100, V100) ``torch._scaled_mm`` refuses to run, so an FP8 recipe
    there runs emulated, with one :class:`Fp8EmulationWarning` per capability saying there is no
    FP8 speed-up. A CPU has no FP8 arithmetic either: ``torch._scaled_mm`` there widens its
    operands chunk by chunk and then multiplies in float32, which is what the emulated path does
    in fewer passes (``benchmarks/bench_fp8.py``). An explicit ``"scaled_mm"`` is kept as asked."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"FP8 GEMM backend must be one of {', '.join(GEMM_BACKENDS)}; got {backend!r}")
    if backend != "auto":
        return backend
    cap = capability_of(device)
    if cap is None:
        return "emulated"
    if tuple(cap) >= SCALED_MM_MIN_CAPABILITY:
        return "scaled_mm"
    if tuple(cap) not in _warned_no_fp8:
        _warned_no_fp8.add(tuple(cap))
        warnings.warn(f"lowprec: this GPU (compute capability {cap[0]}.{cap[1]}) has no FP8 tensor cores "
                      f"(they need {SCALED_MM_MIN_CAPABILITY[0]}.{SCALED_MM_MIN_CAPABILITY[1]} or newer); FP8 "
                      f"recipes run the emulated GEMM: FP8 numerics, no FP8 speed-up", Fp8EmulationWarning,
                      stacklevel=3)
    return "emulated"


# -- 16-bit cast GEMMs (``CastGemm``: unit-fp16, the bf16 cast format) ---------------------------
CAST_BACKENDS = ("auto", "native", "emulated")
# A CUDA device multiplies fp16 on tensor cores from Volta (7.0) and bf16 from Ampere (8.0); below
# that torch still runs the op, without the speed-up, so the emulation is kept there.
NATIVE_16BIT_MIN_CAPABILITY = {torch.float16: (7, 0), torch.bfloat16: (8, 0)}
_forced_cast_backend: list[str] = []


def resolve_cast_backend(dtype: torch.dtype, device: torch.device) -> str:
    """The one place that decides how a 16-bit cast GEMM runs on ``device``: ``"native"`` (the
    three GEMMs on fp16/bf16 tensors; cuBLAS accumulates them in float32) on a CUDA device with
    16-bit tensor cores for ``dtype``, ``"emulated"`` (operands rounded to ``dtype``, then a float32
    GEMM, result rounded) everywhere else. Both round at the same points, so they agree to the
    format's precision. :func:`force_cast_backend` overrides the choice (tests, benchmarks)."""
    if _forced_cast_backend:
        return _forced_cast_backend[-1]
    cap = capability_of(device)
    need = NATIVE_16BIT_MIN_CAPABILITY.get(dtype)
    if cap is None or need is None or tuple(cap) < need:
        return "emulated"
    return "native"


@contextlib.contextmanager
def force_cast_backend(backend: str):
    """Within the block, every 16-bit cast GEMM runs ``backend`` (``"native"``, ``"emulated"`` or
    ``"auto"``: :func:`resolve_cast_backend`'s choice), whatever the device. ``"native"`` on a CPU
    runs torch's own fp16/bf16 CPU matmul (correct, not fast): it is how the native path is tested
    without a GPU."""
    if backend not in CAST_BACKENDS:
        raise ValueError(f"16-bit GEMM backend must be one of {', '.join(CAST_BACKENDS)}; got {backend!r}")
    if backend == "auto":
        yield
        return
    _forced_cast_backend.append(backend)
    try:
        yield
    finally:
        _forced_cast_backend.pop()


def cast_widened(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``cast(x * scale)`` to the FP8 format ``fmt``, returned as float32 (exact): the operand
    of the emulated GEMM. Bit-identical to ``widen(cast_to_fp8(x, scale, fmt))`` (a NaN may come
    back with the other sign bit). On the CPU the multiply, clamp, rounding and widening run as one
    fused loop compiled by Inductor, once per format with dynamic sizes (about 4x faster than the
    eager passes on a 2048 x 688 operand); ``LOWPREC_COMPILE=0`` keeps it eager."""
    if torch.compiler.is_compiling():  # already inside a graph: Inductor fuses the cast there
        return cast_to_fp8(x, scale, fmt).float()
    if x.device.type != "cpu" or os.environ.get("LOWPREC_COMPILE", "1") == "0":
        return widen(cast_to_fp8(x, scale, fmt))

    def cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return cast_to_fp8(x, scale, fmt).float()

    return run_compiled(f"fp8:cast_widened-{fmt.name}", cast, x.detach(), scale.detach().float().reshape(()),
                        dynamic=True)


def _scaled_mm_supported(a: torch.Tensor, b: torch.Tensor, inv_sa: torch.Tensor, inv_sb: torch.Tensor,
                         out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` takes these operands on their device.

    The CPU kernel takes any shape, layout and scale shape; the CUDA one needs both sizes of each
    operand to be multiples of 16, ``b`` column-major, not E5M2 x E5M2, and for per-row scales
    E4M3 operands with a bf16 output (torch 2.13). Outside that the emulated GEMM runs.
    """
    if a.device.type == "cpu":
        return True
    if a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2:
        return False
    if any(d % 16 for d in (*a.shape, *b.shape)):
        return False
    if b.stride(0) != 1:
        return False
    if inv_sa.numel() > 1 or inv_sb.numel() > 1:
        return (a.dtype == b.dtype == torch.float8_e4m3fn) and out_dtype == torch.bfloat16
    return True


def fp8_mm(a: torch.Tensor, b: torch.Tensor, inv_sa: torch.Tensor, inv_sb: torch.Tensor,
           out_dtype: torch.dtype = torch.float32, backend: str = "scaled_mm") -> torch.Tensor:
    """``(a * inv_sa) @ (b * inv_sb)`` for FP8 ``a`` (M,K) and ``b`` (K,N).

    ``inv_sa`` is a scalar or (M,1); ``inv_sb`` a scalar or (1,N). ``backend``: ``"scaled_mm"``
    (``torch._scaled_mm`` where the device supports the operands, else emulated) or
    ``"emulated"`` (dequantize then float32 matmul).
    """
    backend = resolve_backend(backend, a.device)
    inv_sa = inv_sa.float()
    inv_sb = inv_sb.float()
    if backend == "scaled_mm" and _scaled_mm_supported(a, b, inv_sa, inv_sb, out_dtype):
        if inv_sa.numel() == 1:
            inv_sa = inv_sa.reshape(())
        if inv_sb.numel() == 1:
            inv_sb = inv_sb.reshape(())
        return torch._scaled_mm(a, b, scale_a=inv_sa, scale_b=inv_sb, out_dtype=out_dtype)
    if inv_sa.numel() == 1 and inv_sb.numel() == 1:
        # Per-tensor scales factor out of the sum: one multiply on the output instead of two
        # passes over the operands (the same value up to float32 rounding); on the CPU the GEMM
        # applies it itself (alpha), so the output is written once. The scales are tensors (data,
        # not constants): inside a compiled graph the product stays a tensor, so reading it back
        # to the host (a graph break per GEMM) is avoided and Inductor fuses the multiply.
        if a.device.type == "cpu" and not torch.compiler.is_compiling():
            alpha = float(inv_sa * inv_sb)
            out = torch.addmm(_ZERO, widen(a), widen(b), beta=0.0, alpha=alpha)
            return out.to(out_dtype)
        return ((widen(a) @ widen(b)) * (inv_sa * inv_sb).reshape(())).to(out_dtype)
    return ((widen(a) * inv_sa) @ (widen(b) * inv_sb)).to(out_dtype)


def forward_gemm(xq: torch.Tensor, wq: torch.Tensor, inv_sx: torch.Tensor, inv_sw: torch.Tensor,
                 out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``Y = X . W^T``: ``xq`` (M,K), ``wq`` (N,K); ``inv_sw`` a scalar or (N,1)."""
    return fp8_mm(xq, wq.t(), inv_sx, inv_sw.reshape(1, -1) if inv_sw.numel() > 1 else inv_sw, out_dtype, backend)


def grad_input_gemm(dyq: torch.Tensor, wq_kn_t: torch.Tensor, inv_sdy: torch.Tensor, inv_sw: torch.Tensor,
                    out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``dX = dY . W``: ``dyq`` (M,N); ``wq_kn_t`` is W as an (N,K) matrix (a transposed view of a
    contiguous (K,N) tensor on the GPU, so it is column-major); ``inv_sw`` a scalar or (1,K)."""
    return fp8_mm(dyq, wq_kn_t, inv_sdy, inv_sw, out_dtype, backend)


def grad_weight_gemm(dyq_t: torch.Tensor, xq_mk: torch.Tensor, inv_sdy: torch.Tensor, inv_sx: torch.Tensor,
                     out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``dW = dY^T . X``: ``dyq_t`` (N,M) row-major, ``xq_mk`` (M,K) (column-major on the GPU);
    ``inv_sdy`` a scalar or (N,1), ``inv_sx`` a scalar or (1,K)."""
    return fp8_mm(dyq_t, xq_mk, inv_sdy, inv_sx, out_dtype, backend)


def finish_linear_grads(ctx, gx: torch.Tensor | None, gw: torch.Tensor | None, dy2: torch.Tensor,
                        smooth: torch.Tensor | None, need_bias: bool,
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The end of every low-precision linear's backward: fold Smooth-SwiGLU's per-channel scales
    ``s`` back out (``x*s`` was multiplied by ``W/s``, so ``dX`` picks up ``s`` and ``dW`` ``1/s``),
    return each gradient in its tensor's shape and dtype (``ctx.x_shape``, ``ctx.x_dtype``,
    ``ctx.w_dtype``), and sum the bias gradient in float32."""
    if smooth is not None:
        if gx is not None:
            gx = gx * smooth
        if gw is not None:
            gw = gw / smooth
    if gx is not None:
        gx = gx.reshape(ctx.x_shape).to(ctx.x_dtype)
    if gw is not None:
        gw = gw.to(ctx.w_dtype)
    gb = dy2.float().sum(0).to(ctx.w_dtype) if ctx.has_bias and need_bias else None
    return gx, gw, gb
