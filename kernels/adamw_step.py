"""Fused AdamW step on block-quantized moments: one Triton kernel for every state format.

One program owns a tile of ``ROWS`` whole blocks of ``B`` elements (about :data:`TILE` = 2048
elements, 8 warps; fewer rows when the tensor has fewer blocks): it loads the hyper-parameters
once, the tile's parameters, gradients and codes with vector loads (each block row is
contiguous), dequantizes, updates m, v and the parameter in float32, reduces the new absmax per
block (per row of the tile), requantizes and stores, all in registers: one pass, reading p, g,
m, v and writing p, m, v (14.1 bytes per fp32 parameter at 4-bit states). Packed 4-bit codes
are read and written as whole bytes (a ``(rows, B/2)`` tile) and split into / joined from the
two half-blocks by shifts in registers. (The previous kernel ran one program per block with 4
warps on a 64- or 128-element half-block: one element per instruction, half the threads
duplicating work, 8 hyper-parameter loads per block; see ``benchmarks/gpu_check.py``.)

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

TILE = 2048  # elements per program: whole blocks, so the absmax reduction stays in the program
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
        p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, mtab_ptr, mmid_ptr, vtab_ptr, vmid_ptr, hp_ptr, n_blocks,
        BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, MAXIMIZE: tl.constexpr,
        M_KIND: tl.constexpr, M_PACKED: tl.constexpr, M_STEPS: tl.constexpr,
        M_FMAX: tl.constexpr, M_MBITS: tl.constexpr, M_BIAS: tl.constexpr, M_MINNORM: tl.constexpr,
        M_SUBSCALE: tl.constexpr,
        V_KIND: tl.constexpr, V_PACKED: tl.constexpr, V_STEPS: tl.constexpr,
        V_FMAX: tl.constexpr, V_MBITS: tl.constexpr, V_BIAS: tl.constexpr, V_MINNORM: tl.constexpr,
        V_SUBSCALE: tl.constexpr,
    ):
        # The tile is (ROWS blocks, 2 halves, HALF elements): element j of half h of block r sits
        # at r * B + h * HALF + j, so every row of the tile is contiguous (vector loads/stores),
        # and byte j of a packed 4-bit block is the same (r, j) column of both halves.
        HALF: tl.constexpr = BLOCK_SIZE // 2
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_blocks
        h = tl.arange(0, 2)
        j = tl.arange(0, HALF)
        offs = rows[:, None, None] * BLOCK_SIZE + (h * HALF)[None, :, None] + j[None, None, :]
        mask = rmask[:, None, None] & (h[None, :, None] < 2) & (j[None, None, :] < HALF)
        boffs = rows[:, None] * HALF + j[None, :]  # packed bytes
        bmask = rmask[:, None] & (j[None, :] < HALF)
        shift = (h * 4)[None, :, None]
        beta1 = tl.load(hp_ptr + 0)
        one_m_beta1 = tl.load(hp_ptr + 1)
        beta2 = tl.load(hp_ptr + 2)
        one_m_beta2 = tl.load(hp_ptr + 3)
        decay = tl.load(hp_ptr + 4)
        neg_step = tl.load(hp_ptr + 5)
        bc2_sqrt = tl.load(hp_ptr + 6)
        eps = tl.load(hp_ptr + 7)
        m_absmax = tl.load(ma_ptr + rows, mask=rmask, other=0.0)[:, None, None]
        v_absmax = tl.load(va_ptr + rows, mask=rmask, other=0.0)[:, None, None]

        if M_PACKED:
            mc = (tl.load(mc_ptr + boffs, mask=bmask, other=0).to(tl.int32)[:, None, :] >> shift) & 15
        else:
            mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
        if V_PACKED:
            vc = (tl.load(vc_ptr + boffs, mask=bmask, other=0).to(tl.int32)[:, None, :] >> shift) & 15
        else:
            vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)

        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(mtab_ptr + mc) * m_absmax
        v = tl.load(vtab_ptr + vc) * v_absmax
        m = m * beta1 + g * one_m_beta1
        v = v * beta2 + (g * g) * one_m_beta2

        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p * decay + neg_step * tl.div_rn(m, d)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

        # requantize with each block's new absmax (flushed to 0 below float32's smallest normal)
        tiny = 1.1754943508222875e-38
        new_ma = tl.max(tl.max(tl.abs(m), axis=2), axis=1)
        new_va = tl.max(tl.max(tl.abs(v), axis=2), axis=1)
        new_ma = tl.where(new_ma >= tiny, new_ma, 0.0)
        new_va = tl.where(new_va >= tiny, new_va, 0.0)
        m_inv = tl.where(new_ma > 0, tl.div_rn(tl.full(new_ma.shape, 1.0, tl.float32), tl.maximum(new_ma, tiny)), 0.0)
        v_inv = tl.where(new_va > 0, tl.div_rn(tl.full(new_va.shape, 1.0, tl.float32), tl.maximum(new_va, tiny)), 0.0)
        mq = _encode(m * m_inv[:, None, None], mmid_ptr, M_KIND, M_STEPS, M_FMAX, M_MBITS, M_BIAS, M_MINNORM,
                     M_SUBSCALE)
        vq = _encode(v * v_inv[:, None, None], vmid_ptr, V_KIND, V_STEPS, V_FMAX, V_MBITS, V_BIAS, V_MINNORM,
                     V_SUBSCALE)
        if M_PACKED:  # the two nibbles do not overlap: their sum is their OR
            tl.store(mc_ptr + boffs, tl.sum(mq << shift, axis=1).to(tl.uint8), mask=bmask)
        else:
            tl.store(mc_ptr + offs, mq.to(tl.uint8), mask=mask)
        if V_PACKED:
            tl.store(vc_ptr + boffs, tl.sum(vq << shift, axis=1).to(tl.uint8), mask=bmask)
        else:
            tl.store(vc_ptr + offs, vq.to(tl.uint8), mask=mask)
        tl.store(ma_ptr + rows, new_ma, mask=rmask)
        tl.store(va_ptr + rows, new_va, mask=rmask)


def tile_shape(block_size: int, n_blocks: int) -> tuple[int, int]:
    """``(rows, num_warps)`` of one program: about :data:`TILE` elements (whole blocks, a power of
    two of them, no more than there are), 4 warps up to 1024 elements and 8 above."""
    rows = max(1, TILE // block_size)
    rows = min(rows, max(1, 1 << (max(n_blocks, 1) - 1).bit_length()))
    return rows, (8 if rows * block_size > 1024 else 4)


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
    rows, warps = tile_shape(bs, nb)
    _adamw_blocks_kernel[(triton.cdiv(nb, rows),)](
        p, g, m_codes, m_absmax, v_codes, v_absmax, mt, mm, vt, vm, hp.to(p.device), nb,
        BLOCK_SIZE=bs, ROWS=rows, MAXIMIZE=bool(maximize), enable_fp_fusion=False, num_warps=warps, **kw,
    )
