"""Fused AdamW step on block-quantized moments: one Triton kernel for every state format.

One program owns one block of ``B`` elements (two halves of ``B/2``): it loads the parameter,
gradient, codes and the two absmax values, dequantizes, updates m, v and the parameter in
float32, takes the new per-block absmax, requantizes and stores, all in registers: one pass,
reading p, g, m, v and writing p, m, v (14.1 bytes per fp32 parameter at 4-bit states).

The PyTorch reference, CPU path and test oracle is ``lowprec.optim.functional.adamw_blocks_``
(it lives with the optimizer because it is written in terms of its state formats; this module
only takes raw tables, so the layering formats <- kernels <- optim holds). The kernel follows
the reference's operation order exactly and avoids every instruction whose rounding differs:

* divisions and square roots are the correctly rounded ``div_rn`` / ``sqrt_rn`` (Triton's ``/``
  and ``sqrt`` are approximate on CUDA), and FMA contraction is disabled at launch;
* code-book encoding is the same branch-free binary search over the same float32 midpoints;
* FP8 encoding rounds to nearest even with integer operations on the float32 bits (the
  interpreter's own float->FP8 cast mis-rounds when rounding carries into the exponent:
  design.md), then assembles the FP8 byte by hand; decoding is a 256-entry table.

Under ``TRITON_INTERPRET=1`` it therefore matches the reference bit for bit (tests).

State layouts (see ``lowprec.optim.state_quant``): 4-bit codes are packed in the half-block
layout (byte j of a block: element j low nibble, element j + B/2 high nibble); 8-bit codes are
one byte per element in element order.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing: the torch reference is used
    triton = None
    tl = None

# State kinds (constexpr in the kernel).
KIND_CODEBOOK = 0
KIND_FP8 = 1



def _fp8_params(fmt: Any) -> dict[str, Any]:
    """Kernel constants of an FP8 FloatFormat: max, mantissa bits, exponent bias, smallest normal,
    and 1 / smallest subnormal."""
    bias = 2 ** (fmt.exponent_bits - 1) - 1
    emin = 1 - bias
    return dict(FMAX=float(fmt.max), MBITS=int(fmt.mantissa_bits), BIAS=bias, MINNORM=2.0**emin,
                SUBSCALE=2.0 ** (fmt.mantissa_bits - emin))


if triton is not None:

    @triton.jit
    def _search(n, mids_ptr, STEPS: tl.constexpr):
        """#{k : mids[k] < n} by branch-free binary search (same comparisons as the reference)."""
        idx = tl.zeros(n.shape, dtype=tl.int32)
        for k in tl.static_range(STEPS):
            cand = idx + (1 << (STEPS - 1 - k))
            mid = tl.load(mids_ptr + cand - 1)
            idx = tl.where(n > mid, cand, idx)
        return idx

    @triton.jit
    def _fp8_encode(n, FMAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, MINNORM: tl.constexpr,
                    SUBSCALE: tl.constexpr):
        """FP8 byte (int32 0..255) of clamp(n * FMAX) rounded to nearest even, as torch's cast."""
        x = n * FMAX
        x = tl.minimum(tl.maximum(x, -FMAX), FMAX)
        sign = (x.to(tl.int32, bitcast=True) >> 31) & 1
        a = tl.abs(x)
        bits = a.to(tl.int32, bitcast=True)
        drop: tl.constexpr = 23 - MBITS
        lsb = (bits >> drop) & 1
        rb = (bits + ((1 << (drop - 1)) - 1) + lsb) >> drop  # exponent and MBITS mantissa bits, rounded
        e = (rb >> MBITS) - 127 + BIAS
        code_normal = (e << MBITS) | (rb & ((1 << MBITS) - 1))
        y = a * SUBSCALE  # in units of the smallest subnormal (exact: a power of two)
        # adding and subtracting 2**23 rounds y (< 2**22) to an integer, ties to even; k = 2**MBITS
        # (rounded up to the smallest normal) is that normal's code too
        k = ((y + 8388608.0) - 8388608.0).to(tl.int32)
        code = tl.where(a >= MINNORM, code_normal, k)
        return code | (sign << 7)

    @triton.jit
    def _encode(n, mids_ptr, KIND: tl.constexpr, STEPS: tl.constexpr, FMAX: tl.constexpr,
                MBITS: tl.constexpr, BIAS: tl.constexpr, MINNORM: tl.constexpr, SUBSCALE: tl.constexpr):
        if KIND == 1:
            return _fp8_encode(n, FMAX, MBITS, BIAS, MINNORM, SUBSCALE)
        else:
            return _search(n, mids_ptr, STEPS)

    @triton.jit
    def _adamw_blocks_kernel(
        p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, mtab_ptr, mmid_ptr, vtab_ptr, vmid_ptr, hp_ptr,
        HALF: tl.constexpr, MAXIMIZE: tl.constexpr,
        M_KIND: tl.constexpr, M_PACKED: tl.constexpr, M_STEPS: tl.constexpr,
        M_FMAX: tl.constexpr, M_MBITS: tl.constexpr, M_BIAS: tl.constexpr, M_MINNORM: tl.constexpr,
        M_SUBSCALE: tl.constexpr,
        V_KIND: tl.constexpr, V_PACKED: tl.constexpr, V_STEPS: tl.constexpr,
        V_FMAX: tl.constexpr, V_MBITS: tl.constexpr, V_BIAS: tl.constexpr, V_MINNORM: tl.constexpr,
        V_SUBSCALE: tl.constexpr,
    ):
        blk = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, HALF)
        base = blk * (2 * HALF)
        beta1 = tl.load(hp_ptr + 0)
        one_m_beta1 = tl.load(hp_ptr + 1)
        beta2 = tl.load(hp_ptr + 2)
        one_m_beta2 = tl.load(hp_ptr + 3)
        decay = tl.load(hp_ptr + 4)
        neg_step = tl.load(hp_ptr + 5)
        bc2_sqrt = tl.load(hp_ptr + 6)
        eps = tl.load(hp_ptr + 7)
        m_absmax = tl.load(ma_ptr + blk)
        v_absmax = tl.load(va_ptr + blk)

        # codes of both halves
        if M_PACKED:
            mbyte = tl.load(mc_ptr + blk * HALF + offs).to(tl.int32)
            mc0 = mbyte & 15
            mc1 = mbyte >> 4
        else:
            mc0 = tl.load(mc_ptr + base + offs).to(tl.int32)
            mc1 = tl.load(mc_ptr + base + HALF + offs).to(tl.int32)
        if V_PACKED:
            vbyte = tl.load(vc_ptr + blk * HALF + offs).to(tl.int32)
            vc0 = vbyte & 15
            vc1 = vbyte >> 4
        else:
            vc0 = tl.load(vc_ptr + base + offs).to(tl.int32)
            vc1 = tl.load(vc_ptr + base + HALF + offs).to(tl.int32)

        g0 = tl.load(g_ptr + base + offs).to(tl.float32)
        g1 = tl.load(g_ptr + base + HALF + offs).to(tl.float32)
        if MAXIMIZE:
            g0 = -g0
            g1 = -g1
        m0 = tl.load(mtab_ptr + mc0) * m_absmax
        m1 = tl.load(mtab_ptr + mc1) * m_absmax
        v0 = tl.load(vtab_ptr + vc0) * v_absmax
        v1 = tl.load(vtab_ptr + vc1) * v_absmax
        m0 = m0 * beta1 + g0 * one_m_beta1
        m1 = m1 * beta1 + g1 * one_m_beta1
        v0 = v0 * beta2 + (g0 * g0) * one_m_beta2
        v1 = v1 * beta2 + (g1 * g1) * one_m_beta2

        p0 = tl.load(p_ptr + base + offs).to(tl.float32)
        p1 = tl.load(p_ptr + base + HALF + offs).to(tl.float32)
        d0 = tl.div_rn(tl.sqrt_rn(v0), bc2_sqrt) + eps
        d1 = tl.div_rn(tl.sqrt_rn(v1), bc2_sqrt) + eps
        p0 = p0 * decay + neg_step * tl.div_rn(m0, d0)
        p1 = p1 * decay + neg_step * tl.div_rn(m1, d1)
        tl.store(p_ptr + base + offs, p0.to(p_ptr.dtype.element_ty))
        tl.store(p_ptr + base + HALF + offs, p1.to(p_ptr.dtype.element_ty))

        # requantize with the new absmax (flushed to 0 below float32's smallest normal)
        tiny = 1.1754943508222875e-38
        new_ma = tl.maximum(tl.max(tl.abs(m0), axis=0), tl.max(tl.abs(m1), axis=0))
        new_va = tl.maximum(tl.max(tl.abs(v0), axis=0), tl.max(tl.abs(v1), axis=0))
        new_ma = tl.where(new_ma >= tiny, new_ma, 0.0)
        new_va = tl.where(new_va >= tiny, new_va, 0.0)
        m_inv = tl.where(new_ma > 0, tl.div_rn(1.0, tl.maximum(new_ma, tiny)), 0.0)
        v_inv = tl.where(new_va > 0, tl.div_rn(1.0, tl.maximum(new_va, tiny)), 0.0)
        mq0 = _encode(m0 * m_inv, mmid_ptr, M_KIND, M_STEPS, M_FMAX, M_MBITS, M_BIAS, M_MINNORM, M_SUBSCALE)
        mq1 = _encode(m1 * m_inv, mmid_ptr, M_KIND, M_STEPS, M_FMAX, M_MBITS, M_BIAS, M_MINNORM, M_SUBSCALE)
        vq0 = _encode(v0 * v_inv, vmid_ptr, V_KIND, V_STEPS, V_FMAX, V_MBITS, V_BIAS, V_MINNORM, V_SUBSCALE)
        vq1 = _encode(v1 * v_inv, vmid_ptr, V_KIND, V_STEPS, V_FMAX, V_MBITS, V_BIAS, V_MINNORM, V_SUBSCALE)
        if M_PACKED:
            tl.store(mc_ptr + blk * HALF + offs, (mq0 | (mq1 << 4)).to(tl.uint8))
        else:
            tl.store(mc_ptr + base + offs, mq0.to(tl.uint8))
            tl.store(mc_ptr + base + HALF + offs, mq1.to(tl.uint8))
        if V_PACKED:
            tl.store(vc_ptr + blk * HALF + offs, (vq0 | (vq1 << 4)).to(tl.uint8))
        else:
            tl.store(vc_ptr + base + offs, vq0.to(tl.uint8))
            tl.store(vc_ptr + base + HALF + offs, vq1.to(tl.uint8))
        tl.store(ma_ptr + blk, new_ma)
        tl.store(va_ptr + blk, new_va)


