"""lowprec.formats: format tables, rounding, round-trip error bounds, saturation, NaN, bad input.

Oracles that do not come from the code under test: brute-force nearest-even rounding over all
256 FP8 bit patterns, torch's own casts, bitsandbytes' code books, and error bounds derived from
each format's spacing.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowprec import formats as F

FLOAT_FORMATS = [F.E4M3, F.E5M2, F.FP16, F.BF16]
INT_FORMATS = [F.int_format(4), F.int_format(8), F.int_format(8, signed=False), F.int_format(2)]
CODEBOOKS = [F.NF4, F.DE4, F.DE8, F.DE8_UNSIGNED, F.LINEAR4_NO_ZERO]
ALL_FORMATS = FLOAT_FORMATS + INT_FORMATS + CODEBOOKS
GRANULARITIES = ["tensor", "row", "block"]


def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite, non-negative value of an FP8 dtype, sorted (from all 256 bit patterns)."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return torch.unique(v[torch.isfinite(v) & (v >= 0)])


def _nearest_even_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Brute force over all 256 bit patterns: the finite value nearest to each x, ties to the code
    with an even last bit, values beyond the range to the largest finite value."""
    codes = torch.arange(256, dtype=torch.int32)
    vals = codes.to(torch.uint8).view(dtype).double()
    keep = torch.isfinite(vals)
    codes, vals = codes[keep], vals[keep]
    xd = x.double().clamp(-vals.max(), vals.max())
    dist = (xd[:, None] - vals[None, :]).abs()
    nearest = dist == dist.min(dim=1, keepdim=True).values
    score = nearest.int() * 2 + ((codes & 1) == 0).int()[None, :]  # nearest first, then even
    return vals[score.argmax(dim=1)].float()


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def test_names_resolve_and_unknown_name_is_rejected():
    for name in ["e4m3", "e5m2", "fp16", "bf16", "int4", "int8", "nf4", "de4", "de8", "linear4", "uint8", "E4M3"]:
        f = F.get_format(name)
        assert f is F.get_format(f)
    assert F.get_format("int4").qmax == 7 and F.get_format("int4").qmin == -7
    assert F.get_format("uint8").qmax == 255 and F.get_format("uint8").qmin == 0
    with pytest.raises(ValueError, match="unknown format 'e3m4'"):
        F.get_format("e3m4")
    with pytest.raises(ValueError, match="2 to 16 bits"):
        F.int_format(1)


def test_float_format_constants_match_torch():
    for f in FLOAT_FORMATS:
        fi = torch.finfo(f.dtype)
        assert f.max == fi.max and f.min_normal == fi.tiny, f.name
        assert f.min_subnormal == fi.smallest_normal * 2.0 ** -f.mantissa_bits
        assert f.bits == fi.bits


def test_de4_map_is_the_published_one():
    want = [0.0, 0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    want = sorted(set([-w for w in want] + want + [1.0]))
    assert len(F.DE4.codes) == 16
    assert F.DE4.codes == pytest.approx(want, abs=1e-7)
    assert -1.0 not in F.DE4.codes  # asymmetric: +1 but no -1
    assert F.LINEAR4_NO_ZERO.codes == tuple((i + 1) / 16 for i in range(16))
    assert 0.0 not in F.LINEAR4_NO_ZERO.codes


def test_codebooks_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), F.NF4.table)
    assert torch.equal(torch.unique(bnbf.create_dynamic_map(signed=True)), F.DE8.table)
    assert torch.equal(torch.unique(bnbf.create_dynamic_map(signed=False)), F.DE8_UNSIGNED.table)
    de4 = bnbf.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    assert torch.equal(torch.unique(de4), F.DE4.table)


def test_codebook_rejects_unsorted_or_out_of_range_codes():
    with pytest.raises(ValueError, match="strictly increasing"):
        F.CodebookFormat("bad", (0.0, 0.5, 0.2))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        F.CodebookFormat("bad", (0.0, 2.0))


