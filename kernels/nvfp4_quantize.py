"""NVFP4 quantization (E2M1 elements, an E4M3 scale per 16 elements, a float32 scale per tensor),
optionally fused with the 16x16 random Hadamard transform (RHT) of NVFP4 training.

``nvfp4_quantize(x)`` returns the same :class:`lowprec.formats.NVFP4Tensor` as the reference
:func:`lowprec.formats.nvfp4_quantize`, bit for bit, for 1x16 blocks along the last dimension (or
along dim 0 of a 2-D tensor), round to nearest even or stochastic rounding (element i draws
``tl.randint(seed, i)``, i its flat row-major index in ``x``; the reference draws the same words
through :func:`lowprec.formats.philox_randint`). 16x16 blocks (``block_2d``, the weights' layout)
and other ``dim`` choices run the reference.

Two kernels:

* ``_nvfp4_amax_kernel``: the tensor amax over the *finite* values (the reference's rule), as an
  atomic integer max over float32 bit patterns, with the RHT applied first when asked (the
  reference quantizes ``rht(x)``, so the tensor scale must come from the transformed values).
  It runs only when the caller gives no ``tensor_amax``; the encode scale ``448 * 6 / amax`` is
  then :func:`lowprec.formats.nvfp4_tensor_scale` on the device (two scalar ops).
* ``_nvfp4_quantize_kernel``: per ``(BLOCK_R, BLOCK_C)`` tile, the block amax (fused, one read of
  ``x``), the E4M3 block scale ``e4m3((amax / 6) * S)``, its decoded value over ``S``, the E2M1
  elements and their packing, in exactly the reference's float32 operations (IEEE divisions via
  ``div_rn``, rounding on the integer bit patterns).

The RHT, fused: each 16-group is multiplied by ``H diag(signs) / 4`` in registers, as four
butterfly stages (``y[i] = a + b``, ``y[i + 8] = a - b`` over the pairs ``(2i, 2i + 1)``: the
constant-geometry fast Walsh-Hadamard transform, which gives the Sylvester ``H`` in natural
order), then the exact multiplication by 1/4. The reference :func:`lowprec.rht.rht` is a float32
matmul whose summation order (and use of FMA) is the BLAS library's, so no kernel can promise its
bits. Instead :func:`rht16` is the kernel's transform written in torch, operation for operation
(bit-identical to the kernel, and the CPU path of ``rht_seed``), and it agrees with
:func:`lowprec.rht.rht` within the float32 summation bound derived in :func:`rht16_error_bound`.
"""

from __future__ import annotations

import torch

from lowprec.formats import (
    E2M1,
    NVFP4_BLOCK,
    NVFP4Tensor,
    _check_input,
    _resolve_seed,
    nvfp4_tensor_scale,
)
from lowprec.formats import nvfp4_quantize as nvfp4_quantize_reference
from lowprec.kernels.dispatch import Backend, choose_backend, tensors_loadable
from lowprec.kernels.mx_quantize import ROUNDING_CODES, _check_rounding, _kernel_view, element_consts
from lowprec.kernels.triton_helpers import tl, triton
from lowprec.rht import RHT_SIZE, random_signs

TILE = 1024  # elements per quantize program (4 warps, 8 per thread)
AMAX_TILE = 2048  # elements per amax program
MAX_BLOCK_C = 128  # columns per program: eight 16-blocks
E4M3_MAX_BITS = 0x43E00000  # float32 bits of 448.0, E4M3's largest finite value
E4M3_NAN_BYTE = 0x7F  # float8_e4m3fn's NaN: the block scale of a block holding NaN or Inf
NVFP4_ELEM_MAX = 6.0  # E2M1's largest value: the block scale is amax / 6 (arXiv 2509.25149)
U_FLOAT32 = 2.0**-24  # unit roundoff of float32 (round to nearest)


def sign_bits(seed: int) -> int:
    """The RHT's random signs (:func:`lowprec.rht.random_signs`) as a 16-bit mask: bit k set
    where sign k is -1. The kernels take this integer instead of a tensor."""
    s = random_signs(seed, RHT_SIZE)
    return sum(1 << k for k in range(RHT_SIZE) if float(s[k]) < 0)


