"""Block-wise quantizers for AdamW's moments: pure functions on tensors.

Every quantized state lives in *blocks* of ``block_size`` consecutive elements of the
flattened parameter (the last block zero-padded), one float32 ``absmax`` per block and one
code per element. A value ``x`` in a block is stored as the code of ``n = x * (1 / absmax)``
(``n`` in [-1, 1]) and read back as ``table[code] * absmax``. The ``table`` is the state
format's *map*:

* code books from :mod:`lowprec.formats` (Li, Chen, Zhu 2023; bitsandbytes):
  signed 4-bit dynamic exponent (DE4) for m, the linear map ``(i + 1) / 16`` that excludes
  zero for v (the zero-point fix), the 8-bit dynamic maps (signed for m, unsigned for v).
  Encoding picks the nearest code, ties to the lower one (``lowprec.formats.encode_codebook``'s
  rule), computed here by a branch-free binary search over the midpoints so that the Triton
  kernel can do exactly the same comparisons.
* FP8 (E4M3 for m, E5M2 for v): ``code = bits(rne(clamp(n * fmt.max)))`` and
  ``table[code] = fp8_value * fp32(1 / fmt.max)``.

4-bit codes are packed two per byte in the *half-block* layout: byte ``j`` of a block holds
element ``j`` in its low nibble and element ``j + block_size / 2`` in its high nibble. Both
halves are then contiguous runs, which vectorise (CPU) and coalesce (GPU) without any
interleaving shuffle; ``lowprec.formats.pack_nibbles``' even/odd layout would not.

Second moment by *rank-1 normalisation* (Li et al. 2023, section 4.2): for a tensor viewed as
``(rows, cols)`` the normaliser of element (i, j) is ``min(rowmax_i, colmax_j)``; the state is
the two max vectors plus 4-bit codes. An option (``v_mode="rank1"``); see AdamW4bit's docstring
for the measured comparison with plain B128 blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from lowprec.formats import (
    DE4,
    DE8,
    DE8_UNSIGNED,
    E4M3,
    E5M2,
    LINEAR4_NO_ZERO,
    CodebookFormat,
    FloatFormat,
)

# Smallest positive normal float32. A block whose absmax is below it is stored with absmax 0
# (so it decodes to exact zeros even under v's map without zero) and encoded with a reciprocal
# of 0: no inf * 0 = NaN, and no subnormal arithmetic, which costs ~100x on x86 (measured: an
# all-"zero" initial state clamped to tiny instead made the first steps 10x slower).
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class StateFormat:
    """How one moment is stored: a map (code book or FP8 format) and a block size."""

    name: str
    fmt: CodebookFormat | FloatFormat
    block_size: int
    # The map and midpoints as Python floats (float32 values), fixed at construction so that
    # compiled code sees constants (reading a tensor's values inside torch.compile breaks the graph).
    table_values: tuple[float, ...] = field(init=False, repr=False, compare=False)
    midpoint_values: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.fmt, FloatFormat):
            codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(self.fmt.dtype).float()
            table = torch.nan_to_num(codes, nan=0.0) * (1.0 / self.fmt.max)
            mids: tuple[float, ...] = ()
        else:
            table = self.fmt.table
            mids = tuple(float(x) for x in self.fmt.midpoints)
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"state format {self.name}: block_size must be a positive even number, got {self.block_size}")
        object.__setattr__(self, "table_values", tuple(float(x) for x in table))
        object.__setattr__(self, "midpoint_values", mids)

    @property
    def is_fp8(self) -> bool:
        return isinstance(self.fmt, FloatFormat)

    @property
    def bits(self) -> int:
        return 8 if self.is_fp8 else self.fmt.bits

    @property
    def packed(self) -> bool:
        """Two codes per byte (4-bit maps)."""
        return self.bits <= 4

    @property
    def codes_per_block(self) -> int:
        """Bytes of codes per block."""
        return self.block_size // 2 if self.packed else self.block_size

    @property
    def search_steps(self) -> int:
        """Binary-search steps for a code book of 2**bits codes."""
        return self.bits

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The map: the normalised value each code decodes to (float32, 2**bits entries)."""
        return _table(self, str(torch.device(device)))

    def midpoints(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Decision boundaries of a code book (float32, 2**bits - 1 entries)."""
        if self.is_fp8:
            raise ValueError(f"state format {self.name}: FP8 states are encoded by rounding, not by midpoints")
        return _midpoints(self, str(torch.device(device)))

    def map_nbytes(self) -> int:
        """Bytes of the map (counted once per optimizer in 'true storage' figures)."""
        return 4 * (2**self.bits)


@functools.cache
def _table(sf: StateFormat, device: str) -> torch.Tensor:
    if len(sf.table_values) != 2**sf.bits:
        raise ValueError(f"state format {sf.name}: a {sf.bits}-bit map needs {2**sf.bits} codes, has {len(sf.table_values)}")
    return torch.tensor(sf.table_values, dtype=torch.float32, device=device)


@functools.cache
def _midpoints(sf: StateFormat, device: str) -> torch.Tensor:
    return torch.tensor(sf.midpoint_values, dtype=torch.float32, device=device)


# The anchors' formats (design.md, "Quantized optimizer states").
M_DE4_B128 = StateFormat("de4-b128", DE4, 128)  # Li et al. 2023: m, 4-bit signed DE, block 128
V_LINEAR4_B128 = StateFormat("linear4-b128", LINEAR4_NO_ZERO, 128)  # v, (i+1)/16, no zero
M_DE8_B256 = StateFormat("de8-b256", DE8, 256)  # bitsandbytes / torchao 8-bit, block 256
V_DE8U_B256 = StateFormat("de8u-b256", DE8_UNSIGNED, 256)
M_E4M3_B256 = StateFormat("e4m3-b256", E4M3, 256)  # FP8 m (Fishman et al. 2025: E4M3 m, E5M2 v)
V_E5M2_B256 = StateFormat("e5m2-b256", E5M2, 256)

STATE_FORMATS: dict[str, StateFormat] = {
    f.name: f for f in (M_DE4_B128, V_LINEAR4_B128, M_DE8_B256, V_DE8U_B256, M_E4M3_B256, V_E5M2_B256)
}


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened, zero-padded to whole blocks, as ``(n_blocks, block_size)`` float32 (a copy)."""
    flat = x.detach().reshape(-1).float()
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, block_size)


