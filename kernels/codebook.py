"""Block-wise code-book quantize and dequantize, with two 4-bit codes packed per byte.

``codebook_quantize(x, "nf4", block_size=64)`` scales every block of ``block_size`` consecutive
elements along the last dimension by ``fmt.max / absmax(block)`` (or by a given scale), maps each
value to the nearest code of the format's table (ties to the lower code) and, for formats of 4
bits or fewer, packs two codes per byte, even element in the low nibble. ``codebook_dequantize``
looks the codes up and divides by the scale. Both return / take a
:class:`lowprec.formats.QuantizedTensor`, so the Triton and the reference paths are
interchangeable: the reference is :func:`lowprec.formats.quantize` / ``dequantize`` and the
kernels agree with it bit for bit.

Kernel shapes. Quantize: one program per ``ROWS`` blocks (about ``TILE`` elements); the tile is
read with contiguous vector loads and split into even and odd elements in registers
(``tl.reshape`` + ``tl.split``), so the block's absmax, the codes and the packed bytes come out
of one pass, and the bytes are stored contiguously; the nearest code is a branch-free binary search over the sorted
midpoints (4 probes for 16 codes). Odd block sizes cannot pack inside a block, so the kernel
writes one code per byte and the host packs them. Dequantize: one program per ``BLOCK``
elements of the flat tensor, any granularity; packed codes are read as ``BLOCK / 2`` whole bytes
and their nibbles interleaved in registers (``tl.join``).
"""

from __future__ import annotations

import math

import torch

from lowprec.formats import (
    CodebookFormat,
    Format,
    QuantizedTensor,
    _check_block,
    _check_input,
    _check_scale,
    _check_scale_shape,
    dequantize,
    get_format,
    pack_nibbles,
    quantize,
)
from lowprec.kernels.dispatch import Backend, choose_backend, tensors_loadable
from lowprec.kernels.triton_helpers import NARROW_FLOATS, tl, triton

MAX_BLOCK_SIZE = 8192  # larger blocks go to the reference (one block must fit one program)
TILE = 2048  # elements per quantize program (ROWS blocks of the block size)
BLOCK = 4096  # elements per dequantize program, 8 warps (512 code words: 8 bytes per thread)
OUT_DTYPES = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}


def _codebook_format(fmt: str | Format) -> CodebookFormat:
    f = get_format(fmt)
    if not isinstance(f, CodebookFormat):
        raise ValueError(f"codebook kernels take a code-book format (nf4, de4, de8, de8u, linear4, ...); "
                         f"got {f.name!r}")
    return f


def codebook_quantize(
    x: torch.Tensor,
    fmt: str | Format,
    block_size: int,
    scale: torch.Tensor | float | None = None,
    pack: bool = True,
    backend: Backend | None = None,
) -> QuantizedTensor:
    """Block-wise code-book quantization of ``x`` (blocks of ``block_size`` along the last dim).

    ``scale``: None (``fmt.max / absmax`` per block, absmax floored at ``AMAX_FLOOR``), a scalar,
    or one per block, shape ``(..., n_blocks, 1)``. Returns the same ``QuantizedTensor`` as
    ``lowprec.formats.quantize(x, fmt, scale, "block", block_size, pack)``.
    """
    _check_input(x)
    f = _codebook_format(fmt)
    _check_block(x, block_size)
    s = None
    if scale is not None:
        s = _check_scale(scale).to(x.device)
        _check_scale_shape(s, x, "block", block_size)
    chosen = backend or choose_backend(x, kernel="codebook_quantize")
    if not tensors_loadable(x):  # e.g. E4M3 input below sm_89: the kernel cannot load it
        chosen = "torch"
    if chosen == "torch" or block_size > MAX_BLOCK_SIZE:
        if x.element_size() == 1:  # FP8 input: torch's CPU amax has no FP8 kernel; widening is exact
            x = x.float()
        return quantize(x, f, s, "block", block_size, pack)
    return _triton_quantize(x, f, block_size, s, pack)


def codebook_dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32,
                        backend: Backend | None = None) -> torch.Tensor:
    """The values ``q`` stands for, in ``dtype`` (float32, bfloat16 or float16); any granularity."""
    f = _codebook_format(q.fmt)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"codebook_dequantize returns float32, bfloat16 or float16; got {dtype}")
    chosen = backend or choose_backend(q.data, q.scale, kernel="codebook_dequantize")
    if chosen == "torch":
        return dequantize(q, dtype)
    return _triton_dequantize(q, f, dtype)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


