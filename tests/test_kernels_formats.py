"""Triton kernels of lowprec.kernels (scaled FP8 cast, code-book quantize/dequantize) against their
PyTorch references, bit for bit.

Triton decides at decoration time whether a kernel is interpreted, so the kernel cases cannot
run in the main pytest process without changing every other test file's view of Triton. This
file therefore runs itself a second time in a child process with ``TRITON_INTERPRET=1`` (CPU
tensors) and asserts that the child passes. Where CUDA is available the same cases also run
in-process on the GPU, compiled. Dispatch and bad-input checks run in the main process.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_child import (
    DEVICE,
    INTERPRETED,
    needs_kernels,
    parent_only,
    run_in_interpreter,
)

from lowprec import formats as F
from lowprec.kernels import dispatch
from lowprec.kernels.codebook import codebook_dequantize, codebook_quantize
from lowprec.kernels.fp8_cast import scaled_fp8_cast

FP8_SHAPES = [(0,), (1,), (5,), (2049,), (3, 0), (0, 7), (4, 1), (7, 1030), (2, 3, 17)]
CODEBOOK_CASES = [((0,), 4), ((1,), 1), ((6,), 3), ((3, 6), 2), ((2, 10), 5), ((5, 128), 64), ((2, 3, 40), 8),
                  ((3, 384), 128), ((2, 300), 300)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu() if t.numel() else t.cpu()


def _same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bit patterns, except that any NaN equals any NaN (the sign of a NaN is not meaningful)."""
    ab, bb = _bytes(a), _bytes(b)
    nan_a, nan_b = torch.isnan(a.float()).cpu(), torch.isnan(b.float()).cpu()
    return torch.equal(nan_a, nan_b) and torch.equal(ab[~nan_a], bb[~nan_b])


def _special_values(n: int, scale_hint: float) -> torch.Tensor:
    """Random values with the awkward ones spliced in: NaN, +-inf, -0, float32 subnormals, values
    that overflow the format, and the rounding carries the interpreter gets wrong."""
    x = torch.randn(n) * scale_hint
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-40, -3e-39, 1e30, -1e30,
                            31.13, -121.75, 0.0])
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x


# ----------------------------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------------------------


@parent_only
@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed (it is a Linux-only dependency)")
def test_kernels_bit_exact_under_the_triton_interpreter():
    run_in_interpreter(__file__, min_passed=60)


# ----------------------------------------------------------------------------------------------
# Scaled FP8 cast: bit-exact
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gran", ["tensor", "row"])
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=str)
def test_fp8_cast_matches_reference(fmt, gran, shape):
    n = 1
    for d in shape:
        n *= d
    x = _special_values(n, 40.0 if fmt == "e4m3" else 5000.0).reshape(shape).to(DEVICE)
    rows = (*shape[:-1], 1)
    scales = [None, 3.0]
    if gran == "row":
        scales.append(torch.rand(rows, device=DEVICE) * 4 + 0.25)
    for scale in scales:
        ref = scaled_fp8_cast(x, fmt, scale, gran, backend="torch")
        out = scaled_fp8_cast(x, fmt, scale, gran, backend="triton")
        assert out.data.dtype == ref.data.dtype and out.data.shape == x.shape
        assert _same_fp8(out.data, ref.data), (fmt, gran, shape, scale)
        assert torch.equal(out.scale, ref.scale)
        assert out.amax.shape == ref.amax.shape and torch.allclose(out.amax, ref.amax, equal_nan=True, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cast_half_precision_inputs_margin_and_power_of_two(fmt):
    x = torch.randn(6, 77, device=DEVICE) * 30
    for dtype in (torch.bfloat16, torch.float16):
        for gran in ("tensor", "row"):
            for margin, pow2 in ((0, True), (2, False), (1, True)):
                ref = scaled_fp8_cast(x.to(dtype), fmt, None, gran, margin, pow2, backend="torch")
                out = scaled_fp8_cast(x.to(dtype), fmt, None, gran, margin, pow2, backend="triton")
                assert _same_fp8(out.data, ref.data) and torch.equal(out.scale, ref.scale)
                assert torch.equal(out.amax, ref.amax)


@needs_kernels
def test_fp8_cast_rounds_the_interpreter_carry_cases_correctly():
    x = torch.tensor([31.13, -31.13, 15.9, 239.5], device=DEVICE)
    out = scaled_fp8_cast(x, "e4m3", 1.0, backend="triton")
    assert out.data.float().tolist() == [32.0, -32.0, 16.0, 240.0]
    out = scaled_fp8_cast(torch.tensor([-121.75, 1e6], device=DEVICE), "e5m2", 1.0, backend="triton")
    assert out.data.float().tolist() == [-128.0, 57344.0]  # saturates: torch's own cast gives inf


@needs_kernels
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cast_ties_go_to_even(fmt):
    """Every finite FP8 value, every midpoint between neighbours (exact ties) and the float32
    values either side of each midpoint: random data almost never holds a tie."""
    dtype = F.get_format(fmt).dtype
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    vals = torch.unique(vals[torch.isfinite(vals)])
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(float("-inf")))])
    x = x.to(DEVICE)
    ref = scaled_fp8_cast(x, fmt, 1.0, backend="torch")
    out = scaled_fp8_cast(x, fmt, 1.0, backend="triton")
    assert _same_fp8(out.data, ref.data)
    assert torch.equal(out.data.float()[: len(vals)].cpu(), vals)