def from_blocks(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop the padding and restore ``shape``."""
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def pack_halves(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``(n_blocks, B)`` 4-bit codes into ``(n_blocks, B/2)`` bytes: element j low, j + B/2 high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_halves(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_halves`: ``(n_blocks, B/2)`` bytes to ``(n_blocks, B)`` codes."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


# ----------------------------------------------------------------------------------------------
# Encode / decode of normalised values
# ----------------------------------------------------------------------------------------------


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` via index_select: advanced indexing of a small table measured ~2000x slower
    on this CPU (torch 2.13)."""
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def encode_codebook_search(n: torch.Tensor, midpoints: torch.Tensor, steps: int) -> torch.Tensor:
    """Index of the nearest code (ties to the lower code): ``#{k : midpoints[k] < n}``.

    A branch-free binary search (``steps`` = log2 of the number of codes) so the Triton kernel
    runs the very same comparisons. Equal to ``lowprec.formats.encode_codebook`` (tested).
    """
    return encode_codebook_search_i32(n, midpoints, steps).to(torch.uint8)


def encode_codebook_search_i32(n: torch.Tensor, midpoints: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`encode_codebook_search` returning int32 (compiled code keeps codes in int32: inductor's
    uint8 vector arithmetic measured 30-300x slower than int32 on this CPU)."""
    idx = torch.zeros(n.shape, dtype=torch.int32, device=n.device)
    for s in (2 ** k for k in reversed(range(steps))):
        cand = idx + s
        idx = torch.where(n > _lookup(midpoints, cand - 1), cand, idx)
    return idx


def encode_fp8(n: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """FP8 bits (uint8) of ``clamp(n * fmt.max)`` rounded to nearest even (torch's cast)."""
    return (n * fmt.max).clamp(-fmt.max, fmt.max).to(fmt.dtype).view(torch.uint8)


def encode(n: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """Codes (uint8, unpacked) of normalised values ``n``."""
    if sf.is_fp8:
        return encode_fp8(n, sf.fmt)
    return encode_codebook_search(n, sf.midpoints(n.device), sf.search_steps)


def _is_linear16(sf: StateFormat) -> bool:
    """True for the 4-bit linear map without zero, ``table[i] = (i + 1) / 16``."""
    return not sf.is_fp8 and sf.table_values == tuple((i + 1) / 16 for i in range(16))


def encode4_arith(n: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """Nearest code (ties to the lower code) of a 16-code map as int32, in vector-friendly form
    for ``torch.compile`` (no table gathers, which inductor turns into scalar loops).

    * The linear map ``(i + 1) / 16``: its midpoints are ``(k + 1.5) / 16``, so the count of
      midpoints below ``n`` is ``clamp(ceil(16 n - 1.5), 0, 15)`` (``16 n - 1.5`` is exact in
      float32 wherever the clamp does not decide: Sterbenz, and both operands are multiples of
      the ulp of ``16 n``). NaN gives 0, as the comparisons do.
    * Any other 16-code map: the four steps of the binary search over the midpoints, each step's
      midpoint chosen by selects on constants (4 compares and 11 selects instead of 15 compares
      and 15 adds). The same comparisons as :func:`encode_codebook_search`, so the same codes.
    """
    if _is_linear16(sf):
        t = n * 16.0 - 1.5
        return torch.where(t > 0, torch.clamp_max(torch.ceil(t), 15.0), 0.0).to(torch.int32)
    mids = sf.midpoint_values
    if len(mids) != 15:
        raise ValueError(f"state format {sf.name}: encode4_arith needs a 16-code map")
    b3 = n > mids[7]
    b2 = n > torch.where(b3, mids[11], mids[3])
    b1 = n > torch.where(b3, torch.where(b2, mids[13], mids[9]), torch.where(b2, mids[5], mids[1]))
    b0 = n > torch.where(
        b3,
        torch.where(b2, torch.where(b1, mids[14], mids[12]), torch.where(b1, mids[10], mids[8])),
        torch.where(b2, torch.where(b1, mids[6], mids[4]), torch.where(b1, mids[2], mids[0])),
    )
    i32 = torch.int32
    return (b3.to(i32) << 3) | (b2.to(i32) << 2) | (b1.to(i32) << 1) | b0.to(i32)


def decode4_arith(codes: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """``table[codes]`` of int32 codes of a 16-code map, for ``torch.compile``: the linear map
    ``(c + 1) / 16`` exactly (power-of-two scale), any other map a tree of selects on the code's
    four bits (15 selects on constants, vectorised; a gather would be a scalar loop)."""
    if _is_linear16(sf):
        return (codes.float() + 1.0) * 0.0625
    vals: list = list(sf.table_values)
    if len(vals) != 16:
        raise ValueError(f"state format {sf.name}: decode4_arith needs a 16-code map")
    bit = 0
    while len(vals) > 1:
        b = ((codes >> bit) & 1) != 0
        vals = [torch.where(b, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
        bit += 1
    return vals[0]


def encode_i32(n: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """:func:`encode` as int32 codes, written for ``torch.compile``: a 4-bit map by
    :func:`encode4_arith` (vectorised), FP8 by a cast, an 8-bit map by the binary search."""
    if sf.is_fp8:
        return encode_fp8(n, sf.fmt).to(torch.int32)
    if sf.bits <= 4:
        return encode4_arith(n, sf)
    mids = torch.tensor(sf.midpoint_values, dtype=torch.float32, device=n.device)  # a constant when compiled
    return encode_codebook_search_i32(n, mids, sf.search_steps)


def decode_i32(codes: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """:func:`decode` of int32 codes, written for ``torch.compile``: a 4-bit map by
    :func:`decode4_arith`, a larger one a table gather, FP8 a cast."""
    if sf.is_fp8:
        return codes.to(torch.uint8).view(sf.fmt.dtype).float() * (1.0 / sf.fmt.max)
    if sf.bits <= 4:
        return decode4_arith(codes, sf)
    return _lookup(torch.tensor(sf.table_values, dtype=torch.float32, device=codes.device), codes)


def decode(codes: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """Normalised values (float32) of unpacked codes."""
    return _lookup(sf.table(codes.device), codes)


# ----------------------------------------------------------------------------------------------
# Block quantization
# ----------------------------------------------------------------------------------------------


def flush_tiny(absmax: torch.Tensor) -> torch.Tensor:
    """absmax with values below FLOAT32_TINY (and so all-zero blocks) set to 0."""
    return torch.where(absmax >= FLOAT32_TINY, absmax, torch.zeros_like(absmax))


def safe_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """``1 / absmax``, or 0 where absmax is 0 (then every element of the block is 0 too)."""
    return torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))


def block_absmax(x_blocks: torch.Tensor) -> torch.Tensor:
    """Per-block absolute maximum (``(n_blocks,)`` float32), flushed to 0 below FLOAT32_TINY."""
    return flush_tiny(x_blocks.abs().amax(dim=-1))


def quantize_blocks(x_blocks: torch.Tensor, sf: StateFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of float32 ``(n_blocks, B)`` values; 4-bit codes come packed."""
    if x_blocks.dim() != 2 or x_blocks.shape[-1] != sf.block_size:
        raise ValueError(f"state format {sf.name}: expected (n_blocks, {sf.block_size}) values, got {tuple(x_blocks.shape)}")
    absmax = block_absmax(x_blocks)
    codes = encode(x_blocks * safe_reciprocal(absmax)[:, None], sf)
    return (pack_halves(codes) if sf.packed else codes), absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """float32 ``(n_blocks, B)`` values of stored codes and per-block absmax."""
    c = unpack_halves(codes) if sf.packed else codes
    return decode(c, sf) * absmax[:, None]


def codes_shape(numel: int, sf: StateFormat) -> tuple[int, int]:
    """Shape of the uint8 codes of ``numel`` values: ``(n_blocks, B/2)`` packed 4-bit, else ``(n_blocks, B)``."""
    return num_blocks(numel, sf.block_size), sf.codes_per_block


@functools.cache
def zero_code_byte(sf: StateFormat) -> int:
    """The byte every code of an all-zero block holds (the code of 0, twice when packed): what
    :func:`quantize_blocks` writes for zeros, so a fresh state equals a quantized zero tensor."""
    codes, _ = quantize_blocks(torch.zeros(1, sf.block_size), sf)
    return int(codes[0, 0])


def zero_codes(numel: int, sf: StateFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """Codes of ``numel`` zeros (:func:`codes_shape`, every byte :func:`zero_code_byte`)."""
    return torch.full(codes_shape(numel, sf), zero_code_byte(sf), dtype=torch.uint8, device=device)


def zero_state(numel: int, sf: StateFormat, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and absmax that decode to a zero tensor (the initial moments), padded to whole blocks
    (absmax 0, so even a map without zero decodes to exact zeros)."""
    absmax = torch.zeros(num_blocks(numel, sf.block_size), dtype=torch.float32, device=device)
    return zero_codes(numel, sf, device), absmax


# ----------------------------------------------------------------------------------------------
# Rank-1 normalisation (second moment, Li et al. 2023)
# ----------------------------------------------------------------------------------------------


def as_matrix(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) view used by rank-1 normalisation and factorisation: first dim x rest."""
    if len(shape) < 2:
        raise ValueError(f"rank-1 normalisation / factorisation needs a tensor with 2+ dims; got shape {tuple(shape)}")
    rows = int(shape[0])
    return rows, math.prod(shape) // max(rows, 1)


def rank1_normaliser(row_max: torch.Tensor, col_max: torch.Tensor) -> torch.Tensor:
    """``min(row_max_i, col_max_j)`` as a (rows, cols) float32 tensor."""
    return torch.minimum(row_max[:, None], col_max[None, :])


def quantize_rank1(x2d: torch.Tensor, sf: StateFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, row_max, col_max)`` of a non-negative (rows, cols) tensor; codes in blocks of sf.block_size
    (packed half-block layout for 4-bit), padded."""
    a = x2d.abs().float()
    row_max = flush_tiny(a.amax(dim=1))
    col_max = flush_tiny(a.amax(dim=0))
    n = a * safe_reciprocal(rank1_normaliser(row_max, col_max))
    codes = encode(to_blocks(n, sf.block_size), sf)
    return (pack_halves(codes) if sf.packed else codes), row_max, col_max


def dequantize_rank1(codes: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor, sf: StateFormat) -> torch.Tensor:
    """float32 (rows, cols) values of rank-1 normalised codes."""
    c = unpack_halves(codes) if sf.packed else codes
    n = from_blocks(decode(c, sf), (row_max.numel(), col_max.numel()))
    return n * rank1_normaliser(row_max, col_max)