def rht16(x: torch.Tensor, seed: int, *, dim: int = -1) -> torch.Tensor:
    """``lowprec.rht.rht(x, seed, dim=dim)`` in float32 computed as the kernels compute it: signs
    (exact), four butterfly stages in a fixed order, then times 1/4 (exact). Bit-identical to the
    fused kernel; within :func:`rht16_error_bound` of the matmul reference."""
    _check_input(x, "rht16: x")
    if x.dim() == 0 or x.shape[dim] % RHT_SIZE:
        raise ValueError(f"rht16: x needs a dimension {dim} whose length is a multiple of {RHT_SIZE}; "
                         f"got shape {tuple(x.shape)}")
    xt = x.float().movedim(dim, -1)
    g = xt.reshape(-1, RHT_SIZE)
    y = torch.where(random_signs(seed, RHT_SIZE).to(x.device) < 0, -g, g)
    for _ in range(4):
        a, b = y[:, 0::2], y[:, 1::2]
        y = torch.cat([a + b, a - b], dim=1)
    return (y * 0.25).reshape(xt.shape).movedim(-1, dim)


def rht16_error_bound(x: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """An elementwise bound on ``|rht16(x) - rht(x)|`` (float32, x's shape).

    Both compute ``y_j = sum_k (±x_k) / 4`` over a group of 16 (the products by ±1/4 are exact).
    A float32 sum of n terms in any order, FMA or not, is within ``gamma_(n-1) * sum |terms|`` of
    the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4), with
    ``gamma_k = k u / (1 - k u)``: the butterflies are a depth-4 tree (``gamma_4``), the matmul
    any order (``gamma_15``). So the two differ by at most ``(gamma_4 + gamma_15) sum_k |x_k| / 4``,
    plus 16 half-ulps of the smallest subnormal for the underflow that scaling by 1/4 first or
    last can cause.
    """
    def gamma(k: int) -> float:
        return k * U_FLOAT32 / (1 - k * U_FLOAT32)

    xt = x.float().abs().movedim(dim, -1)
    s = xt.reshape(*xt.shape[:-1], -1, RHT_SIZE).sum(-1, keepdim=True) / 4
    b = (gamma(4) + gamma(15)) * s * (1 + 1e-6) + 16 * 2.0**-150
    return b.expand(*xt.shape[:-1], -1, RHT_SIZE).reshape(xt.shape).movedim(-1, dim)


def _tensor_amax_arg(tensor_amax: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(tensor_amax, torch.Tensor) or tensor_amax.numel() != 1:
        raise TypeError("nvfp4_quantize: tensor_amax must be a one-element tensor")
    tamax = tensor_amax.detach().float().reshape(()).to(device)
    if not bool(torch.isfinite(tamax)) or float(tamax) < 0:
        raise ValueError(f"nvfp4_quantize: tensor_amax must be finite and >= 0; got {float(tamax)}")
    return tamax


def nvfp4_quantize(
    x: torch.Tensor,
    *,
    dim: int = -1,
    block_2d: bool = False,
    tensor_amax: torch.Tensor | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
    rht_seed: int | None = None,
    backend: Backend | None = None,
) -> NVFP4Tensor:
    """NVFP4 quantization of ``x`` along ``dim``: the reference's signature and result
    (:func:`lowprec.formats.nvfp4_quantize`), by the Triton kernel where the dispatch picks it.

    ``rht_seed``: quantize ``rht(x, rht_seed, dim=dim)`` instead of ``x`` (the weight-gradient
    GEMM's inputs in NVFP4 training); the tensor amax (when not given) is that of the transformed
    tensor, as quantizing the transformed tensor with the reference gives. The transform is
    :func:`rht16` on every path (the kernel fuses it), so CPU and GPU agree bit for bit. The
    blocked dimension must then be a multiple of 16 (as :func:`lowprec.rht.rht` requires).
    """
    _check_rounding(rounding)
    if rht_seed is not None and (isinstance(rht_seed, bool) or not isinstance(rht_seed, int)):
        raise TypeError(f"nvfp4_quantize: rht_seed must be an int or None; got {type(rht_seed).__name__}")
    chosen = backend or choose_backend(x, kernel="nvfp4_quantize")
    view = None if block_2d or not isinstance(x, torch.Tensor) else _kernel_view(x, dim)
    if chosen == "torch" or view is None or not tensors_loadable(x) or x.dtype == torch.float64:
        xq = x if rht_seed is None else rht16(x, rht_seed, dim=dim)
        return nvfp4_quantize_reference(xq, dim=dim, block_2d=block_2d, tensor_amax=tensor_amax,
                                        rounding=rounding, seed=seed)
    seed_ = _resolve_seed(seed) if rounding == "stochastic" else 0
    return nvfp4_quantize_triton(x, dim=dim, tensor_amax=tensor_amax, rounding=rounding, seed=seed_,
                                 rht_seed=rht_seed)


def nvfp4_quantize_triton(x: torch.Tensor, *, dim: int = -1, tensor_amax: torch.Tensor | None = None,
                          rounding: str = "nearest", seed: int = 0, rht_seed: int | None = None) -> NVFP4Tensor:
    """The kernel path of :func:`nvfp4_quantize` (1x16 blocks; no dispatch; ``seed`` an int)."""
    if triton is None:
        raise RuntimeError("nvfp4_quantize: the triton backend was chosen but triton is not importable")
    _check_input(x, "nvfp4_quantize: x")
    _check_rounding(rounding)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"nvfp4_quantize (triton): seed must be an int; got {type(seed).__name__}")
    view = _kernel_view(x, dim)
    if view is None:
        raise ValueError(f"nvfp4_quantize (triton): takes the last dim, or dim 0 of a 2-D tensor; got dim {dim} "
                         f"of a {x.dim()}-d tensor")
    v, (smr, smc), (sor, soc) = view
    rows, k = v.shape
    rht = rht_seed is not None
    if rht and k % RHT_SIZE:
        raise ValueError(f"nvfp4_quantize: x's dimension {dim} has length {k}, not a multiple of the Hadamard "
                         f"size {RHT_SIZE}; pad both GEMM operands along it (or skip the transform)")
    signs = sign_bits(rht_seed) if rht else 0
    B = NVFP4_BLOCK
    n_blocks = -(-k // B)
    kp = n_blocks * B
    dev = x.device
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(kp, B)))
    if tensor_amax is None:
        amax_bits = torch.zeros((), dtype=torch.int32, device=dev)
        if rows and k:
            ab_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(k, B)))
            ab_r = max(1, min(AMAX_TILE // ab_c, triton.next_power_of_2(rows)))
            _nvfp4_amax_kernel[(triton.cdiv(rows, ab_r), triton.cdiv(k, ab_c))](
                v, amax_bits, rows, k, smr, smc, signs, BLOCK_R=ab_r, BLOCK_C=ab_c, RHT=rht, num_warps=4)
        tamax = amax_bits.view(torch.float32)
    else:
        tamax = _tensor_amax_arg(tensor_amax, dev)
    S = nvfp4_tensor_scale(tamax).reshape(())
    d = dim % x.dim()
    moved = list(x.shape)
    moved.append(moved.pop(d))
    lead = moved[:-1]
    data = torch.empty((rows, kp // 2), dtype=torch.uint8, device=dev)
    bscale = torch.empty((rows, n_blocks), dtype=torch.uint8, device=dev)
    if rows and kp:
        block_r = max(1, min(TILE // block_c, triton.next_power_of_2(rows)))
        _nvfp4_quantize_kernel[(triton.cdiv(rows, block_r), triton.cdiv(kp, block_c))](
            v, data, bscale, S, rows, k, n_blocks, smr, smc, sor, soc, seed, signs, BLOCK_R=block_r,
            BLOCK_C=block_c, RHT=rht, SR=rounding == "stochastic", num_warps=4, **element_consts(E2M1))
    return NVFP4Tensor(data.reshape(*lead, kp // 2), bscale.view(torch.float8_e4m3fn).reshape(*lead, n_blocks),
                       S, x.shape, d, False)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from lowprec.kernels.mx_quantize import encode_rounded, load_f32
    from lowprec.kernels.triton_helpers import abs_bits_of, round_abs_bits

    F32_INF_C = tl.constexpr(0x7F800000)
    E4M3_MAX_BITS_C = tl.constexpr(E4M3_MAX_BITS)
    E4M3_NAN_C = tl.constexpr(E4M3_NAN_BYTE)
    ELEM_MAX_C = tl.constexpr(NVFP4_ELEM_MAX)

    @triton.jit
    def rht16_groups(x, signs, N: tl.constexpr):
        """``H diag(signs) / 4`` applied to each row of an (N, 16) float32 tile: signs from the
        bits of ``signs`` (bit k set: -1), four constant-geometry butterfly stages, then x 1/4."""
        k = tl.arange(0, 16)
        y = tl.where(((signs >> k) & 1)[None, :] == 1, -x, x)
        for _ in tl.static_range(4):
            a, b = tl.split(tl.reshape(y, (N, 8, 2)))
            y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (N, 16))
        return y * 0.25

    @triton.jit
    def _load_tile(x_ptr, r, c, n_rows, n_cols, stride_xr, stride_xc, signs, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, RHT: tl.constexpr):
        m = (r < n_rows)[:, None] & (c < n_cols)[None, :]
        x = load_f32(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xc, m)
        if RHT:
            x = tl.reshape(rht16_groups(tl.reshape(x, (BLOCK_R * BLOCK_C // 16, 16)), signs,
                                        BLOCK_R * BLOCK_C // 16), (BLOCK_R, BLOCK_C))
        return x

    @triton.jit
    def _nvfp4_amax_kernel(x_ptr, amax_bits_ptr, n_rows, n_cols, stride_xr, stride_xc, signs,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RHT: tl.constexpr):
        """max |x| over the finite values (of the transformed x with RHT), as float32 bits."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        x = _load_tile(x_ptr, r, c, n_rows, n_cols, stride_xr, stride_xc, signs, BLOCK_R, BLOCK_C, RHT)
        a = abs_bits_of(x)
        a = tl.where(a < F32_INF_C, a, 0)
        tl.atomic_max(amax_bits_ptr, tl.max(tl.max(a, axis=1), axis=0))

    @triton.jit
    def _nvfp4_quantize_kernel(x_ptr, data_ptr, bscale_ptr, tscale_ptr, n_rows, n_cols, n_blocks, stride_xr,
                               stride_xc, stride_or, stride_oc, seed, signs, BLOCK_R: tl.constexpr,
                               BLOCK_C: tl.constexpr, RHT: tl.constexpr, SR: tl.constexpr, MANT: tl.constexpr,
                               EMIN: tl.constexpr, MAX_CODE: tl.constexpr, FMAX_BITS: tl.constexpr,
                               SIGN_SHIFT: tl.constexpr):
        G: tl.constexpr = BLOCK_C // 16
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = r < n_rows
        x = _load_tile(x_ptr, r, c, n_rows, n_cols, stride_xr, stride_xc, signs, BLOCK_R, BLOCK_C, RHT)
        xb = tl.reshape(x, (BLOCK_R, G, 16))
        amax_bits = tl.max(abs_bits_of(xb), axis=2)  # (BLOCK_R, G); NaN above inf
        bad = amax_bits >= F32_INF_C
        S = tl.load(tscale_ptr)
        t = tl.math.div_rn(tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True),
                           tl.full(amax_bits.shape, ELEM_MAX_C, tl.float32)) * S
        sb_code = tl.minimum(round_abs_bits(tl.minimum(t.to(tl.int32, bitcast=True), E4M3_MAX_BITS_C), 3, -6), 0x7E)
        # the E4M3 value of sb_code (non-negative): 2**(field - 7) * (1 + m / 8), or m * 2**-9
        field = sb_code >> 3
        mant = sb_code & 7
        sb = tl.where(field > 0, ((field + 120) << 23 | (mant << 20)).to(tl.float32, bitcast=True),
                      mant.to(tl.float32) * 0.001953125)
        g = tl.program_id(1).to(tl.int64) * G + tl.arange(0, G)
        tl.store(bscale_ptr + r[:, None] * n_blocks + g[None, :],
                 tl.where(bad, E4M3_NAN_C, sb_code).to(tl.uint8), mask=rmask[:, None] & (g < n_blocks)[None, :])
        db = tl.math.div_rn(sb, tl.full(sb.shape, 1.0, tl.float32) * S)
        zero = bad | (sb_code == 0)
        y = tl.math.div_rn(xb, tl.broadcast_to(tl.where(zero, 1.0, db)[:, :, None], (BLOCK_R, G, 16)))
        y = tl.reshape(tl.where(zero[:, :, None], 0.0, y), (BLOCK_R, BLOCK_C))
        offs = r[:, None] * stride_or + c[None, :] * stride_oc
        code = encode_rounded(y, seed, offs, SR, MANT, EMIN, MAX_CODE, FMAX_BITS, SIGN_SHIFT)
        lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_C // 2, 2)))
        j = tl.program_id(1).to(tl.int64) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
        tl.store(data_ptr + r[:, None] * (n_blocks * 8) + j[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=rmask[:, None] & (j < n_blocks * 8)[None, :])

else:  # pragma: no cover
    rht16_groups = None


__all__ = ["nvfp4_quantize", "nvfp4_quantize_triton", "rht16", "rht16_error_bound", "sign_bits", "ROUNDING_CODES"]
