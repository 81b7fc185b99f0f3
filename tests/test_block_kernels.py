"""MX and NVFP4 quantize kernels (kernels/mx_quantize.py, kernels/nvfp4_quantize.py) against the
PyTorch references in lowprec.formats, bit for bit: data and scales, every element format, round
to nearest even and stochastic rounding (same seed, same bits), NaN/Inf, zero and subnormal
blocks, ragged and transposed layouts; and the fused 16x16 RHT.

Triton decides at decoration time whether a kernel is interpreted, so the kernel cases run in a
child process with ``TRITON_INTERPRET=1`` (CPU tensors); on a CUDA machine they also run
in-process, compiled. The RHT bound, dispatch and bad-input checks run in the main process.
"""

from __future__ import annotations

import pytest
import torch
from triton_child import (
    DEVICE,
    INTERPRETED,
    needs_kernels,
    parent_only,
    run_in_interpreter,
)

from lowprec import formats as F
from lowprec.kernels import dispatch
from lowprec.kernels.mx_quantize import mx_quantize, mx_quantize_triton
from lowprec.kernels.nvfp4_quantize import (
    nvfp4_quantize,
    nvfp4_quantize_triton,
    rht16,
    rht16_error_bound,
    sign_bits,
)
from lowprec.rht import hadamard, random_signs, rht

# (shape, dim): aligned, ragged last block, 3-D, blocks along dim 0 of a 2-D tensor (ragged too)
LAYOUTS = [((4, 64), -1), ((3, 70), -1), ((2, 3, 32), -1), ((64, 6), 0), ((40, 5), 0)]
ROUNDINGS = ("nearest", "stochastic")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu())