def _search_table(f: CodebookFormat, device: torch.device) -> tuple[torch.Tensor, int]:
    """The midpoints padded with +inf to 2**steps - 1 entries, and the number of search steps."""
    steps = max(1, math.ceil(math.log2(len(f.codes))))
    mids = torch.full((2**steps - 1,), float("inf"), dtype=torch.float32)
    mids[: len(f.codes) - 1] = f.midpoints
    return mids.to(device), steps


def _require_triton(what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what}: the triton backend was chosen but triton is not importable")


def _triton_quantize(x, f: CodebookFormat, block_size: int, s, pack: bool) -> QuantizedTensor:
    _require_triton("codebook_quantize")
    dev = x.device
    xc = x.contiguous()
    n = xc.numel()
    n_blocks = n // block_size
    group = (*x.shape[:-1], x.shape[-1] // block_size, 1)
    scale = torch.empty(group, dtype=torch.float32, device=dev)
    if s is not None:
        scale.copy_(s.expand(group) if s.dim() <= len(group) else s.reshape(group))
    packed = pack and f.bits <= 4
    pack_in_kernel = packed and block_size % 2 == 0
    codes = torch.empty((n // 2) if pack_in_kernel else n, dtype=torch.uint8, device=dev)
    if n_blocks:
        mids, steps = _search_table(f, dev)
        half = triton.next_power_of_2(max(1, (block_size + 1) // 2))
        rows = max(1, TILE // (2 * half))
        # about 8 elements per thread: 4 warps for the 2048-element tile, up to 16 for one 8192 block
        warps = min(16, max(4, rows * 2 * half // 256))
        _codebook_quant_kernel[(triton.cdiv(n_blocks, rows),)](
            xc, codes, scale, mids, n_blocks, BLOCK_SIZE=block_size, HALF=half, ROWS=rows, STEPS=steps,
            N_CODES=len(f.codes), FMAX=f.max, HAS_SCALE=s is not None, PACK=pack_in_kernel, num_warps=warps)
    if packed and not pack_in_kernel:
        codes = pack_nibbles(codes)
    elif not packed:
        codes = codes.reshape(x.shape)
    return QuantizedTensor(codes, scale if s is None else s, f, x.shape, "block", block_size, packed)


def _triton_dequantize(q: QuantizedTensor, f: CodebookFormat, dtype: torch.dtype) -> torch.Tensor:
    _require_triton("codebook_dequantize")
    dev = q.data.device
    n = math.prod(q.shape)
    if q.granularity == "block":
        group = q.block_size
    elif q.granularity == "row":
        group = q.shape[-1] if len(q.shape) else 1
    else:
        group = max(n, 1)
    scale = q.scale.float().contiguous()
    if scale.numel() == 1:
        group = max(n, 1)  # one scale for everything, whatever the granularity says
    out_kind = OUT_DTYPES[dtype]
    out = torch.empty(n, dtype=torch.float32 if out_kind is None else torch.int16, device=dev)
    data = q.data.contiguous()
    # packed codes read as 32-bit words when every word lies inside the codes (n a multiple of 8)
    words = bool(q.packed and n % 8 == 0 and data.data_ptr() % 4 == 0)
    if n:
        consts = dict(MANT=0, EMIN=0, MAX_CODE=0, NAN_CODE=0)
        if out_kind is not None:
            mant, emin, max_code, nan_code, _ = NARROW_FLOATS[out_kind]
            consts = dict(MANT=mant, EMIN=emin, MAX_CODE=max_code, NAN_CODE=nan_code)
        _codebook_dequant_kernel[(triton.cdiv(n, BLOCK),)](
            data, f.table.to(dev), scale, out, n, group, PACKED=q.packed,
            NARROW=out_kind is not None, BLOCK=BLOCK, WORDS=words, num_warps=8, **consts)
    return out.view(dtype).reshape(q.shape)


if triton is not None:
    from lowprec.kernels.triton_helpers import abs_bits_of, encode_float, scale_from_amax_bits

    @triton.jit
    def _nearest_code(v, mids_ptr, STEPS: tl.constexpr, N_CODES: tl.constexpr):
        """The number of midpoints below ``v`` (``torch.bucketize(v, mids)``): the nearest code,
        ties to the lower one. Binary lifting over the +inf-padded midpoints; NaN -> last code."""
        idx = tl.zeros(v.shape, dtype=tl.int32)
        for k in tl.static_range(STEPS):
            cand = idx + (1 << (STEPS - 1 - k))
            m = tl.load(mids_ptr + cand - 1)
            idx = tl.where(m < v, cand, idx)
        return tl.where(v != v, N_CODES - 1, idx)

    @triton.jit
    def _codebook_quant_kernel(x_ptr, codes_ptr, scale_ptr, mids_ptr, n_blocks, BLOCK_SIZE: tl.constexpr,
                               HALF: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr,
                               N_CODES: tl.constexpr, FMAX: tl.constexpr, HAS_SCALE: tl.constexpr,
                               PACK: tl.constexpr):
        # One contiguous (ROWS, 2 * HALF) load (vectorised), then even / odd elements apart in
        # registers: reshape to (ROWS, HALF, 2) and split the last axis.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_blocks
        c = tl.arange(0, 2 * HALF)
        base = rows[:, None] * BLOCK_SIZE
        m = rmask[:, None] & (c[None, :] < BLOCK_SIZE)
        x = tl.load(x_ptr + base + c[None, :], mask=m, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (ROWS, HALF, 2)))
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=rmask, other=1.0)
        else:
            amax_bits = tl.max(abs_bits_of(x), axis=1)
            s = scale_from_amax_bits(amax_bits, FMAX, 1.0, False)
            tl.store(scale_ptr + rows, s, mask=rmask)
        ce = _nearest_code(xe * s[:, None], mids_ptr, STEPS, N_CODES)
        co = _nearest_code(xo * s[:, None], mids_ptr, STEPS, N_CODES)
        if PACK:
            byte = ce | (co << 4)
            if BLOCK_SIZE % 8 == 0:
                # four bytes to a 32-bit word (little-endian; the shifted bytes do not overlap, so
                # their sum is their OR), stored as whole words: a block is BLOCK_SIZE / 8 words
                w = tl.arange(0, HALF // 4)
                word = tl.sum(tl.reshape(byte, (ROWS, HALF // 4, 4)) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
                tl.store(codes_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (BLOCK_SIZE // 8) + w[None, :],
                         word, mask=rmask[:, None] & (w[None, :] < HALF // 4))
            else:
                j = tl.arange(0, HALF)
                tl.store(codes_ptr + rows[:, None] * (BLOCK_SIZE // 2) + j[None, :], byte.to(tl.uint8),
                         mask=rmask[:, None] & (2 * j[None, :] + 1 < BLOCK_SIZE))
        else:
            both = tl.reshape(tl.join(ce, co), (ROWS, 2 * HALF))
            tl.store(codes_ptr + base + c[None, :], both.to(tl.uint8), mask=m)

    @triton.jit
    def _codebook_dequant_kernel(codes_ptr, table_ptr, scale_ptr, out_ptr, n, group, PACKED: tl.constexpr,
                                 NARROW: tl.constexpr, BLOCK: tl.constexpr, MANT: tl.constexpr,
                                 EMIN: tl.constexpr, MAX_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
                                 WORDS: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if PACKED and WORDS:
            # BLOCK / 8 little-endian 32-bit words, eight nibbles each: element 8w + k is bits 4k
            w = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
            word = tl.load(codes_ptr.to(tl.pointer_type(tl.int32)) + w, mask=8 * w < n, other=0)
            nib = (word[:, None] >> (tl.arange(0, 8) * 4)[None, :]) & 0xF
            code = tl.reshape(nib, (BLOCK,))
        elif PACKED:
            # BLOCK / 2 whole bytes (vectorised), then low / high nibbles interleaved in registers
            b = tl.program_id(0).to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            byte = tl.load(codes_ptr + b, mask=2 * b < n, other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK,))
        else:
            code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        code = tl.where(mask, code, 0)
        v = tl.load(table_ptr + code)
        s = tl.load(scale_ptr + offs // group, mask=mask, other=1.0)
        y = tl.math.div_rn(v, s)
        if NARROW:
            bits = encode_float(y, y.to(tl.int32, bitcast=True), MANT, EMIN, MAX_CODE, NAN_CODE, 15, False)
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, y, mask=mask)