@needs_kernels
def test_codebook_dequantize_ties_to_even_in_half_precision():
    """A code book whose codes sit exactly halfway between bf16 and fp16 neighbours."""
    ties = [0.5 + 2**-9, 0.5 + 3 * 2**-9, 0.5 + 2**-12, 0.5 + 3 * 2**-12, 0.75 + 2**-10, 0.25 + 2**-10]
    fmt = F.CodebookFormat("ties", tuple(sorted([-1.0, 0.0, 1.0] + ties + [-t for t in ties])))
    x = fmt.table.to(DEVICE).reshape(1, -1)
    q = F.quantize(x, fmt, 1.0, "block", x.shape[-1])
    assert torch.equal(F.unpack_nibbles(q.data, x.numel()).cpu(), torch.arange(x.numel(), dtype=torch.uint8))
    for scale in (1.0, 2.0**20, 2.0**-12):  # normal, fp16-subnormal and large results
        q.scale = torch.full((1, 1, 1), scale, device=DEVICE)
        for dtype in (torch.bfloat16, torch.float16):
            got = codebook_dequantize(q, dtype, backend="triton")
            assert torch.equal(_bytes(got), _bytes(F.dequantize(q, dtype))), (scale, dtype)


@needs_kernels
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 5), cols=st.integers(0, 300), log_scale=st.integers(-20, 20),
       fmt=st.sampled_from(["e4m3", "e5m2"]), gran=st.sampled_from(["tensor", "row"]))
def test_fp8_cast_random_shapes_and_magnitudes(rows, cols, log_scale, fmt, gran):
    x = torch.randn(rows, cols, device=DEVICE) * 2.0**log_scale
    ref = scaled_fp8_cast(x, fmt, None, gran, backend="torch")
    out = scaled_fp8_cast(x, fmt, None, gran, backend="triton")
    assert _same_fp8(out.data, ref.data) and torch.equal(out.scale, ref.scale) and torch.equal(out.amax, ref.amax)


@needs_kernels
def test_forced_backend_reaches_the_kernel(monkeypatch):
    """LOWPREC_KERNELS=triton routes calls to Triton (the reference is made to fail to prove it)."""
    import lowprec.kernels.codebook as cb
    import lowprec.kernels.fp8_cast as fc

    monkeypatch.setenv("LOWPREC_KERNELS", "triton")
    assert dispatch.choose_backend(torch.ones(1, device=DEVICE)) == "triton"
    x = torch.randn(3, 8, device=DEVICE)
    want = fc.scaled_fp8_cast_reference(x)
    monkeypatch.setattr(fc, "scaled_fp8_cast_reference", lambda *a, **k: pytest.fail("reference ran"))
    monkeypatch.setattr(cb, "quantize", lambda *a, **k: pytest.fail("reference ran"))
    monkeypatch.setattr(cb, "dequantize", lambda *a, **k: pytest.fail("reference ran"))
    assert _same_fp8(scaled_fp8_cast(x).data, want.data)
    q = codebook_quantize(x, "nf4", 4)
    assert torch.equal(codebook_dequantize(q).cpu(), F.dequantize(q).cpu())


# ----------------------------------------------------------------------------------------------
# Code-book quantize / dequantize: bit-exact
# ----------------------------------------------------------------------------------------------


def _codebook_params():
    """Every shape with NF4 (4-bit, packed) and DE8 (8-bit, unpacked); the other maps on a few."""
    few = [CODEBOOK_CASES[i] for i in (1, 4, 6)]
    return ([("nf4", *c) for c in CODEBOOK_CASES] + [("de8", *c) for c in CODEBOOK_CASES[:2] + few[1:]]
            + [(f, *c) for f in ("de4", "de8u", "linear4") for c in few])