# ----------------------------------------------------------------------------------------------
# Rounding: bit-exact against torch and against brute force
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [F.E4M3, F.E5M2], ids=lambda f: f.name)
def test_fp8_quantize_rounds_to_nearest_even_like_a_brute_force_search(f):
    x = torch.randn(4000) * f.max / 8
    # the carry cases the Triton interpreter gets wrong, exact ties and the edges of the range
    vals = _fp8_values(f.dtype)
    ties = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([x, torch.tensor([31.13, -121.75, f.max, -f.max, f.min_subnormal / 2, 0.0]), ties, -ties])
    q = F.quantize(x, f, 1.0)
    assert q.data.dtype == f.dtype
    assert torch.equal(q.data.float(), _nearest_even_fp8(x, f.dtype))
    assert float(F.fake_quantize(torch.tensor([31.13]), f)[0]) == 32.0


@pytest.mark.parametrize("f", FLOAT_FORMATS, ids=lambda f: f.name)
def test_float_quantize_is_torchs_cast_of_the_scaled_value(f):
    x = torch.randn(3, 64) * 10
    for scale in (1.0, 3.7, torch.rand(3, 1) + 0.5):
        want = (x.float() * scale).to(f.dtype)  # all in range: no clamping involved
        got = F.quantize(x, f, scale, "tensor" if isinstance(scale, float) else "row").data
        assert torch.equal(got.view(torch.uint8) if f.bits == 8 else got, want.view(torch.uint8) if f.bits == 8 else want)
    xh = x.to(torch.float16)
    assert F.fake_quantize(xh, "e4m3").dtype == torch.float16
    assert torch.equal(F.fake_quantize(xh, "e4m3"), xh.to(torch.float8_e4m3fn).to(torch.float16))


def test_int_rounds_half_to_even_and_codebook_ties_go_down():
    q = F.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 6.6]), "int4", 1.0)
    assert q.data.tolist() == [0, 2, 2, 0, -2, 7]
    t = F.NF4.table
    mids = (t[:-1] + t[1:]) * 0.5
    codes = F.encode_codebook(mids, F.NF4)
    assert codes.tolist() == list(range(15))  # exactly on a midpoint: the lower code
    assert F.encode_codebook(torch.nextafter(mids, torch.tensor(2.0)), F.NF4).tolist() == list(range(1, 16))


def test_half_step_is_half_the_gap_between_representable_values():
    for f in (F.E4M3, F.E5M2):
        vals = _fp8_values(f.dtype)
        gaps = vals[1:] - vals[:-1]
        # inside [v_i, v_{i+1}) the step is the gap above v_i
        assert torch.equal(F.half_step(vals[:-1], f), gaps / 2), f.name
    assert float(F.half_step(torch.tensor(1.0), "fp16")) == 2.0**-11
    assert float(F.half_step(torch.tensor(1.0 - 2**-20), "fp16")) == 2.0**-12  # below 1: the finer step
    assert float(F.half_step(torch.tensor(3.0), "int8", scale=2.0)) == 0.25


# ----------------------------------------------------------------------------------------------
# Round-trip property: error within half a step (hypothesis)
# ----------------------------------------------------------------------------------------------


def _error_bound(x: torch.Tensor, f, q: F.QuantizedTensor) -> torch.Tensor:
    """Largest error round-to-nearest may make for each element, in x's units: half the format's
    step at that magnitude, or the distance to the range for values beyond it (negative values
    in unsigned formats, values between 0 and the smallest code of a map without zero); plus
    float32 slack for the scaling multiply and divide (2**-20 relative, far below any step)."""
    s = (F._grouped(torch.ones_like(x), q.granularity, q.block_size) * q.scale).reshape(x.shape)
    xs = x * s
    if isinstance(f, F.CodebookFormat):
        lo, hi = float(f.table[0]), float(f.table[-1])
    elif isinstance(f, F.IntFormat):
        lo, hi = float(f.qmin), float(f.qmax)
    else:
        lo, hi = -f.max, f.max
    outside = torch.maximum(lo - xs, xs - hi).clamp_min(0) / s
    group_amax = f.max / s  # the scale maps the group's amax to the format's max
    slack = 2.0**-20 * (x.abs() + group_amax)
    return torch.maximum(F.half_step(x, f, s), outside) + slack