def _format_args(sf: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(table, midpoints, constexprs) of a lowprec.optim StateFormat (duck-typed: no upward import)."""
    table = sf.table(device)
    if sf.is_fp8:
        mids = table[:1]  # unused
        consts = dict(KIND=KIND_FP8, PACKED=False, STEPS=1, **_fp8_params(sf.fmt))
    else:
        mids = sf.midpoints(device)
        consts = dict(KIND=KIND_CODEBOOK, PACKED=bool(sf.packed), STEPS=int(sf.bits), FMAX=1.0, MBITS=2, BIAS=0,
                      MINNORM=1.0, SUBSCALE=1.0)
    return table, mids, consts


def adamw_blocks_triton_(p: torch.Tensor, g: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                         v_codes: torch.Tensor, v_absmax: torch.Tensor, hp: torch.Tensor, m_fmt: Any, v_fmt: Any,
                         maximize: bool = False) -> None:
    """Launch the fused kernel on ``(n_blocks, B)`` contiguous views (in place); arguments as
    ``lowprec.optim.functional.adamw_blocks_``."""
    if triton is None:
        raise RuntimeError("lowprec.kernels.adamw_step: triton is not importable")
    if m_fmt.block_size != v_fmt.block_size:
        raise ValueError(f"adamw_step: m and v need one block size; got {m_fmt.block_size} and {v_fmt.block_size}")
    bs = m_fmt.block_size
    if p.dim() != 2 or p.shape[1] != bs or g.shape != p.shape:
        raise ValueError(f"adamw_step: expected p and g of shape (n_blocks, {bs}); got {tuple(p.shape)}, {tuple(g.shape)}")
    for name, t in (("p", p), ("g", g), ("m_codes", m_codes), ("v_codes", v_codes), ("m_absmax", m_absmax),
                    ("v_absmax", v_absmax)):
        if not t.is_contiguous():
            raise ValueError(f"adamw_step: {name} must be contiguous")
    nb = p.shape[0]
    if nb == 0:
        return
    mt, mm, mk = _format_args(m_fmt, p.device)
    vt, vm, vk = _format_args(v_fmt, p.device)
    kw = {f"M_{k}": v for k, v in mk.items()} | {f"V_{k}": v for k, v in vk.items()}
    _adamw_blocks_kernel[(nb,)](
        p, g, m_codes, m_absmax, v_codes, v_absmax, mt, mm, vt, vm, hp.to(p.device),
        HALF=bs // 2, MAXIMIZE=bool(maximize), enable_fp_fusion=False, **kw,
    )
