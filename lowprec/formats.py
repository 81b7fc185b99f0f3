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

Formats that cannot hold NaN (INT-k, code books) treat NaN like +inf: it becomes the largest
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
    """A floating-point format that torch can cast to."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float  # largest finite value
    min_normal: float  # smallest positive normal value
    dtype: torch.dtype
    bits: int

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
    f.name: f for f in (E4M3, E5M2, FP16, BF16, NF4, DE4, DE8, DE8_UNSIGNED, LINEAR4_NO_ZERO)
}


def int_format(bits: int, signed: bool = True) -> IntFormat:
    """Symmetric signed (``int{bits}``) or unsigned (``uint{bits}``) integer format, 2 <= bits <= 16."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"integer formats take 2 to 16 bits; got {bits!r}")
    return IntFormat(("int" if signed else "uint") + str(bits), bits, signed)


def get_format(fmt: str | Format) -> Format:
    """A format from its name (``"e4m3"``, ``"e5m2"``, ``"fp16"``, ``"bf16"``, ``"int4"``,
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
    if isinstance(f, FloatFormat):
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
