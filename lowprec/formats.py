"""Number formats as data, and scaled quantize / dequantize / fake-quantize.

Three kinds of format:

* :class:`FloatFormat`: E4M3, E5M2 (OCP FP8 as torch ships them), FP16, BF16. Casts are
  torch's own round-to-nearest-even casts of the scaled value, so results are bit-identical
  to ``(x * scale).to(torch.float8_e4m3fn)``. Every cast *saturates* to ±max (torch's E5M2,
  FP16 and BF16 casts overflow to inf, so the value is clamped first); NaN stays NaN.
* :class:`IntFormat`: symmetric signed INT-k (codes -(2^(k-1)-1) .. 2^(k-1)-1) and unsigned
  INT-k (0 .. 2^k-1), round half to even, saturating.
* :class:`CodebookFormat`: a sorted table of codes in [-1, 1] (NF4, dynamic-exponent maps,
  linear maps); a value goes to the nearest code (ties to the lower code), two 4-bit codes
  are packed per byte (even element in the low nibble). Values beyond the table go to its
  end codes.

* E2M1 (FP4) is a :class:`FloatFormat` with ``dtype=None``: torch has no element-wise dtype
  for it, so it rounds through :func:`round_to_format` (the generic nearest-even / stochastic
  rounding, which also reproduces torch's casts bit for bit) and is stored as 4-bit codes.

Block-scaled formats (issue 15): :func:`mx_quantize` (OCP MX v1.0: 32-element blocks, E8M0
power-of-two scales; MXFP8 and MXFP4) and :func:`nvfp4_quantize` (16-element blocks with E4M3
scales and a float32 per-tensor scale; optional 16x16 tiles), :func:`fake_quantize_block`,
stochastic rounding with Triton-compatible Philox bits (:func:`philox_randint`).

Formats that cannot hold NaN (INT-k, code books, E2M1 in :func:`quantize`) treat NaN like +inf: it becomes the largest
code. Float formats keep NaN as NaN.

Scale convention (TransformerEngine's): ``q = cast(x * scale)``, ``x ≈ q / scale``. When no
scale is given it is computed from the absolute maximum over the granularity ("tensor",
"row" = per slice of the last dim, "block" = blocks of ``block_size`` along the last dim):
``scale = fmt.max / max(amax, AMAX_FLOOR)``, so an all-zero block gives zeros, never NaN. A
non-finite amax (a group holding inf or NaN) gives scale 1, the value TransformerEngine starts
from and keeps when amax is not usable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Granularity = Literal["tensor", "row", "block"]

AMAX_FLOOR = 1e-12  # TransformerEngine / torchao: amax clamped below before computing a scale
E8M0_BIAS = 127  # OCP MX spec: an E8M0 byte e encodes the power of two 2**(e - 127)
E8M0_NAN = 255  # OCP MX spec: the E8M0 byte 0xFF is NaN
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_MIN_NORMAL = 2.0**-126  # IEEE 754 binary32's smallest normal value


def _floor_pow2(x: torch.Tensor) -> torch.Tensor:
    """The largest power of two <= x for positive finite x, computed exactly with frexp.
    (``exp2(floor(log2(x)))`` is wrong just below a power of two, where float32 log2 rounds up
    to the integer.)"""
    _, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), e - 1)


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """A floating-point format: sign, ``exponent_bits``, ``mantissa_bits``, saturating at ``max``.

    ``dtype`` is the torch dtype that holds it element-wise, or ``None`` for formats torch has no
    dtype for (E2M1, FP4): those round through :func:`round_to_format` and are stored as 4-bit
    codes (sign in the top bit, then exponent, then mantissa: the OCP layout), two per byte.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float  # largest finite value
    min_normal: float  # smallest positive normal value
    dtype: torch.dtype | None
    bits: int

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (``min_normal == 2**emin``)."""
        return int(math.log2(self.min_normal))

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two in the format (OCP MX's ``emax_elem``)."""
        return int(math.floor(math.log2(self.max)))

    @property
    def min_subnormal(self) -> float:
        return self.min_normal * 2.0 ** -self.mantissa_bits

    def step_at(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The gap between adjacent representable values around ``|magnitude|`` (the ULP)."""
        mag = magnitude.abs().float().clamp_min(self.min_normal)
        return _floor_pow2(mag) * 2.0 ** -self.mantissa_bits


@dataclass(frozen=True)
class IntFormat:
    """A k-bit integer grid: symmetric signed (no -2^(k-1)) or unsigned."""

    name: str
    bits: int
    signed: bool = True

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.signed else 0

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def storage_dtype(self) -> torch.dtype:
        if self.bits > 16:
            raise ValueError(f"{self.name}: integer formats wider than 16 bits are not supported")
        if self.signed:
            return torch.int8 if self.bits <= 8 else torch.int16
        return torch.uint8 if self.bits <= 8 else torch.int32


@dataclass(frozen=True)
class CodebookFormat:
    """A table of sorted codes in [-1, 1]; values quantize to the nearest code."""

    name: str
    codes: tuple[float, ...]
    _table: torch.Tensor = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        table = torch.tensor(self.codes, dtype=torch.float32)
        if table.numel() < 2 or not bool((table[1:] > table[:-1]).all()):
            raise ValueError(f"code book {self.name!r}: codes must be strictly increasing and at least 2")
        if table.abs().max().item() > 1.0:
            raise ValueError(f"code book {self.name!r}: codes must lie in [-1, 1]")
        object.__setattr__(self, "_table", table)

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.codes))))

    @property
    def max(self) -> float:
        return float(self._table.abs().max())

    @property
    def table(self) -> torch.Tensor:
        """The codes as a float32 tensor (sorted)."""
        return self._table

    @property
    def midpoints(self) -> torch.Tensor:
        """Decision boundaries between adjacent codes (float32)."""
        t = self._table
        return (t[:-1] + t[1:]) * 0.5


Format = FloatFormat | IntFormat | CodebookFormat


def dynamic_exponent_map(bits: int = 8, signed: bool = True, max_exponent_bits: int | None = None) -> tuple[float, ...]:
    """A dynamic-exponent (DE) code book (Dettmers 2016; bitsandbytes' dynamic map).

    Exponent level ``i`` (values ``10**(i - E + 1)`` times a fraction) gets ``2**i`` linearly
    spaced fractions in [0.1, 1] (twice as many when unsigned, which spends no bit on the sign),
    plus the codes 0 and 1. ``E = max_exponent_bits`` defaults to ``bits - 1``. For 4 bits signed
    this gives {0, ±0.0055, ±0.0325, ±0.0775, ±0.2125, ±0.4375, ±0.6625, ±0.8875, 1}: no -1.
    """
    e = bits - 1 if max_exponent_bits is None else max_exponent_bits
    non_sign = bits - 1
    codes: list[float] = []
    extra = 2 ** (non_sign - e) - 1
    for i in range(e):
        n_frac = 2 ** (i + non_sign - e + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, n_frac + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (i - e + 1))
        codes += means.tolist()
        if signed:
            codes += (-means).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (e - 1 - e + 1))
        codes += means.tolist()
        if signed:
            codes += (-means).tolist()
    codes += [0.0, 1.0]
    out = sorted(set(float(torch.tensor(c, dtype=torch.float32)) for c in codes))
    if len(out) > 2**bits:
        raise ValueError(f"dynamic map with {bits} bits produced {len(out)} codes")
    return tuple(out)


def linear_map(bits: int = 4, include_zero: bool = False) -> tuple[float, ...]:
    """A linear code book on [0, 1]: ``(i + 1) / 2**bits`` (no zero: Li et al. 2023's map for
    Adam's second moment) or ``i / (2**bits - 1)`` (with zero)."""
    n = 2**bits
    if include_zero:
        return tuple(i / (n - 1) for i in range(n))
    return tuple((i + 1) / n for i in range(n))


# NF4 (Dettmers et al. 2023, QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

E4M3 = FloatFormat("e4m3", 4, 3, max=448.0, min_normal=2.0**-6, dtype=torch.float8_e4m3fn, bits=8)
# FP4 E2M1 (OCP MX v1.0): 1 sign, 2 exponent (bias 1), 1 mantissa bit, no Inf or NaN:
# +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Code layout: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1 = FloatFormat("e2m1", 2, 1, max=6.0, min_normal=1.0, dtype=None, bits=4)
# NVFP4's block scales are "UE4M3": the non-negative half of E4M3 (max 448). lowprec stores them
# as torch.float8_e4m3fn with the sign bit 0, the same byte a UE4M3 reader sees, so UE4M3 *is*
# E4M3 used on non-negative values (and its NaN byte 0x7F marks a block holding NaN or Inf).
UE4M3 = E4M3
E5M2 = FloatFormat("e5m2", 5, 2, max=57344.0, min_normal=2.0**-14, dtype=torch.float8_e5m2, bits=8)
FP16 = FloatFormat("fp16", 5, 10, max=65504.0, min_normal=2.0**-14, dtype=torch.float16, bits=16)
BF16 = FloatFormat("bf16", 8, 7, max=float(torch.finfo(torch.bfloat16).max), min_normal=2.0**-126,
                   dtype=torch.bfloat16, bits=16)
NF4 = CodebookFormat("nf4", NF4_CODES)
DE4 = CodebookFormat("de4", dynamic_exponent_map(4, signed=True))
DE8 = CodebookFormat("de8", dynamic_exponent_map(8, signed=True))
DE8_UNSIGNED = CodebookFormat("de8u", dynamic_exponent_map(8, signed=False))
LINEAR4_NO_ZERO = CodebookFormat("linear4", linear_map(4, include_zero=False))

_NAMED: dict[str, Format] = {
    f.name: f for f in (E4M3, E5M2, E2M1, FP16, BF16, NF4, DE4, DE8, DE8_UNSIGNED, LINEAR4_NO_ZERO)
}


def int_format(bits: int, signed: bool = True) -> IntFormat:
    """Symmetric signed (``int{bits}``) or unsigned (``uint{bits}``) integer format, 2 <= bits <= 16."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"integer formats take 2 to 16 bits; got {bits!r}")
    return IntFormat(("int" if signed else "uint") + str(bits), bits, signed)


def get_format(fmt: str | Format) -> Format:
    """A format from its name (``"e4m3"``, ``"e5m2"``, ``"e2m1"``, ``"fp16"``, ``"bf16"``, ``"int4"``,
    ``"uint8"``, ``"nf4"``, ``"de4"``, ``"de8"``, ``"linear4"``) or the format itself."""
    if isinstance(fmt, (FloatFormat, IntFormat, CodebookFormat)):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"a format is a name or a Format; got {type(fmt).__name__}")
    key = fmt.lower()
    if key in _NAMED:
        return _NAMED[key]
    for prefix, signed in (("uint", False), ("int", True)):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return int_format(int(key[len(prefix):]), signed)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(sorted(_NAMED))}, int2..int16, uint2..uint16")


def format_names() -> list[str]:
    return sorted(_NAMED) + ["int2..int16", "uint2..uint16"]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{what} has complex dtype {x.dtype}; lowprec formats quantize real floating-point tensors")
    if not x.is_floating_point():
        raise TypeError(f"{what} has non-floating-point dtype {x.dtype}; expected a floating-point tensor "
                        f"(float32, float16, bfloat16)")


def _check_scale(scale: torch.Tensor | float, what: str = "scale") -> torch.Tensor:
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
    if s.is_complex() or not s.is_floating_point():
        raise TypeError(f"{what} must be a real floating-point value, got dtype {s.dtype}")
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError(f"{what} must be finite; got non-finite values (inf or NaN)")
    if s.numel() and not bool((s > 0).all()):
        raise ValueError(f"{what} must be positive; got a zero or negative value (min {s.min().item()})")
    return s.float()


def _check_block(x: torch.Tensor, block_size: int | None) -> int:
    if block_size is None or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"granularity 'block' needs a positive integer block_size; got {block_size!r}")
    if x.dim() == 0 or x.shape[-1] % block_size:
        last = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"block_size {block_size} does not divide the last dimension ({last}); "
                         f"pad the tensor or choose a block size that divides it")
    return block_size


def _group_shape(x: torch.Tensor, granularity: Granularity, block_size: int | None) -> tuple[int, ...]:
    """The shape of one scale per group (what :func:`amax` returns)."""
    if granularity == "tensor":
        return ()
    if x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one dimension")
    if granularity == "row":
        return (*x.shape[:-1], 1)
    return (*x.shape[:-1], x.shape[-1] // block_size, 1)


def _check_scale_shape(s: torch.Tensor, x: torch.Tensor, granularity: Granularity, block_size: int | None) -> None:
    want = _group_shape(x, granularity, block_size)
    if s.numel() == 1:
        return
    try:
        ok = torch.broadcast_shapes(tuple(s.shape), want) == torch.Size(want)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"scale of shape {tuple(s.shape)} does not fit granularity {granularity!r} for x of shape "
                         f"{tuple(x.shape)}; expected a scalar or shape {want} (one scale per group)")


# ----------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------


def amax(x: torch.Tensor, granularity: Granularity = "tensor", block_size: int | None = None) -> torch.Tensor:
    """Absolute maximum over each group: shape () per tensor, (..., 1) per row, (..., n_blocks, 1) per block.
    NaN propagates (torch.amax does)."""
    a = x.detach().abs()
    if granularity == "tensor":
        return a.amax().float() if a.numel() else torch.zeros((), device=x.device)
    if granularity == "row":
        if x.dim() == 0:
            raise ValueError("granularity 'row' needs a tensor with at least one dimension")
        if x.shape[-1] == 0:
            return torch.zeros(*x.shape[:-1], 1, device=x.device)
        return a.amax(dim=-1, keepdim=True).float()
    if granularity == "block":
        n = _check_block(x, block_size)
        if x.shape[-1] == 0:
            return torch.zeros(*x.shape[:-1], 0, 1, device=x.device)
        return a.reshape(*x.shape[:-1], x.shape[-1] // n, n).amax(dim=-1, keepdim=True).float()
    raise ValueError(f"granularity must be 'tensor', 'row' or 'block'; got {granularity!r}")


def scale_from_amax(amax: torch.Tensor, fmt: str | Format, power_of_two: bool = False, margin: int = 0) -> torch.Tensor:
    """``fmt.max / max(amax, AMAX_FLOOR) / 2**margin`` in float32, optionally rounded down to a
    power of two, and capped at the float32 maximum (BF16's max over the floor would overflow).

    A non-finite amax (inf or NaN) gives scale 1: callers that keep a history should keep their
    previous scale instead (TransformerEngine does both).
    """
    f = get_format(fmt)
    a = amax.float()
    # A tensor-by-tensor division, correctly rounded: ``python_float / tensor`` is computed by torch
    # as ``reciprocal(tensor) * python_float`` (two roundings), which a kernel would not reproduce.
    s = torch.div(torch.full_like(a, f.max), a.clamp_min(AMAX_FLOOR)) / (2.0**margin)
    s = s.clamp_max(FLOAT32_MAX)
    if power_of_two:
        s = _floor_pow2(s)
    return torch.where(torch.isfinite(a), s, torch.ones_like(s))


def to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Encode power-of-two scales as E8M0 bytes (uint8, bias 127); a non-power-of-two is rounded
    down, and exponents outside [-127, 127] are clamped."""
    _, e = torch.frexp(_check_scale(scale))
    return ((e - 1).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def from_e8m0(code: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 bytes to float32 powers of two (0xFF is NaN)."""
    v = torch.exp2(code.float() - E8M0_BIAS)
    return torch.where(code == E8M0_NAN, torch.full_like(v, float("nan")), v)


# ----------------------------------------------------------------------------------------------
# Quantize / dequantize
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedTensor:
    """A quantized tensor: ``data`` (format dtype, integer codes, or packed 4-bit codes) and the
    float32 ``scale`` to divide by. ``shape`` is the original shape."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    shape: torch.Size
    granularity: Granularity = "tensor"
    block_size: int | None = None
    packed: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """True storage: codes plus scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _grouped(x: torch.Tensor, granularity: Granularity, block_size: int | None) -> torch.Tensor:
    """View x so that a per-group scale of amax()'s shape broadcasts against it."""
    if granularity == "block":
        return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    return x


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 in [0, 15]), flattened, two per byte: even index in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit codes as uint8."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)
    return out[:numel]


def encode_codebook(x_scaled: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """Index of the nearest code for each (already scaled) value: the number of midpoints below
    it (``torch.bucketize(x, midpoints)``), so ties go to the lower code, values beyond the table
    go to its end codes, and NaN goes to the largest code.

    Small tables (4-bit) count comparisons, about twice as fast on a CPU as ``torch.bucketize``,
    which large tables use.
    """
    v = x_scaled.float()
    mids = fmt.midpoints.to(v.device)
    n = mids.numel()
    if n <= 15:
        idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
        for m in mids.tolist():
            idx += v > m
    else:
        idx = torch.bucketize(v.contiguous(), mids, right=False, out_int32=True).to(torch.uint8)
    return idx.masked_fill_(torch.isnan(v), n)


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    scale: torch.Tensor | float | None = None,
    granularity: Granularity = "tensor",
    block_size: int | None = None,
    pack: bool = True,
) -> QuantizedTensor:
    """Quantize ``x`` to ``fmt`` with ``scale`` (computed from amax over the granularity when None)."""
    _check_input(x)
    f = get_format(fmt)
    if granularity == "block":
        _check_block(x, block_size)
    elif granularity not in ("tensor", "row"):
        raise ValueError(f"granularity must be 'tensor', 'row' or 'block'; got {granularity!r}")
    if scale is None:
        s = scale_from_amax(amax(x, granularity, block_size), f)
    else:
        s = _check_scale(scale).to(x.device)
        _check_scale_shape(s, x, granularity, block_size)
    xs = _grouped(x.float(), granularity, block_size) * s
    if isinstance(f, FloatFormat) and f.dtype is None:
        codes = encode_float_codes(round_to_format(xs, f), f).reshape(x.shape)
        packed = pack and f.bits <= 4
        data = pack_nibbles(codes) if packed else codes
    elif isinstance(f, FloatFormat):
        data = xs.clamp_(-f.max, f.max).to(f.dtype).reshape(x.shape)
        packed = False
    elif isinstance(f, IntFormat):
        # In place on the fresh product: every extra temporary costs a full pass of page faults on a CPU.
        xs = xs.nan_to_num_(nan=float(f.qmax))  # no NaN code: NaN goes where +inf goes
        data = xs.round_().clamp_(f.qmin, f.qmax).to(f.storage_dtype).reshape(x.shape)
        packed = False
    else:
        codes = encode_codebook(xs, f).reshape(x.shape)
        packed = pack and f.bits <= 4
        data = pack_nibbles(codes) if packed else codes
    return QuantizedTensor(data, s, f, x.shape, granularity, block_size, packed)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``q`` stands for, in ``dtype``."""
    f = q.fmt
    if isinstance(f, CodebookFormat):
        codes = unpack_nibbles(q.data, math.prod(q.shape)) if q.packed else q.data
        vals = f.table.to(codes.device)[codes.long()].reshape(q.shape)
    elif isinstance(f, FloatFormat) and f.dtype is None:
        codes = unpack_nibbles(q.data, math.prod(q.shape)) if q.packed else q.data
        vals = decode_float_codes(codes, f).reshape(q.shape)
    else:
        vals = q.data.float()
    out = _grouped(vals, q.granularity, q.block_size) / q.scale
    return out.reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str | Format,
    scale: torch.Tensor | float | None = 1.0,
    granularity: Granularity = "tensor",
    block_size: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in x's dtype. ``scale=1`` by default: ``fake_quantize(x, "e4m3")``
    is x cast to E4M3 and back. Pass ``scale=None`` to scale by amax over the granularity."""
    q = quantize(x, fmt, scale, granularity, block_size, pack=False)
    return dequantize(q, x.dtype)


def half_step(x: torch.Tensor, fmt: str | Format, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Half the gap between representable values around each ``x * scale``, in x's units:
    the largest round-to-nearest error a value inside the format's range can have."""
    f = get_format(fmt)
    s = torch.as_tensor(scale, dtype=torch.float32)
    xs = x.float() * s
    if isinstance(f, FloatFormat):
        return f.step_at(xs) / 2 / s
    if isinstance(f, IntFormat):
        return torch.full_like(xs, 0.5) / s
    t = f.table.to(x.device)
    idx = torch.bucketize(xs.clamp(float(t[0]), float(t[-1])), t).clamp(1, t.numel() - 1)
    return (t[idx] - t[idx - 1]) / 2 / s


# ----------------------------------------------------------------------------------------------
# Generic rounding to a float grid (nearest-even and stochastic), and Triton's Philox
# ----------------------------------------------------------------------------------------------

ROUNDINGS = ("nearest", "stochastic")
_U32 = 0xFFFFFFFF
# Philox 4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): the round
# multipliers and Weyl key increments, as Triton's tl.randint uses them.
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
SR_RANDOM_BITS = 24  # stochastic rounding compares the top 24 bits of each random uint32


def _mul32_split(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * c`` for a 32-bit constant ``a`` and int64 tensor ``c``
    holding values in [0, 2**32), without overflowing int64 (``c`` split into 16-bit halves)."""
    c_hi, c_lo = c >> 16, c & 0xFFFF
    t_lo = a * c_lo  # < 2**48
    t = a * c_hi + (t_lo >> 16)  # < 2**49: a * c == t * 2**16 + (t_lo & 0xFFFF)
    return t >> 16, ((t & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def _mul32_wrap(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_mul32_split`, from one int64 product that wraps modulo 2**64 (its bits are the
    unsigned 64-bit product): 4 tensor ops instead of 11. Used only where :func:`_wrap_ok` has
    verified that torch's int64 multiply wraps on that device type."""
    p = c * a
    return (p >> 32) & _U32, p & _U32


_WRAP_OK: dict[str, bool] = {}


def _wrap_ok(device: torch.device) -> bool:
    """Whether int64 multiplication wraps modulo 2**64 on ``device`` (checked once per device
    type against the overflow-free split product, on values that overflow)."""
    key = device.type
    if key not in _WRAP_OK:
        c = torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, _U32])
        c = torch.cat([c, torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(0))]).to(device)
        _WRAP_OK[key] = all(
            torch.equal(x, y) for a in (PHILOX_ROUND_A, PHILOX_ROUND_B)
            for x, y in zip(_mul32_wrap(a, c), _mul32_split(a, c)))
    return _WRAP_OK[key]


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The uint32 that Triton's ``tl.randint(seed, offsets)`` returns, as an int64 tensor in
    [0, 2**32) of ``offsets``' shape.

    Philox 4x32 with 10 rounds, as in ``triton/language/random.py``: key = (low, high) 32-bit
    words of ``seed`` as a uint64 (a negative seed is taken two's complement, as Triton's cast
    does), counter = (low word of the offset, high word of the offset, 0, 0), result = the first
    output word. Offsets are read as int64, so this equals a kernel that passes int64 offsets;
    int32 offsets in a kernel give the same numbers for 0 <= offset < 2**31.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"philox_randint: seed must be an int, got {type(seed).__name__}")
    if not isinstance(offsets, torch.Tensor) or offsets.is_floating_point() or offsets.is_complex():
        raise TypeError("philox_randint: offsets must be an integer tensor")
    off = offsets.to(torch.int64)
    k0, k1 = philox_key(seed)
    mul32 = _mul32_wrap if _wrap_ok(off.device) else _mul32_split
    return _philox(off, k0, k1, mul32)


def philox_key(seed: int) -> tuple[int, int]:
    """Philox's key: the (low, high) 32-bit words of ``seed`` as a uint64 (two's complement)."""
    seed64 = seed & 0xFFFFFFFFFFFFFFFF
    return seed64 & _U32, seed64 >> 32


def _philox(off: torch.Tensor, k0, k1, mul32) -> torch.Tensor:
    """The Philox rounds of :func:`philox_randint` on int64 ``off``; the key words ``k0``, ``k1`` are
    ints or int64 tensors (a compiled caller passes tensors, so a new seed is data, not a new graph),
    ``mul32`` is :func:`_mul32_wrap` or :func:`_mul32_split` (the same words)."""
    c0 = off & _U32
    c1 = (off >> 32) & _U32
    c2 = torch.zeros_like(off)
    c3 = torch.zeros_like(off)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _U32, (k1 + PHILOX_KEY_B) & _U32
    return c0


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0**k`` in float32 for integer k in [-149, 127], built from the bit pattern (exact,
    subnormals included; ``exp2`` and ``ldexp`` would overflow or round on the way)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(1, 254) << 23
    sub = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, sub).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for positive finite float32 a (subnormals included), int32, from frexp.

    Inside a graph being compiled it is read from the bit pattern instead (the same integer for
    every positive finite float32; other inputs, which every caller masks, may differ): Inductor's
    CPU code calls ``frexp`` one element at a time, while bit operations vectorise. Subnormals are
    first scaled by 2**64 (exact) so that their exponent field is a normal one."""
    if not torch.compiler.is_compiling():
        return torch.frexp(a)[1] - 1
    small = a < FLOAT32_MIN_NORMAL
    bits = torch.where(small, a * 2.0**64, a).view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    return torch.where(small, e - 64, e)


def _round_float(x: torch.Tensor, fmt: FloatFormat, rounding: str, seed: int | None,
                 offsets: torch.Tensor | None) -> torch.Tensor:
    """Round float32 ``x`` to ``fmt``'s grid; ``offsets`` (int64, x's shape) index the random stream."""
    bits = None
    if rounding != "nearest":
        assert offsets is not None and seed is not None
        bits = sr_bits(philox_randint(seed, offsets))
    return _round_to_grid(x, fmt, bits)


def sr_bits(words: torch.Tensor) -> torch.Tensor:
    """The top :data:`SR_RANDOM_BITS` bits of Philox words (int64 in [0, 2**32)) as float32 (exact,
    below 2**24): what stochastic rounding compares against ``frac * 2**24``."""
    return (words >> (32 - SR_RANDOM_BITS)).to(torch.float32)


def _round_to_grid(x: torch.Tensor, fmt: FloatFormat, bits: torch.Tensor | None) -> torch.Tensor:
    """The arithmetic of :func:`_round_float`: nearest-even when ``bits`` is None, else stochastic
    with ``bits`` (:func:`sr_bits` of each element's Philox word, x's shape)."""
    a = x.abs().clamp_max(fmt.max)  # saturate first (inf too); max is on the grid; NaN stays NaN
    # The spacing of the grid around a: 2**(max(floor(log2 a), emin) - mantissa_bits). Zero gives
    # frexp exponent 0, below every emin here, so it gets the subnormal spacing.
    e = torch.where(a > 0, _floor_log2(a), torch.full_like(a, fmt.emin, dtype=torch.int32))
    q = _pow2(e.clamp_min(fmt.emin) - fmt.mantissa_bits)
    n = a / q  # exact: a power-of-two division whose result has at most 24 significant bits
    if bits is None:
        r = torch.round(n)  # half to even
    else:
        lo = torch.floor(n)
        frac = n - lo  # exact in float32, in [0, 1)
        r = lo + (bits < frac * float(2**SR_RANDOM_BITS)).to(torch.float32)
    out = (r * q).clamp_max(fmt.max)  # exact; clamp: rounding up at the top binade
    return torch.copysign(out, x)


def round_to_format(
    x: torch.Tensor,
    fmt: str | FloatFormat,
    rounding: str = "nearest",
    *,
    seed: int | None = None,
    offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Round already-scaled ``x`` to ``fmt``'s grid, in float32, saturating at ``±fmt.max``.

    ``x`` is first converted to float32 (exact for bf16/fp16/fp8 inputs). ±inf saturate to
    ±max, as every cast in this module does; NaN stays NaN in the float32 result (E2M1 has no
    NaN code: the MX and NVFP4 quantizers mark such blocks with a NaN block scale instead, and
    :func:`quantize` stores NaN as the largest code, as for code books). The sign of zero is kept.

    ``"nearest"``: round to nearest, ties to even; bit-identical to torch's casts
    (``x.clamp(-max, max).to(dtype)``) for e4m3, e5m2, fp16 and bf16, subnormals included.
    The algorithm, which a kernel reproduces exactly: ``q = 2**(max(floor(log2|x|), emin) - m)``
    (the grid spacing at |x|), ``n = |x| / q`` (exact), ``round_half_even(n) * q``.

    ``"stochastic"``: with ``lo``/``hi`` the neighbours of |x| on the grid and
    ``frac = n - floor(n) = (|x| - lo) / (hi - lo)`` (exact in float32), element i (flat index
    in ``x``) draws ``u = philox_randint(seed, offset + i)`` and rounds up iff
    ``(u >> 8) < frac * 2**24``, compared in float32 (both sides exact). A Triton kernel gets
    the same bits from ``tl.randint(seed, offset + i) >> 8``. Why this rule: the probability of
    rounding up is ``ceil(frac * 2**24) / 2**24``, which *equals* ``frac`` whenever frac has at
    most 24 fractional bits; it does for every |x| >= (hi - lo) / 2 (a float32 has 24 significant
    bits and n < 2**(m+1)), so rounding is exactly unbiased there. Only inputs below half the
    smallest subnormal step (which round to 0 or to that step) can have longer fractions; their
    bias is below ``2**-24`` of a step. The result is always ``lo`` or ``hi`` (hi clamped to max).
    ``seed=None`` draws a seed from torch's global generator (reproducible under
    ``torch.manual_seed``). ``offset`` is an int or an integer tensor broadcastable to ``x``
    (e.g. a device-side counter), added to the flat index.
    """
    _check_input(x)
    f = get_format(fmt)
    if not isinstance(f, FloatFormat):
        raise TypeError(f"round_to_format: fmt must be a float format (e2m1, e4m3, e5m2, fp16, bf16); got {f.name!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
    xf = x.float()
    offsets = None
    if rounding == "stochastic":
        seed = _resolve_seed(seed)
        offsets = _offsets(offset, xf)
    return _round_float(xf, f, rounding, seed, offsets)


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return seed


def _offsets(offset: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    if isinstance(offset, torch.Tensor):
        if offset.is_floating_point() or offset.is_complex():
            raise TypeError(f"offset must be an int or an integer tensor; got dtype {offset.dtype}")
        return idx + offset.to(device=x.device, dtype=torch.int64)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an integer tensor; got {type(offset).__name__}")
    return idx + offset


def encode_float_codes(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit codes (uint8) of values already on ``fmt``'s grid, for a format with no torch dtype
    (E2M1): sign in bit ``bits - 1``, then the exponent field, then the mantissa (OCP layout).
    NaN gets the largest positive code (no NaN code: as code books do); -0 keeps its sign bit."""
    if fmt.bits > 8:
        raise ValueError(f"{fmt.name}: codes are only defined for formats of at most 8 bits")
    v = values.float()
    nan = torch.isnan(v)
    a = v.abs().nan_to_num(nan=fmt.max).clamp_max(fmt.max)
    m = fmt.mantissa_bits
    e = torch.where(a >= fmt.min_normal, _floor_log2(a.clamp_min(fmt.min_normal)),
                    torch.full_like(a, fmt.emin - 1, dtype=torch.int32))
    # normal: field = e - emin + 1, mantissa = (a / 2**e - 1) * 2**m; subnormal: field 0, a / step
    mant = torch.where(e >= fmt.emin, a / _pow2(e - m) - 2**m, a / fmt.min_subnormal)
    mag = ((e - fmt.emin + 1).clamp_min(0) << m) + mant.to(torch.int32)
    sign = torch.signbit(v) & ~nan
    return (mag | (sign.to(torch.int32) << (fmt.bits - 1))).to(torch.uint8)


def decode_float_codes(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Float32 values of ``fmt`` bit codes (the inverse of :func:`encode_float_codes`)."""
    c = codes.to(torch.int32)
    m = fmt.mantissa_bits
    field_ = (c >> m) & ((1 << fmt.exponent_bits) - 1)
    mant = (c & ((1 << m) - 1)).float()
    normal = _pow2(field_ - 1 + fmt.emin) * (1.0 + mant * 2.0**-m)
    val = torch.where(field_ > 0, normal, mant * fmt.min_subnormal)
    sign = (c >> (fmt.bits - 1)) & 1
    return torch.where(sign.bool(), -val, val)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension (even index in the low nibble);
    the last dimension must be even. Shape (..., n) -> (..., n // 2)."""
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dimension must be even; got shape {tuple(codes.shape)}")
    return pack_nibbles(codes).reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def unpack_fp4(packed: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: shape (..., n // 2) -> (..., n); with ``numel``, the first
    ``numel`` codes of the flattened tensor instead."""
    if numel is not None:
        return unpack_nibbles(packed.reshape(-1), numel)
    return unpack_nibbles(packed.reshape(-1), packed.numel() * 2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------------------------
# Block-scaled formats: OCP MX and NVFP4
# ----------------------------------------------------------------------------------------------

MX_BLOCK = 32  # OCP MX v1.0: elements per shared E8M0 scale
NVFP4_BLOCK = 16  # NVIDIA NVFP4: elements per E4M3 block scale
NVFP4_TENSOR_SCALE_NUMERATOR = 448.0 * 6.0  # E4M3 max x E2M1 max (arXiv 2509.25149)
MX_ELEMENTS: dict[str, FloatFormat] = {"e4m3": E4M3, "e5m2": E5M2, "e2m1": E2M1}
BLOCK_SCHEMES = ("mxfp8", "mxfp8_e5m2", "mxfp4", "nvfp4")
E4M3_NAN_BYTE = 0x7F  # float8_e4m3fn's NaN (sign bit 0)


def _blocked(x: torch.Tensor, dim: int, block: int, what: str) -> tuple[torch.Tensor, int]:
    """x as float32 with ``dim`` moved last and zero-padded to a multiple of ``block``."""
    _check_input(x, what)
    if x.dim() == 0:
        raise ValueError(f"{what} is 0-d; block quantization needs at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{what}: dim {dim} is out of range for a {x.dim()}-d tensor")
    xt = x.float().movedim(dim, -1)
    pad = -xt.shape[-1] % block
    if pad:
        xt = torch.nn.functional.pad(xt, (0, pad))
    return xt, dim % x.dim()


def _crop_back(vals: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim))
    return vals[..., : moved[-1]].movedim(-1, dim).reshape(shape)


def _block_offsets(shape: torch.Size, dim: int, block: int, device: torch.device) -> torch.Tensor:
    """Flat row-major index in the ORIGINAL tensor of each element of the blocked layout (padding
    gets indices past the end, never shared with a real element)."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device).reshape(shape).movedim(dim, -1)
    pad = -idx.shape[-1] % block
    if pad:
        idx = torch.cat([idx, n + torch.arange(math.prod(idx.shape[:-1]) * pad, dtype=torch.int64, device=device)
                         .reshape(*idx.shape[:-1], pad)], dim=-1)
    return idx


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")


@dataclass
class MXTensor:
    """An OCP MX block-scaled tensor.

    Layout: the blocked dimension ``dim`` is moved last and zero-padded to a multiple of
    ``block_size`` (the layout a block-scaled GEMM reads: the reduction dimension contiguous).
    ``data``: (..., n_padded) in the fp8 dtype for e4m3/e5m2, or (..., n_padded // 2) uint8 with
    two E2M1 codes per byte (even element in the low nibble) for e2m1. ``scale``: (..., n_blocks)
    uint8 E8M0 codes (2**(code - 127); 0xFF is NaN). ``shape`` is the original shape.
    """

    data: torch.Tensor
    scale: torch.Tensor
    elem: str
    shape: torch.Size
    dim: int
    block_size: int = MX_BLOCK

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mx_dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """Storage: element codes plus one byte per block."""
        return self.data.numel() * self.data.element_size() + self.scale.numel()


def _mx_scaled(xb: torch.Tensor, f: FloatFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`mx_quantize` on blocks ``xb`` (..., n_blocks, block): each block's
    E8M0 exponent ``e`` (int32, (..., n_blocks, 1)), whether it holds NaN/Inf (``bad``), and the
    elements to round, ``xb / 2**e`` (zeros in bad blocks)."""
    amax_b = xb.abs().amax(dim=-1, keepdim=True)  # NaN and inf propagate
    bad = ~torch.isfinite(amax_b)
    pos = amax_b > 0
    e = torch.where(pos & ~bad, _floor_log2(amax_b.clamp_min(1e-45)) - f.emax, -E8M0_BIAS)
    e = e.clamp(-E8M0_BIAS, E8M0_BIAS)
    return e, bad, torch.where(bad, 0.0, xb / _pow2(e))


def mx_quantize(
    x: torch.Tensor,
    elem: str = "e4m3",
    *,
    dim: int = -1,
    block_size: int = MX_BLOCK,
    rounding: str = "nearest",
    seed: int | None = None,
) -> MXTensor:
    """OCP MX v1.0 quantization along ``dim`` in blocks of ``block_size``.

    Scale rule (the spec's): ``X = 2**(floor(log2(block amax)) - emax_elem)`` with emax 8 (e4m3),
    15 (e5m2), 2 (e2m1), the exponent clamped to E8M0's [-127, 127]; an all-zero block takes the
    smallest scale 2**-127 (floor(log2 0) = -inf, clamped), and its elements are zeros. Elements
    are ``x / X`` rounded to the element format (``rounding``, see :func:`round_to_format`) with
    saturation at its max. A block holding NaN or ±Inf gets the E8M0 NaN code 0xFF and zero
    elements, so it dequantizes to NaN; other blocks are unaffected.

    A blocked dimension that is not a multiple of ``block_size`` is padded with zeros for the
    block computation (zeros do not change an amax, so the ragged last block is quantized like a
    full one) and cropped back by :func:`mx_dequantize`. Stochastic rounding uses the Philox
    stream at each element's flat row-major index in the original ``x``.
    """
    if elem not in MX_ELEMENTS:
        raise ValueError(f"mx_quantize: elem must be one of {tuple(MX_ELEMENTS)}; got {elem!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"mx_quantize: block_size must be a positive even integer; got {block_size!r}")
    _check_rounding(rounding)
    f = MX_ELEMENTS[elem]
    xt, d = _blocked(x, dim, block_size, "mx_quantize: x")
    xb = xt.reshape(*xt.shape[:-1], xt.shape[-1] // block_size, block_size)
    e, bad, xs = _mx_scaled(xb, f)
    seed_ = _resolve_seed(seed) if rounding == "stochastic" else None
    offs = _block_offsets(x.shape, d, block_size, x.device).reshape(xb.shape) if seed_ is not None else None
    vals = _round_float(xs, f, rounding, seed_, offs).reshape(xt.shape)
    code = torch.where(bad, E8M0_NAN, e + E8M0_BIAS).to(torch.uint8).squeeze(-1)
    data = pack_fp4(encode_float_codes(vals, f)) if f.dtype is None else vals.to(f.dtype)
    return MXTensor(data, code, elem, x.shape, d, block_size)


def mx_dequantize(q: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``q`` stands for, in ``dtype``, in the original shape (blocks with scale 0xFF are NaN)."""
    f = MX_ELEMENTS[q.elem]
    vals = decode_float_codes(unpack_fp4(q.data), f) if f.dtype is None else q.data.float()
    vals = vals.reshape(*vals.shape[:-1], vals.shape[-1] // q.block_size, q.block_size)
    s = q.scale.to(torch.int32).unsqueeze(-1)
    scale = torch.where(s == E8M0_NAN, float("nan"), _pow2(s.clamp_max(254) - E8M0_BIAS))
    out = (vals * scale).reshape(*vals.shape[:-2], vals.shape[-2] * q.block_size)
    return _crop_back(out, q.shape, q.dim).to(dtype)


@dataclass
class NVFP4Tensor:
    """An NVFP4 tensor: E2M1 elements, an E4M3 scale per block, a float32 scale per tensor.

    Layout as :class:`MXTensor`'s: ``dim`` moved last, padded to a multiple of 16. ``data``:
    (..., n_padded // 2) uint8, two E2M1 codes per byte. ``block_scale``: float8_e4m3fn, one per
    1x16 block, (..., n_padded // 16); with ``block_2d`` one per 16x16 tile, (rows_padded // 16,
    n_padded // 16) in the same (moved) orientation. ``tensor_scale``: the float32 *encode* scale
    ``448 * 6 / tensor_amax`` (lowprec's convention: multiply to encode, divide to decode).
    A value decodes as ``e2m1 * (float(block_scale) / tensor_scale)``.
    """

    data: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor
    shape: torch.Size
    dim: int
    block_2d: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4_dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """Storage: packed codes, one byte per block scale, four for the tensor scale."""
        return self.data.numel() + self.block_scale.numel() + 4


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor encode scale ``448 * 6 / amax`` (float32, correctly rounded), capped at
    the float32 max; 1.0 for amax 0 (an all-zero tensor: any scale gives zeros)."""
    a = amax.float()
    s = torch.div(torch.full_like(a, NVFP4_TENSOR_SCALE_NUMERATOR), a).clamp_max(FLOAT32_MAX)
    return torch.where(a > 0, s, torch.ones_like(s))


def _nvfp4_scaled(xb: torch.Tensor, amax_b: torch.Tensor, S: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`nvfp4_quantize` on blocks ``xb`` with block amaxes ``amax_b``
    (broadcastable to ``xb``) and encode scale ``S``: the E4M3 block scale ``sb`` (float32 value),
    its decode ``db = sb / S``, whether the block holds NaN/Inf (``bad``), and the elements to
    round, ``xb / db`` (zeros in bad blocks and blocks whose scale is 0)."""
    bad = ~torch.isfinite(amax_b)
    sb = _round_float(torch.where(bad, 0.0, amax_b / 6.0 * S), E4M3, "nearest", None, None)
    db = sb / S
    xs = torch.where(bad | (sb == 0), 0.0, xb / db)
    return sb, db, bad, xs


def nvfp4_quantize(
    x: torch.Tensor,
    *,
    dim: int = -1,
    block_2d: bool = False,
    tensor_amax: torch.Tensor | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
) -> NVFP4Tensor:
    """NVFP4 quantization (NVIDIA, "Pretraining LLMs with NVFP4", arXiv 2509.25149).

    Two levels of scale, computed in float32 in this order (a kernel reproduces it exactly):

    1. ``S = 448 * 6 / tensor_amax`` (:func:`nvfp4_tensor_scale`), tensor_amax = max |x| over the
       *finite* values (or the caller's ``tensor_amax``, e.g. all-reduced across ranks), so block
       scales fit E4M3;
    2. per block (1x16 along ``dim``, or 16x16 tiles with ``block_2d``):
       ``s_b = e4m3_rne((amax_b / 6) * S)`` (saturating at 448), decoded ``d_b = float(s_b) / S``;
    3. elements ``e2m1(x / d_b)`` with ``rounding``, saturating at ±6.

    A block whose scale rounds to 0 (amax_b far below the tensor's) quantizes to zeros. A block
    holding NaN or ±Inf gets the E4M3 NaN byte (0x7F) as its scale and zero elements, so it
    dequantizes to NaN; the tensor amax ignores non-finite values, so other blocks are
    unaffected. An all-zero tensor gives zeros. Ragged sizes: padded with zeros and cropped back,
    as in :func:`mx_quantize`. ``block_2d`` (2-D tensors) shares one scale per 16x16 tile, so
    ``W`` and ``W.T`` (or ``dim=0`` and ``dim=1``) quantize to the same values under "nearest".
    """
    _check_rounding(rounding)
    _check_input(x, "nvfp4_quantize: x")
    if block_2d and x.dim() != 2:
        raise ValueError(f"nvfp4_quantize: block_2d needs a 2-D tensor; got shape {tuple(x.shape)}")
    B = NVFP4_BLOCK
    xt, d = _blocked(x, dim, B, "nvfp4_quantize: x")
    if tensor_amax is None:
        xa = xt.abs()
        tamax = torch.where(torch.isfinite(xa), xa, 0.0).amax() if xa.numel() else xa.new_zeros(())
    else:
        if not isinstance(tensor_amax, torch.Tensor) or tensor_amax.numel() != 1:
            raise TypeError("nvfp4_quantize: tensor_amax must be a one-element tensor")
        tamax = tensor_amax.detach().float().reshape(()).to(x.device)
        if not bool(torch.isfinite(tamax)) or float(tamax) < 0:
            raise ValueError(f"nvfp4_quantize: tensor_amax must be finite and >= 0; got {float(tamax)}")
    S = nvfp4_tensor_scale(tamax)
    if block_2d:
        pad_r = -xt.shape[0] % B
        if pad_r:
            xt = torch.nn.functional.pad(xt, (0, 0, 0, pad_r))
        R, C = xt.shape
        tiles = xt.reshape(R // B, B, C // B, B)
        amax_b = tiles.abs().amax(dim=(1, 3), keepdim=True)  # (R/B, 1, C/B, 1)
        xb = tiles
    else:
        xb = xt.reshape(*xt.shape[:-1], xt.shape[-1] // B, B)
        amax_b = xb.abs().amax(dim=-1, keepdim=True)
    sb, db, bad, xs = _nvfp4_scaled(xb, amax_b, S)
    seed_ = _resolve_seed(seed) if rounding == "stochastic" else None
    offs = None
    if seed_ is not None:
        offs = _block_offsets(x.shape, d, B, x.device)
        if block_2d and offs.shape[0] != xt.shape[0]:
            extra = torch.arange(offs.numel(), offs.numel() + (xt.shape[0] - offs.shape[0]) * xt.shape[1],
                                 dtype=torch.int64, device=x.device) + math.prod(x.shape)
            offs = torch.cat([offs, extra.reshape(xt.shape[0] - offs.shape[0], xt.shape[1])])
        offs = offs.reshape(xb.shape)
    vals = _round_float(xs, E2M1, rounding, seed_, offs).reshape(xt.shape)
    scale_byte = torch.where(bad, torch.tensor(E4M3_NAN_BYTE, dtype=torch.uint8, device=x.device),
                             sb.to(torch.float8_e4m3fn).view(torch.uint8))
    block_scale = scale_byte.view(torch.float8_e4m3fn)
    block_scale = block_scale.reshape(amax_b.shape[0], amax_b.shape[2]) if block_2d else block_scale.squeeze(-1)
    data = pack_fp4(encode_float_codes(vals, E2M1))
    return NVFP4Tensor(data, block_scale, S, x.shape, d, block_2d)


def nvfp4_dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``q`` stands for, in ``dtype`` and the original shape."""
    B = NVFP4_BLOCK
    vals = decode_float_codes(unpack_fp4(q.data), E2M1)
    db = q.block_scale.float() / q.tensor_scale  # NaN scale -> NaN block
    if q.block_2d:
        R, C = vals.shape
        out = (vals.reshape(R // B, B, C // B, B) * db[:, None, :, None]).reshape(R, C)
    else:
        out = (vals.reshape(*vals.shape[:-1], vals.shape[-1] // B, B) * db.unsqueeze(-1)).reshape(vals.shape)
    if q.block_2d:
        moved = list(q.shape)
        moved.append(moved.pop(q.dim))
        out = out[: moved[0]]
    return _crop_back(out, q.shape, q.dim).to(dtype)


def fake_quantize_block(
    x: torch.Tensor,
    scheme: str,
    *,
    dim: int = -1,
    rounding: str = "nearest",
    seed: int | None = None,
    block_2d: bool = False,
    tensor_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a block-scaled GEMM sees of ``x``: quantize to ``scheme`` along ``dim`` and back, in
    x's dtype. ``scheme``: "mxfp8" (MX, E4M3 elements), "mxfp8_e5m2", "mxfp4" (MX, E2M1) or
    "nvfp4" (``block_2d`` and ``tensor_amax`` apply to NVFP4 only). No gradient flows through it
    (wrap it in a straight-through estimator to train through it)."""
    if scheme not in BLOCK_SCHEMES:
        raise ValueError(f"fake_quantize_block: scheme must be one of {BLOCK_SCHEMES}; got {scheme!r}")
    with torch.no_grad():
        if scheme == "nvfp4":
            q = nvfp4_quantize(x, dim=dim, block_2d=block_2d, tensor_amax=tensor_amax, rounding=rounding, seed=seed)
            return nvfp4_dequantize(q, x.dtype)
        if block_2d:
            raise ValueError(f"fake_quantize_block: block_2d applies to 'nvfp4' only, not {scheme!r}")
        if tensor_amax is not None:
            raise ValueError(f"fake_quantize_block: tensor_amax applies to 'nvfp4' only, not {scheme!r}")
        elem = {"mxfp8": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp4": "e2m1"}[scheme]
        return mx_dequantize(mx_quantize(x, elem, dim=dim, rounding=rounding, seed=seed), x.dtype)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB,
    computed in float64; inf when x_hat equals x."""
    xd, hd = x.detach().double(), x_hat.detach().double()
    if xd.shape != hd.shape:
        raise ValueError(f"sqnr_db: x {tuple(xd.shape)} and x_hat {tuple(hd.shape)} differ in shape")
    noise = float(((xd - hd) ** 2).sum())
    signal = float((xd**2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
