"""Device-side helpers shared by the Triton kernels: exact rounding and scale computation.

Why integer bit operations: the Triton interpreter (``TRITON_INTERPRET=1``) mis-rounds
float32 -> FP8 when rounding carries into the exponent (31.13 -> 16 instead of 32 in E4M3), and
GPU and interpreter must agree bit for bit with torch's casts, which round to nearest even. So
the kernels never use Triton's narrowing float conversions; they round the float32 bit pattern
themselves (:func:`round_abs_bits`) and store the resulting code as an integer, which the host
views as the float dtype. Division uses ``div_rn`` (IEEE round-to-nearest) because plain ``/``
on a GPU compiles to an approximate division.

Everything here is importable without Triton: the names are ``None`` when it is missing.
"""

from __future__ import annotations

from lowprec.formats import AMAX_FLOOR, FLOAT32_MAX

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is a Linux-only dependency
    triton = None
    tl = None

# Narrow float formats as the kernels see them: (mantissa bits, smallest normal exponent, largest
# finite magnitude code, NaN magnitude code, position of the sign bit). torch's NaN codes.
NARROW_FLOATS = {
    "e4m3": (3, -6, 0x7E, 0x7F, 7),  # OCP E4M3FN: no inf, 0x7F is NaN, max 448
    "e5m2": (2, -14, 0x7B, 0x7F, 7),  # OCP E5M2: 0x7C is inf, max 57344
    "fp16": (10, -14, 0x7BFF, 0x7E00, 15),
    "bf16": (7, -126, 0x7F7F, 0x7FC0, 15),
}

if triton is not None:
    # Triton kernels may only read module globals that are constexpr.
    F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)
    F32_INF_BITS = tl.constexpr(0x7F800000)  # also the exponent mask: keeps 2**floor(log2(s)) of s > 0
    AMAX_FLOOR_C = tl.constexpr(AMAX_FLOOR)
    FLOAT32_MAX_C = tl.constexpr(FLOAT32_MAX)

    @triton.jit
    def round_abs_bits(abs_bits, MANT: tl.constexpr, EMIN: tl.constexpr):
        """Round non-negative, non-NaN float32 values (given as int32 bit patterns) to nearest even
        in a float format with ``MANT`` mantissa bits and smallest normal exponent ``EMIN``.

        Returns the format's magnitude code as int32: ``(e - EMIN) << MANT`` plus the rounded
        significand for normals, the rounded count of subnormal steps below. A carry out of the
        significand moves into the exponent field by plain addition, which is what makes this
        exact where the interpreter's conversion is not. Codes past the format's largest finite
        value are not clamped here.
        """
        exp32 = abs_bits >> 23
        mant = abs_bits & 0x7FFFFF
        full = tl.where(exp32 > 0, mant | 0x800000, mant)  # float32 subnormals have no implicit bit
        e = tl.maximum(exp32, 1) - 127
        # shift right by 23 - MANT for normals, further for the target's subnormals; past 25 every
        # 24-bit significand rounds to 0, so clamping the shift keeps it inside int32 safely.
        shift = tl.minimum((23 - MANT) + tl.maximum(EMIN - e, 0), 25)
        r = full >> shift
        rem = full & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        round_up = (rem > half) | ((rem == half) & ((r & 1) == 1))
        return (tl.maximum(e - EMIN, 0) << MANT) + r + round_up.to(tl.int32)

    @triton.jit
    def encode_float(y, sign_src_bits, MANT: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr,
                     NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr, SATURATE: tl.constexpr):
        """The narrow-float code (int32, sign included) of float32 ``y``, round to nearest even.

        ``SATURATE``: finite values and inf beyond the largest finite value become it (FP8 casts
        after lowprec's clamp); otherwise they become inf, ``MAX_CODE + 1`` (torch's fp16/bf16
        casts). NaN becomes ``NAN_CODE``. The sign comes from ``sign_src_bits`` (the input's bit
        pattern), so NaN keeps the input's sign as torch's CPU casts do.
        """
        ybits = y.to(tl.int32, bitcast=True)
        a = ybits & F32_ABS_MASK
        is_nan = a > F32_INF_BITS
        code = round_abs_bits(tl.minimum(a, F32_INF_BITS), MANT, EMIN)
        if SATURATE:
            code = tl.minimum(code, MAX_CODE)
        else:
            code = tl.minimum(code, MAX_CODE + 1)
        code = tl.where(is_nan, NAN_CODE, code)
        sign = (sign_src_bits >> 31) & 1
        return code | (sign << SIGN_SHIFT)

    @triton.jit
    def abs_bits_of(x):
        """|x| as int32 bit patterns: their integer order is the float order, and NaN sorts above
        inf, so an integer max is an amax that propagates NaN like ``torch.amax``."""
        return x.to(tl.int32, bitcast=True) & F32_ABS_MASK

    @triton.jit
    def scale_from_amax_bits(amax_bits, FMAX: tl.constexpr, MARGIN_DIV: tl.constexpr, POW2: tl.constexpr):
        """Device twin of :func:`lowprec.formats.scale_from_amax`, bit for bit:
        ``FMAX / max(amax, AMAX_FLOOR) / MARGIN_DIV``, capped at the float32 max, optionally
        rounded down to a power of two, and 1 where amax is inf or NaN."""
        a = amax_bits.to(tl.float32, bitcast=True)
        s = tl.math.div_rn(tl.full(a.shape, FMAX, tl.float32), tl.maximum(a, AMAX_FLOOR_C))
        if MARGIN_DIV != 1.0:
            s = tl.math.div_rn(s, tl.full(a.shape, MARGIN_DIV, tl.float32))
        s = tl.minimum(s, FLOAT32_MAX_C)
        if POW2:
            s = (s.to(tl.int32, bitcast=True) & F32_INF_BITS).to(tl.float32, bitcast=True)
        return tl.where(amax_bits < F32_INF_BITS, s, 1.0)

else:  # pragma: no cover
    round_abs_bits = encode_float = abs_bits_of = scale_from_amax_bits = None