@st.composite
def _cases(draw):
    rows = draw(st.integers(1, 3))
    block = draw(st.sampled_from([1, 2, 4, 8]))
    n_blocks = draw(st.integers(1, 3))
    n = rows * block * n_blocks
    mags = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=n, max_size=n))
    exps = draw(st.lists(st.integers(-6, 6), min_size=n, max_size=n))
    x = torch.tensor(mags, dtype=torch.float32) * torch.tensor([10.0**e for e in exps])
    if draw(st.booleans()):  # an all-zero block
        x[:block] = 0.0
    return x.reshape(rows, block * n_blocks), block, draw(st.sampled_from(GRANULARITIES))


@pytest.mark.parametrize("f", ALL_FORMATS, ids=lambda f: f.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_round_trip_error_is_within_half_a_step(f, case):
    x, block, gran = case
    q = F.quantize(x, f, None, gran, block if gran == "block" else None)
    y = F.dequantize(q)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    err = (y - x).abs()
    bound = _error_bound(x, f, q)
    assert bool((err <= bound).all()), (f.name, gran, x[err > bound], y[err > bound], bound[err > bound])
    # A zero stays zero where the format holds 0, and all-zero groups never make NaN.
    if 0.0 in getattr(f, "codes", (0.0,)):
        assert bool((y[x == 0] == 0).all())


@pytest.mark.parametrize("f", ALL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANULARITIES)
def test_all_zero_groups_give_zeros_not_nan(f, gran):
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-2, 3, 8)  # one live row beside the zero rows
    q = F.quantize(x, f, None, gran, 4 if gran == "block" else None)
    y = F.dequantize(q)
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
    assert bool(torch.isfinite(y).all())
    if gran != "tensor":
        if 0.0 in getattr(f, "codes", (0.0,)):
            assert bool((y[[0, 2]] == 0).all())
        else:  # a map without zero (v's linear map) gives its smallest code over an enormous scale
            assert bool((y[[0, 2]].abs() <= 1e-12).all())


# ----------------------------------------------------------------------------------------------
# Saturation and NaN, as documented
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f", FLOAT_FORMATS, ids=lambda f: f.name)
def test_float_formats_saturate_and_keep_nan(f):
    x = torch.tensor([f.max * 4, -f.max * 4, float("inf"), float("-inf"), float("nan"), 1.0])
    q = F.quantize(x, f, 1.0)
    vals = q.data.float()
    assert vals[:4].tolist() == [f.max, -f.max, f.max, -f.max]  # E5M2: not inf, unlike torch's cast
    assert math.isnan(vals[4]) and vals[5] == 1.0
    if f is F.E5M2:
        assert torch.isinf(torch.tensor([f.max * 4]).to(f.dtype).float()).all()  # why the clamp is needed


def test_int_and_codebook_formats_saturate_and_send_nan_to_the_top_code():
    x = torch.tensor([1000.0, -1000.0, float("inf"), float("-inf"), float("nan"), 0.0])
    assert F.quantize(x, "int4", 1.0).data.tolist() == [7, -7, 7, -7, 7, 0]
    assert F.quantize(x, "uint8", 1.0).data.tolist() == [255, 0, 255, 0, 255, 0]
    codes = F.quantize(x, "nf4", 1.0, pack=False).data.tolist()
    assert codes == [15, 0, 15, 0, 15, 7]


def test_non_finite_amax_gives_scale_one_and_leaves_other_rows_alone():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    q = F.quantize(x, "e4m3", None, "row")
    assert q.scale[1].item() == 1.0 and q.scale[2].item() == 1.0
    assert q.scale[0].item() == pytest.approx(448.0 / x[0].abs().max().item(), rel=1e-6)
    assert F.scale_from_amax(torch.tensor(0.0), "bf16").item() == F.FLOAT32_MAX  # not inf