@needs_kernels
@pytest.mark.parametrize("fmt,shape,block", _codebook_params(), ids=str)
def test_codebook_matches_reference(fmt, shape, block):
    n = 1
    for d in shape:
        n *= d
    x = _special_values(n, 3.0)
    if n >= 2 * block:
        x[block: 2 * block] = 0.0  # an all-zero block
    x = x.reshape(shape).to(DEVICE)
    n_blocks = n // block
    per_block = torch.rand(*shape[:-1], shape[-1] // block, 1, device=DEVICE) + 0.5
    combos = [(None, True), (None, False), (2.0, True), (per_block, False)] if n_blocks else [(None, True)]
    for i, (scale, pack) in enumerate(combos):
        ref = codebook_quantize(x, fmt, block, scale, pack, backend="torch")
        out = codebook_quantize(x, fmt, block, scale, pack, backend="triton")
        assert out.packed == ref.packed and out.data.dtype == ref.data.dtype
        assert torch.equal(out.data, ref.data), (fmt, shape, block, scale, pack)
        assert torch.equal(out.scale, ref.scale)
        dtypes = (torch.float32, torch.bfloat16, torch.float16) if i == 0 and pack else (torch.float32,)
        for dtype in dtypes:
            want = codebook_dequantize(ref, dtype, backend="torch")
            got = codebook_dequantize(ref, dtype, backend="triton")
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(_bytes(got), _bytes(want)), (fmt, shape, block, dtype)


@needs_kernels
@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_codebook_dequantize_handles_every_granularity(gran):
    x = torch.randn(5, 24, device=DEVICE)
    for pack in (True, False):
        q = F.quantize(x, "nf4", None, gran, pack=pack)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(_bytes(codebook_dequantize(q, dtype, backend="triton")), _bytes(F.dequantize(q, dtype)))


@needs_kernels
def test_codebook_dequantize_overflow_to_half_precision_matches_torch():
    """fp16 output of values beyond 65504 becomes inf, as torch's cast does (no silent clamp)."""
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0]], device=DEVICE)
    q = F.quantize(x, "nf4", 1.0, "block", 4)
    q.scale = torch.full((1, 1, 1), 1e-6, device=DEVICE)  # codes stand for values up to 1e6
    for dtype in (torch.float16, torch.bfloat16):
        got = codebook_dequantize(q, dtype, backend="triton")
        assert torch.equal(_bytes(got), _bytes(F.dequantize(q, dtype)))
    assert torch.isinf(codebook_dequantize(q, torch.float16, backend="triton")[0, 0])


# ----------------------------------------------------------------------------------------------
# Dispatch and bad input (main process)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="checks the non-interpreted process")
def test_forced_triton_on_an_unsupported_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOWPREC_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="LOWPREC_KERNELS=triton but scaled_fp8_cast got tensors on cpu"):
        scaled_fp8_cast(x)
    with pytest.raises(RuntimeError, match="codebook_quantize got tensors on cpu"):
        codebook_quantize(x, "nf4", 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        codebook_dequantize(F.quantize(x, "nf4", None, "block", 4))


def test_dispatch_defaults_and_bad_override(monkeypatch):
    monkeypatch.delenv("LOWPREC_KERNELS", raising=False)
    assert dispatch.choose_backend(torch.ones(2)) == "torch"  # CPU tensors use the reference
    monkeypatch.setenv("LOWPREC_KERNELS", "torch")
    assert dispatch.choose_backend(torch.ones(2)) == "torch"
    monkeypatch.setenv("LOWPREC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LOWPREC_KERNELS must be 'torch', 'triton' or 'auto'; got 'cuda'"):
        dispatch.choose_backend(torch.ones(2))


def test_kernel_entry_points_reject_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="'e4m3' or 'e5m2'; got format 'nf4'"):
        scaled_fp8_cast(x, "nf4")
    with pytest.raises(ValueError, match="granularity 'tensor' or 'row'; got 'block'"):
        scaled_fp8_cast(x, "e4m3", granularity="block")
    with pytest.raises(TypeError, match="complex"):
        scaled_fp8_cast(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.int64"):
        codebook_quantize(torch.arange(8), "nf4", 4)
    with pytest.raises(ValueError, match="positive"):
        scaled_fp8_cast(x, scale=0.0)
    with pytest.raises(ValueError, match="finite"):
        codebook_quantize(x, "nf4", 4, scale=float("nan"))
    with pytest.raises(ValueError, match=r"expected a scalar or shape \(4, 1\)"):
        scaled_fp8_cast(x, scale=torch.ones(8), granularity="row")
    with pytest.raises(ValueError, match="block_size 3 does not divide the last dimension"):
        codebook_quantize(x, "nf4", 3)
    with pytest.raises(ValueError, match="code-book format.*'e4m3'"):
        codebook_quantize(x, "e4m3", 4)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        codebook_dequantize(F.quantize(x, "nf4", None, "block", 4), torch.float64)
