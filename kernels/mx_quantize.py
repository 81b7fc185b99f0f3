"""OCP MX block quantization (MXFP8 with E4M3 / E5M2 elements, MXFP4 with E2M1) in one pass.

``mx_quantize(x, "e4m3")`` returns the same :class:`lowprec.formats.MXTensor` as the reference
:func:`lowprec.formats.mx_quantize`, bit for bit (data and E8M0 scales), with round to nearest
even or stochastic rounding (``rounding="stochastic"``: the same seed gives the same bits on both
paths, because element i draws ``tl.randint(seed, i)``, which
:func:`lowprec.formats.philox_randint` reproduces on the host).

What a program does: it loads a ``(BLOCK_R, BLOCK_C)`` tile of the (rows, K) view of ``x``
(``BLOCK_C`` a multiple of the block size), views it as ``(BLOCK_R, BLOCK_C / bs, bs)``, takes
each block's amax as an integer max over the float32 bit patterns (NaN sorts above inf, so a NaN
block is seen), derives the E8M0 exponent ``floor(log2 amax) - emax_elem`` from the amax's bits,
divides by the power of two (exact), rounds with integer operations on the float32 bit pattern
(the interpreter's own FP8 conversion mis-rounds carries, see :mod:`lowprec.kernels.triton_helpers`)
and stores the codes: FP8 as bytes the host views as ``float8_*``, E2M1 as two codes per byte
(even element in the low nibble, as :func:`lowprec.formats.pack_fp4`). The amax is fused: ``x``
is read once.

Shapes the kernel takes: any ``x`` blocked along its last dimension (flattened to rows x K), and
2-D ``x`` blocked along dim 0 (read through its strides: a transposed read, not vectorised).
K need not be a multiple of the block: the ragged last block is masked, which is the reference's
zero padding (zeros change no amax, and a zero never rounds up, whatever the random draw), and
the padded columns are written as zero codes, as the reference's layout has them. Other ``dim``
choices on tensors of 3 or more dimensions, block sizes that are not a power of two in
[2, ``MAX_BLOCK``], and float64 inputs run the reference (same results).
"""

from __future__ import annotations

import math

import torch

from lowprec.formats import (
    E8M0_BIAS,
    E8M0_NAN,
    MX_BLOCK,
    MX_ELEMENTS,
    FloatFormat,
    MXTensor,
    _resolve_seed,
)
from lowprec.formats import mx_quantize as mx_quantize_reference
from lowprec.kernels.dispatch import Backend, choose_backend, tensors_loadable
from lowprec.kernels.triton_helpers import NARROW_FLOATS, tl, triton

MAX_BLOCK = 512  # largest block one program row holds
TILE = 1024  # elements per program: 8 per thread at 4 warps (Philox keeps 4 words per element live)
MAX_BLOCK_C = 128  # columns per program: four 32-blocks, 512 contiguous bytes of float32 per row
# E2M1 (OCP MX v1.0 FP4) as the rounding helpers see it: 1 mantissa bit, smallest normal
# exponent 0 (values 1, 1.5), largest magnitude code 0b111 = 6.0; no NaN code.
E2M1_CONSTS = (1, 0, 0x7, 0x7)
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}


def element_consts(f: FloatFormat) -> dict:
    """Compile-time constants of an element format for the kernels' rounding helpers."""
    if f.name == "e2m1":
        mant, emin, max_code, _ = E2M1_CONSTS
        sign_shift = 3
    else:
        mant, emin, max_code, _, sign_shift = NARROW_FLOATS[f.name]
    fmax_bits = int(torch.tensor(f.max, dtype=torch.float32).view(torch.int32))
    return dict(MANT=mant, EMIN=emin, MAX_CODE=max_code, FMAX_BITS=fmax_bits, SIGN_SHIFT=sign_shift)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_CODES:
        raise ValueError(f"rounding must be one of {tuple(ROUNDING_CODES)}; got {rounding!r}")