def test_scale_from_amax_power_of_two_rounds_down_exactly():
    # amax chosen so that 448 / amax is just below 2**5: float32 log2 rounds that up to 5.0
    s_exact = torch.tensor(2.0**5).nextafter(torch.tensor(0.0))
    a = torch.tensor(448.0) / s_exact
    s = F.scale_from_amax(a, "e4m3")
    assert s.item() < 32.0
    p = F.scale_from_amax(a, "e4m3", power_of_two=True)
    assert p.item() == 16.0 and (a * p).item() <= 448.0
    for amax in torch.rand(200) * 1000 + 1e-3:
        p = F.scale_from_amax(amax, "e4m3", power_of_two=True).item()
        full = F.scale_from_amax(amax, "e4m3").item()
        assert math.log2(p).is_integer() and full / 2 < p <= full
    assert F.scale_from_amax(torch.tensor(1.0), "e4m3", margin=2).item() == 112.0


def test_e8m0_round_trip():
    s = torch.exp2(torch.arange(-127, 128, dtype=torch.float32))
    code = F.to_e8m0(s)
    assert code.tolist() == list(range(255))
    assert torch.equal(F.from_e8m0(code), s)
    assert F.to_e8m0(torch.tensor([3.0, 0.7])).tolist() == [128, 126]  # rounded down to 2 and 0.5
    assert math.isnan(F.from_e8m0(torch.tensor([255], dtype=torch.uint8)).item())


# ----------------------------------------------------------------------------------------------
# Packing and storage
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_pack_nibbles_round_trip_and_layout(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = F.pack_nibbles(codes)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(F.unpack_nibbles(packed, n), codes)
    if n >= 2:
        assert packed[0].item() == codes[0].item() | (codes[1].item() << 4)  # even element low


def test_nf4_block_quantization_stores_half_a_byte_per_value_plus_scales():
    x = torch.randn(8, 128)
    q = F.quantize(x, "nf4", None, "block", 64)
    assert q.packed and q.data.dtype == torch.uint8 and q.data.numel() == 8 * 128 // 2
    assert q.scale.shape == (8, 2, 1)
    assert q.nbytes == 8 * 64 + 16 * 4
    assert torch.equal(q.dequantize(), F.dequantize(F.quantize(x, "nf4", None, "block", 64, pack=False)))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_dtypes_are_rejected_with_the_dtype_named():
    with pytest.raises(TypeError, match="complex"):
        F.quantize(torch.randn(4, dtype=torch.complex64), "e4m3")
    with pytest.raises(TypeError, match="torch.int32.*floating-point"):
        F.quantize(torch.arange(4, dtype=torch.int32), "int8")
    with pytest.raises(TypeError, match="torch.bool"):
        F.fake_quantize(torch.ones(4, dtype=torch.bool), "nf4")
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.quantize([1.0, 2.0], "e4m3")


@pytest.mark.parametrize("scale,match", [(0.0, "positive"), (-1.0, "positive"), (float("inf"), "finite"),
                                         (float("nan"), "finite"), (torch.tensor([1.0, 0.0]), "positive")])
def test_bad_scales_are_rejected(scale, match):
    with pytest.raises(ValueError, match=match):
        F.quantize(torch.randn(2, 4), "e4m3", scale, "row" if isinstance(scale, torch.Tensor) else "tensor")


def test_scale_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"expected a scalar or shape \(3, 1\)"):
        F.quantize(torch.randn(3, 8), "e4m3", torch.ones(8), "row")
    with pytest.raises(ValueError, match=r"shape \(3, 2, 1\)"):
        F.quantize(torch.randn(3, 8), "nf4", torch.ones(3, 1, 2), "block", 4)


def test_bad_block_sizes_and_granularities_are_rejected():
    with pytest.raises(ValueError, match="block_size 3 does not divide the last dimension \\(8\\)"):
        F.quantize(torch.randn(2, 8), "nf4", None, "block", 3)
    with pytest.raises(ValueError, match="positive integer block_size"):
        F.quantize(torch.randn(2, 8), "nf4", None, "block", None)
    with pytest.raises(ValueError, match="granularity must be"):
        F.quantize(torch.randn(2, 8), "nf4", None, "column")
    with pytest.raises(ValueError, match="at least one dimension"):
        F.quantize(torch.tensor(1.0), "e4m3", None, "row")