def _values(shape, seed: int, spread: float = 3.0) -> torch.Tensor:
    """Log-normal magnitudes with random signs (blocks of very different scales), with NaN,
    float32 subnormals, -0 and 0 spliced in; the first row's first block is +inf, its second
    all zero, the last row's first block float32-subnormal (E8M0 clamps at 2**-127 there)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * spread)
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), 1e-40, -0.0, 0.0, -1e-45, 3e4])
    if x.dim() == 2 and x.shape[1] >= 64:
        x[0, :32] = float("inf")
        x[1, 32:64] = 0.0
        x[-1, :32] = torch.randn(32, generator=g) * 1e-40
    return x.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------------------------


@parent_only
def test_kernels_bit_exact_under_the_triton_interpreter():
    run_in_interpreter(__file__, min_passed=19)


# ----------------------------------------------------------------------------------------------
# MX
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("elem", ["e4m3", "e5m2", "e2m1"])
def test_mx_bit_exact(elem, rounding):
    for i, (shape, dim) in enumerate(LAYOUTS):
        x = _values(shape, seed=i)
        t = mx_quantize_triton(x, elem, dim=dim, rounding=rounding, seed=1234 + i)
        r = F.mx_quantize(x, elem, dim=dim, rounding=rounding, seed=1234 + i)
        assert _same_bytes(t.data, r.data), (elem, rounding, shape, dim)
        assert torch.equal(t.scale, r.scale), (elem, rounding, shape, dim)
        assert (t.elem, t.shape, t.dim, t.block_size) == (r.elem, r.shape, r.dim, r.block_size)
        if shape == (4, 64):  # the special blocks, independently of the reference
            assert t.scale[0, 0] == F.E8M0_NAN and t.scale[1, 1] == 0 and t.scale[-1, 0] == 0
            assert bool(torch.isnan(t.dequantize()[0, :32]).all()) and not t.dequantize()[1:, :].isnan().any()


@needs_kernels
@pytest.mark.parametrize("elem", ["e4m3", "e5m2", "e2m1"])
def test_mx_every_element_value_and_midpoint(elem):
    """Blocks of scale 1 (amax = 2**emax x 1.5 or the format's max) holding every representable
    element value, every midpoint between neighbours (ties to even) and values just off them."""
    f = F.MX_ELEMENTS[elem]
    if f.dtype is None:
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    else:
        grid = torch.arange(256, dtype=torch.uint8).view(f.dtype).float()
        grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    v = torch.cat([grid, (grid[:-1] + grid[1:]) / 2, grid * (1 + 2**-6), grid * (1 - 2**-6), -grid])
    v = v[v.abs() <= f.max]
    per_block = f.max  # puts floor(log2 amax) at emax: scale 2**0
    n = -(-v.numel() // 31)
    x = torch.zeros(n * 31)
    x[: v.numel()] = v
    x = torch.cat([torch.full((n, 1), per_block), x.reshape(n, 31)], dim=1).to(DEVICE)
    for rounding in ROUNDINGS:
        t = mx_quantize_triton(x, elem, rounding=rounding, seed=5)
        r = F.mx_quantize(x, elem, rounding=rounding, seed=5)
        assert bool((t.scale == F.E8M0_BIAS).all())
        assert _same_bytes(t.data, r.data) and torch.equal(t.scale, r.scale), (elem, rounding)
    # round to nearest lands on the grid value itself for every representable input
    t = mx_quantize_triton(x, elem)
    exact = torch.isin(x.abs().cpu(), grid)
    assert torch.equal(t.dequantize().cpu()[exact], x.cpu()[exact])


@needs_kernels
def test_mx_stochastic_rounding_is_seeded():
    x = (torch.rand(8, 64) * 3).to(DEVICE)
    a = mx_quantize_triton(x, "e2m1", rounding="stochastic", seed=11)
    b = mx_quantize_triton(x, "e2m1", rounding="stochastic", seed=11)
    c = mx_quantize_triton(x, "e2m1", rounding="stochastic", seed=12)
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    # seed=None draws from torch's global generator on both paths: same draws, same bits
    torch.manual_seed(3)
    t = mx_quantize(x, "e4m3", rounding="stochastic", backend="triton")
    torch.manual_seed(3)
    r = F.mx_quantize(x, "e4m3", rounding="stochastic")
    assert _same_bytes(t.data, r.data)


@needs_kernels
def test_half_precision_inputs():
    """bf16 / fp16 inputs, subnormal blocks included (the kernels widen bf16 from its bits: the
    interpreter's own bf16 -> float32 conversion flushes subnormals to zero)."""
    base = _values((6, 96), seed=9, spread=1.0)
    for dt in (torch.bfloat16, torch.float16):
        x = base.to(dt)
        for elem in ("e4m3", "e2m1"):
            t = mx_quantize_triton(x, elem, rounding="stochastic", seed=2)
            r = F.mx_quantize(x, elem, rounding="stochastic", seed=2)
            assert _same_bytes(t.data, r.data) and torch.equal(t.scale, r.scale), (dt, elem)
        t = nvfp4_quantize_triton(x, rounding="stochastic", seed=2)
        r = F.nvfp4_quantize(x, rounding="stochastic", seed=2)
        assert _same_bytes(t.data, r.data) and _same_bytes(t.block_scale, r.block_scale), dt


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_nvfp4_bit_exact(rounding):
    for i, (shape, dim) in enumerate(LAYOUTS):
        x = _values(shape, seed=20 + i, spread=2.0)
        # the tensor amax of the data (finite values only, computed by the amax kernel), a given
        # amax below it (block scales saturate at 448) and one far above (block scales round to 0)
        for ta in (None, torch.tensor(5.0), torch.tensor(3e38)):
            t = nvfp4_quantize_triton(x, dim=dim, tensor_amax=ta, rounding=rounding, seed=77 + i)
            r = F.nvfp4_quantize(x, dim=dim, tensor_amax=ta, rounding=rounding, seed=77 + i)
            assert _same_bytes(t.data, r.data), (rounding, shape, dim, ta)
            assert _same_bytes(t.block_scale, r.block_scale), (rounding, shape, dim, ta)
            assert torch.equal(t.tensor_scale, r.tensor_scale) and (t.shape, t.dim) == (r.shape, r.dim)
        if shape == (4, 64):
            assert bool(torch.isnan(t.dequantize()[0, :32]).all())
            assert t.dequantize()[1, 32:64].eq(0).all()


@needs_kernels
def test_nvfp4_all_zero_and_all_nonfinite_tensors():
    for x in (torch.zeros(3, 32), torch.full((2, 16), float("nan")), torch.full((2, 16), -float("inf"))):
        x = x.to(DEVICE)
        t = nvfp4_quantize_triton(x)
        r = F.nvfp4_quantize(x)
        assert _same_bytes(t.data, r.data) and _same_bytes(t.block_scale, r.block_scale)
        assert torch.equal(t.tensor_scale, r.tensor_scale)


@needs_kernels
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_nvfp4_fused_rht_equals_transform_then_reference(rounding):
    """The fused kernel equals the reference quantizer applied to rht16(x), bit for bit (the
    tensor amax, when not given, is the transformed tensor's: the amax kernel applies the RHT
    too). rht16 itself is checked against lowprec.rht.rht below."""
    for i, (shape, dim) in enumerate([((4, 64), -1), ((2, 3, 32), -1), ((32, 48), 0)]):
        x = _values(shape, seed=40 + i, spread=1.5)
        for ta in (None, torch.tensor(2.0)):
            t = nvfp4_quantize_triton(x, dim=dim, tensor_amax=ta, rounding=rounding, seed=3, rht_seed=100 + i)
            r = F.nvfp4_quantize(rht16(x, 100 + i, dim=dim), dim=dim, tensor_amax=ta, rounding=rounding, seed=3)
            assert _same_bytes(t.data, r.data) and _same_bytes(t.block_scale, r.block_scale), (shape, dim, ta)
            assert torch.equal(t.tensor_scale, r.tensor_scale)
    # and the public entry point forced to the kernel gives the same as its CPU path
    x = _values((4, 64), seed=50)
    t = nvfp4_quantize(x, rht_seed=9, rounding=rounding, seed=1, backend="triton")
    r = nvfp4_quantize(x, rht_seed=9, rounding=rounding, seed=1, backend="torch")
    assert _same_bytes(t.data, r.data) and _same_bytes(t.block_scale, r.block_scale)


# ----------------------------------------------------------------------------------------------
# Main process: the RHT's arithmetic, dispatch, bad input
# ----------------------------------------------------------------------------------------------


def test_rht16_is_the_reference_transform_within_the_derived_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * torch.exp(torch.randn(64, 48, generator=g) * 3)
    for seed, dim in ((0, -1), (5, 0), (123, 1)):
        y = rht16(x, seed, dim=dim)
        ref = rht(x, seed, dim=dim, dtype=torch.float32)
        bound = rht16_error_bound(x, dim=dim)
        assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())
        # against the exact transform (float64 over values exact in float64): half the bound's
        # budget is the butterflies' own gamma_4, which must hold by itself
        m = (hadamard(16).double() * random_signs(seed).double()[None, :] / 4)
        xt = x.double().movedim(dim, -1)
        exact = (xt.reshape(*xt.shape[:-1], -1, 16) @ m.T).reshape(xt.shape).movedim(-1, dim)
        g4 = 4 * 2.0**-24 / (1 - 4 * 2.0**-24)
        own = g4 * (x.double().abs().movedim(dim, -1).reshape(*xt.shape[:-1], -1, 16).sum(-1, keepdim=True) / 4)
        own = own.expand(*xt.shape[:-1], -1, 16).reshape(xt.shape).movedim(-1, dim)
        assert bool(((y.double() - exact).abs() <= own * (1 + 1e-9) + 2.0**-149).all())
    # the bound is tight: 19 units of roundoff of the group's sum |x| / 4 (plus the underflow term)
    scale = x.abs().reshape(64, 3, 16).sum(-1, keepdim=True).expand(64, 3, 16).reshape(64, 48) / 4
    assert bool((rht16_error_bound(x) <= 19.01 * 2.0**-24 * scale + 2.0**-145).all())


def test_sign_bits_match_random_signs():
    for seed in (0, 1, 77):
        s = random_signs(seed)
        bits = sign_bits(seed)
        assert [(-1.0 if (bits >> k) & 1 else 1.0) for k in range(16)] == s.tolist()


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="checks the CPU dispatch")
def test_cpu_dispatch_runs_the_reference_and_forced_triton_needs_the_interpreter(monkeypatch):
    x = torch.randn(4, 64)
    q, r = mx_quantize(x, "e2m1"), F.mx_quantize(x, "e2m1")
    assert torch.equal(q.data, r.data) and torch.equal(q.scale, r.scale)
    q, r = nvfp4_quantize(x, block_2d=True), F.nvfp4_quantize(x, block_2d=True)
    assert torch.equal(q.data, r.data) and q.block_2d
    q, r = nvfp4_quantize(x, rht_seed=4), F.nvfp4_quantize(rht16(x, 4))
    assert torch.equal(q.data, r.data)
    monkeypatch.setenv("LOWPREC_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.forced_backend() == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mx_quantize(x, "e4m3")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nvfp4_quantize(x)


def test_bad_inputs_are_named():
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match="rounding must be one of"):
        nvfp4_quantize(x, rounding="up")
    with pytest.raises(TypeError, match="rht_seed must be an int"):
        nvfp4_quantize(x, rht_seed=1.5)
    with pytest.raises(ValueError, match="multiple of the Hadamard size 16"):
        nvfp4_quantize_triton(x, rht_seed=1)
    with pytest.raises(ValueError, match="power of two"):
        mx_quantize_triton(x, "e4m3", block_size=24)
    with pytest.raises(ValueError, match="elem must be one of"):
        mx_quantize_triton(x, "fp16")
    with pytest.raises(ValueError, match="last dim, or dim 0 of a 2-D tensor"):
        mx_quantize_triton(torch.randn(2, 32, 3), "e4m3", dim=1)
    with pytest.raises(ValueError, match="tensor_amax must be finite"):
        nvfp4_quantize_triton(torch.randn(2, 16), tensor_amax=torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="multiple of 16"):
        rht16(torch.randn(3, 20), 0)