def _kernel_view(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]] | None:
    """``(view, (mem_row_stride, mem_col_stride), (idx_row_stride, idx_col_stride))`` of x as
    rows x K with K the blocked dimension, or None where the kernel does not take this layout.
    The index strides give each element's flat row-major index in x (the Philox offset)."""
    if x.dim() == 0:
        return None
    d = dim % x.dim()
    if d == x.dim() - 1:
        k = x.shape[-1]
        v = x.reshape(-1, k) if x.numel() else x.reshape(math.prod(x.shape[:-1]), k)
        if v.stride(-1) != 1 and k > 1:
            v = v.contiguous()
        return v, (v.stride(0), v.stride(1)), (k, 1)
    if x.dim() == 2 and d == 0:  # blocks along the columns of a 2-D tensor: read it transposed
        v = x.t()
        return v, (v.stride(0), v.stride(1)), (1, x.shape[1])
    return None


def mx_quantize(
    x: torch.Tensor,
    elem: str = "e4m3",
    *,
    dim: int = -1,
    block_size: int = MX_BLOCK,
    rounding: str = "nearest",
    seed: int | None = None,
    backend: Backend | None = None,
) -> MXTensor:
    """OCP MX quantization of ``x`` along ``dim``; the reference's signature and result
    (:func:`lowprec.formats.mx_quantize`), computed by the Triton kernel where the dispatch picks
    it (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when ``LOWPREC_KERNELS=triton``
    or ``backend="triton"``) and by the reference elsewhere. ``seed=None`` with stochastic
    rounding draws the seed from torch's global generator, exactly as the reference does."""
    chosen = backend or choose_backend(x, kernel="mx_quantize")
    view = _kernel_view(x, dim) if isinstance(x, torch.Tensor) else None
    pow2_block = isinstance(block_size, int) and 2 <= block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0
    if (chosen == "torch" or view is None or not pow2_block or elem not in MX_ELEMENTS
            or not tensors_loadable(x) or x.dtype == torch.float64 or rounding not in ROUNDING_CODES):
        if isinstance(x, torch.Tensor) and x.element_size() == 1 and x.is_floating_point():
            x = x.float()  # FP8 input: widening is exact, and torch's CPU amax has no FP8 kernel
        return mx_quantize_reference(x, elem, dim=dim, block_size=block_size, rounding=rounding, seed=seed)
    seed_ = _resolve_seed(seed) if rounding == "stochastic" else 0
    return mx_quantize_triton(x, elem, dim=dim, block_size=block_size, rounding=rounding, seed=seed_)


def mx_quantize_triton(x: torch.Tensor, elem: str = "e4m3", *, dim: int = -1, block_size: int = MX_BLOCK,
                       rounding: str = "nearest", seed: int = 0) -> MXTensor:
    """The kernel path of :func:`mx_quantize` (no dispatch; ``seed`` must be an int)."""
    if triton is None:
        raise RuntimeError("mx_quantize: the triton backend was chosen but triton is not importable")
    if elem not in MX_ELEMENTS:
        raise ValueError(f"mx_quantize: elem must be one of {tuple(MX_ELEMENTS)}; got {elem!r}")
    _check_rounding(rounding)
    if not (isinstance(block_size, int) and 2 <= block_size <= MAX_BLOCK and block_size & (block_size - 1) == 0):
        raise ValueError(f"mx_quantize (triton): block_size must be a power of two in [2, {MAX_BLOCK}]; "
                         f"got {block_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"mx_quantize (triton): seed must be an int; got {type(seed).__name__}")
    view = _kernel_view(x, dim)
    if view is None:
        raise ValueError(f"mx_quantize (triton): takes the last dim, or dim 0 of a 2-D tensor; got dim {dim} "
                         f"of a {x.dim()}-d tensor")
    f = MX_ELEMENTS[elem]
    v, (smr, smc), (sor, soc) = view
    rows, k = v.shape
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    fp4 = f.dtype is None
    dev = x.device
    d = dim % x.dim()
    moved = list(x.shape)
    moved.append(moved.pop(d))
    lead = moved[:-1]
    data = torch.empty((rows, kp // 2 if fp4 else kp), dtype=torch.uint8, device=dev)
    scale = torch.empty((rows, n_blocks), dtype=torch.uint8, device=dev)
    if rows and kp:
        block_c = max(block_size, min(MAX_BLOCK_C, triton.next_power_of_2(kp)))
        block_r = max(1, min(TILE // block_c, triton.next_power_of_2(rows)))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(kp, block_c))
        _mx_quantize_kernel[grid](
            v, data, scale, rows, k, n_blocks, smr, smc, sor, soc, seed, BLOCK_R=block_r, BLOCK_C=block_c,
            BS=block_size, EMAX=f.emax, FP4=fp4, SR=rounding == "stochastic", num_warps=4, **element_consts(f))
    data = data.reshape(*lead, data.shape[-1])
    if not fp4:
        data = data.view(f.dtype)
    return MXTensor(data, scale.reshape(*lead, n_blocks), elem, x.shape, d, block_size)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from lowprec.kernels.triton_helpers import abs_bits_of, round_abs_bits

    F32_INF = tl.constexpr(0x7F800000)
    E8M0_BIAS_C = tl.constexpr(E8M0_BIAS)
    E8M0_NAN_C = tl.constexpr(E8M0_NAN)

    @triton.jit
    def load_f32(ptrs, mask):
        """Load as float32. bfloat16 is widened from its bits (``bits << 16``): exact everywhere,
        where the interpreter's own bfloat16 -> float32 conversion flushes subnormals to zero."""
        if ptrs.dtype.element_ty == tl.bfloat16:
            h = tl.load(ptrs.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
            return (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def floor_log2_bits(a_bits):
        """floor(log2 a) of positive finite float32 values given as bit patterns, subnormals
        included (a subnormal's integer significand converts to float32 exactly; its exponent
        field is then floor(log2) of that integer)."""
        e_field = a_bits >> 23
        sub = ((a_bits.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127) - 149
        return tl.where(e_field > 0, e_field - 127, sub)

    @triton.jit
    def pow2_f32(k):
        """``2.0**k`` in float32 for integer k in [-149, 127], built from its bit pattern."""
        normal = (tl.minimum(tl.maximum(k + 127, 1), 254) << 23)
        sub = 1 << tl.minimum(tl.maximum(k + 149, 0), 22)
        return tl.where(k >= -126, normal, sub).to(tl.float32, bitcast=True)

    @triton.jit
    def round_sr_abs_bits(abs_bits, u24, MANT: tl.constexpr, EMIN: tl.constexpr):
        """Stochastic rounding of non-negative, non-NaN float32 bit patterns to a format with
        ``MANT`` mantissa bits and smallest normal exponent ``EMIN``, as
        :func:`lowprec.formats.round_to_format` does it: with ``n = |x| / q`` (q the grid
        spacing), round up iff ``u24 < frac(n) * 2**24``, u24 the top 24 bits of the Philox
        word. Here ``frac(n) = rem / 2**S`` (the S bits below the kept ones), so the comparison
        is done exactly in integers: ``u24 < rem << (24 - S)``, or ``u24 << (S - 24) < rem`` for
        tiny values (S > 24), the shift clamped at 24 where the answer no longer changes."""
        exp32 = abs_bits >> 23
        mant = abs_bits & 0x7FFFFF
        full = tl.where(exp32 > 0, mant | 0x800000, mant)
        e = tl.maximum(exp32, 1) - 127
        s = (23 - MANT) + tl.maximum(EMIN - e, 0)
        sc = tl.minimum(s, 24)
        r = full >> sc
        rem = full & ((1 << sc) - 1)
        up_big = u24 < (rem << tl.maximum(24 - s, 0))
        up_tiny = (u24.to(tl.int64) << tl.minimum(tl.maximum(s - 24, 0), 24)) < rem.to(tl.int64)
        up = tl.where(s <= 24, up_big, up_tiny)
        return (tl.maximum(e - EMIN, 0) << MANT) + r + up.to(tl.int32)

    @triton.jit
    def encode_rounded(y, seed, offs, SR: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                       MAX_CODE: tl.constexpr, FMAX_BITS: tl.constexpr, SIGN_SHIFT: tl.constexpr):
        """The format code (int32, sign included) of float32 ``y`` (no NaN), saturating at the
        format's max: ``|y|`` is clamped to max first (so stochastic rounding never rounds past
        it), rounded to nearest even or stochastically with ``tl.randint(seed, offs)``, and the
        sign copied from ``y`` (so -0 and values rounding to zero keep it, as ``copysign``)."""
        ybits = y.to(tl.int32, bitcast=True)
        a = tl.minimum(ybits & 0x7FFFFFFF, FMAX_BITS)
        if SR:
            u24 = (tl.randint(seed, offs) >> 8).to(tl.int32)
            code = round_sr_abs_bits(a, u24, MANT, EMIN)
        else:
            code = round_abs_bits(a, MANT, EMIN)
        code = tl.minimum(code, MAX_CODE)
        return code | (((ybits >> 31) & 1) << SIGN_SHIFT)

    @triton.jit
    def _mx_quantize_kernel(x_ptr, data_ptr, scale_ptr, n_rows, n_cols, n_blocks, stride_xr, stride_xc,
                            stride_or, stride_oc, seed, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            BS: tl.constexpr, EMAX: tl.constexpr, FP4: tl.constexpr, SR: tl.constexpr,
                            MANT: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr,
                            FMAX_BITS: tl.constexpr, SIGN_SHIFT: tl.constexpr):
        G: tl.constexpr = BLOCK_C // BS
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = r < n_rows
        kp = n_blocks * BS
        m_in = rmask[:, None] & (c < n_cols)[None, :]
        x = load_f32(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xc, m_in)
        xb = tl.reshape(x, (BLOCK_R, G, BS))
        amax_bits = tl.max(abs_bits_of(xb), axis=2)  # (BLOCK_R, G); NaN above inf
        bad = amax_bits >= F32_INF
        e = tl.where((amax_bits > 0) & ~bad, floor_log2_bits(amax_bits) - EMAX, -E8M0_BIAS_C)
        e = tl.minimum(tl.maximum(e, -E8M0_BIAS_C), E8M0_BIAS_C)
        g = tl.program_id(1).to(tl.int64) * G + tl.arange(0, G)
        smask = rmask[:, None] & (g < n_blocks)[None, :]
        tl.store(scale_ptr + r[:, None] * n_blocks + g[None, :],
                 tl.where(bad, E8M0_NAN_C, e + E8M0_BIAS_C).to(tl.uint8), mask=smask)
        y = tl.math.div_rn(xb, tl.broadcast_to(pow2_f32(e)[:, :, None], (BLOCK_R, G, BS)))
        y = tl.reshape(tl.where(bad[:, :, None], 0.0, y), (BLOCK_R, BLOCK_C))
        offs = r[:, None] * stride_or + c[None, :] * stride_oc
        code = encode_rounded(y, seed, offs, SR, MANT, EMIN, MAX_CODE, FMAX_BITS, SIGN_SHIFT)
        m_out = rmask[:, None] & (c < kp)[None, :]
        if FP4:
            lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_C // 2, 2)))
            j = tl.program_id(1).to(tl.int64) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
            tl.store(data_ptr + r[:, None] * (kp // 2) + j[None, :], (lo | (hi << 4)).to(tl.uint8),
                     mask=rmask[:, None] & (j < kp // 2)[None, :])
        else:
            tl.store(data_ptr + r[:, None] * kp + c[None, :], code.to(tl.uint8), mask=m_out)

else:  # pragma: no cover
    load_f32 = floor_log2_bits = pow2_f32 = round_sr_abs_bits = encode_rounded = None


__all__ = ["MAX_BLOCK", "element_consts", "mx_quantize", "mx_quantize_triton"]
