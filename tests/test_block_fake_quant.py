"""The fused quantize-dequantize of the block-scaled formats (lowprec.matmul.block_fake_quant):
bit for bit ``q.dequantize()`` of the reference quantizers, run eagerly for every configuration and
compiled (Inductor, CPU) for the ones with the most arithmetic (Philox, RHT, transposed, ragged)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowprec.matmul.block_fake_quant as bfq
from lowprec import formats
from lowprec.matmul.block_fake_quant import mx_fake_quantize, nvfp4_fake_quantize

torch.set_num_threads(1)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and float32 bit patterns (signed zeros included); any NaN equals any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(torch.where(na, 0.0, a).view(torch.int32),
                                               torch.where(nb, 0.0, b).view(torch.int32))


def _operand(rows: int = 37, cols: int = 70, seed: int = 0) -> torch.Tensor:
    """Ragged for 16 and 32, columns over many binades, plus every special block: NaN, +-Inf, all
    zeros, negative zeros, subnormals, a block far below the tensor's amax (NVFP4 scale 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 6, cols)[None, :]
    x[3 % rows, 5] = float("nan")
    x[10 % rows, cols - 30] = float("inf")
    x[12 % rows, 1] = float("-inf")
    x[20 % rows, :] = 0.0
    x[:, cols - 4] = -0.0
    x[5 % rows, 7] = -1e-30
    x[30 % rows, 16:32] = 1e-41  # subnormal block
    return x


MX_CASES = [(e, r) for e in ("e4m3", "e5m2", "e2m1") for r in ("nearest", "stochastic")]
NV_CASES = [
    dict(),
    dict(rounding="stochastic", seed=7),
    dict(block_2d=True),
    dict(block_2d=True, rounding="stochastic", seed=8),
    dict(rht_seed=3),
    dict(rht_seed=3, rounding="stochastic", seed=9),
    dict(tensor_amax=torch.tensor(50.0)),
]


@pytest.mark.parametrize("dim", [1, 0, -1])
@pytest.mark.parametrize("elem,rounding", MX_CASES)
def test_mx_eager_equals_reference_dequantize(elem, rounding, dim):
    x = _operand()
    got = mx_fake_quantize(x, elem, dim=dim, rounding=rounding, seed=11, impl="eager")
    want = formats.mx_quantize(x, elem, dim=dim, rounding=rounding, seed=11).dequantize()
    assert _bits_equal(got, want)
    assert torch.isnan(got).any() and (got == 0).any()  # the special blocks are really there


@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("kw", NV_CASES, ids=lambda kw: "-".join(kw) or "plain")
def test_nvfp4_eager_equals_reference_dequantize(kw, dim):
    from lowprec.kernels.nvfp4_quantize import nvfp4_quantize

    x = _operand(48, 64) if "rht_seed" in kw else _operand()
    got = nvfp4_fake_quantize(x, dim=dim, impl="eager", **kw)
    want = nvfp4_quantize(x, dim=dim, **kw).dequantize()
    assert _bits_equal(got, want)
    assert _bits_equal(nvfp4_fake_quantize(x, dim=dim, impl="reference", **kw), want)


def test_stochastic_rounding_follows_the_seed():
    x = _operand()
    a = mx_fake_quantize(x, "e2m1", rounding="stochastic", seed=1, impl="eager")
    b = mx_fake_quantize(x, "e2m1", rounding="stochastic", seed=2, impl="eager")
    assert not _bits_equal(a, b)
    torch.manual_seed(5)
    c = nvfp4_fake_quantize(x, rounding="stochastic", impl="eager")  # seed=None: drawn as the reference does
    torch.manual_seed(5)
    assert _bits_equal(c, formats.nvfp4_quantize(x, rounding="stochastic").dequantize())


def test_other_layouts_and_dtypes_run_the_reference():
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1))
    want = formats.mx_quantize(x, "e4m3", dim=1).dequantize()
    assert _bits_equal(mx_fake_quantize(x, "e4m3", dim=1, impl="eager"), want)
    assert _bits_equal(mx_fake_quantize(x.bfloat16(), dim=-1, impl="eager"),
                       formats.mx_quantize(x.bfloat16(), dim=-1).dequantize())
    assert mx_fake_quantize(torch.zeros(0, 32), impl="eager").shape == (0, 32)


def test_bad_arguments_are_named():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="elem"):
        mx_fake_quantize(x, "e3m2")
    with pytest.raises(ValueError, match="impl"):
        nvfp4_fake_quantize(x, impl="fast")
    with pytest.raises(ValueError, match="rounding"):
        nvfp4_fake_quantize(x, rounding="up")
    with pytest.raises(TypeError, match="x"):
        mx_fake_quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_fake_quantize(torch.randn(4, 40), rht_seed=1)


def test_floor_log2_bit_path_equals_frexp(monkeypatch):
    """The compiled branch of formats._floor_log2 (bit pattern) equals frexp's on every subnormal and
    on both sides of every power of two of the normal range, plus random normals."""
    sub = torch.arange(1, 2**23, dtype=torch.int32).view(torch.float32)
    e = torch.arange(-126, 128, dtype=torch.int32)
    pow2 = ((e + 127) << 23).view(torch.float32)
    below = (((e + 127) << 23) - 1)[1:].view(torch.float32)
    rnd = torch.randint(1 << 23, 0x7F800000, (100000,), generator=torch.Generator().manual_seed(0),
                        dtype=torch.int32).view(torch.float32)
    a = torch.cat([sub, pow2, below, rnd, torch.tensor([formats.FLOAT32_MAX])])
    want = formats._floor_log2(a)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(formats._floor_log2(a), want)


def test_lowprec_compile_0_uses_the_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled although LOWPREC_COMPILE=0")

    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    monkeypatch.setattr(bfq, "run_compiled", boom)
    x = _operand()
    assert _bits_equal(mx_fake_quantize(x), formats.mx_quantize(x).dequantize())
    assert _bits_equal(nvfp4_fake_quantize(x, dim=0), formats.nvfp4_quantize(x, dim=0).dequantize())


# ----------------------------------------------------------------------------------------------
# Compiled (Inductor on the CPU): a few graphs, each checked on several shapes without recompiling
# ----------------------------------------------------------------------------------------------


def _compiled(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile or probe would warn
        return fn(*args, impl="compiled", **kw)


def test_compiled_mx_equals_reference():
    for shape in ((37, 70), (5, 33)):  # two shapes: the second reuses the first's (dynamic) graph
        x = _operand(*shape, seed=shape[0])
        # one configuration, the transposed layout with stochastic rounding (the most branches); the
        # others run the same arithmetic, checked bit-exactly eagerly above (each compile costs ~30 s)
        got = _compiled(mx_fake_quantize, x, "e2m1", dim=0, rounding="stochastic", seed=2**40 + 3)
        want = formats.mx_quantize(x, "e2m1", dim=0, rounding="stochastic", seed=2**40 + 3).dequantize()
        assert _bits_equal(got, want), shape
    assert bfq._VERIFIED["block_fake_quant:mx-e2m1-stochastic-t"]


def test_compiled_nvfp4_equals_reference():
    from lowprec.kernels.nvfp4_quantize import nvfp4_quantize

    for shape in ((48, 64), (80, 32)):
        x = _operand(*shape, seed=shape[1])
        kw = dict(dim=0, rounding="stochastic", seed=12345, rht_seed=77)
        assert _bits_equal(_compiled(nvfp4_fake_quantize, x, **kw), nvfp4_quantize(x, **kw).dequantize()), shape


def test_auto_compiles_only_operands_large_enough_to_pay():
    """``impl="auto"``: small operands run the fast arithmetic eagerly (same bits), large ones compiled."""
    small = _operand(8, 64)
    assert not bfq._compiles(small, "auto") and bfq._compiles(small, "compiled")
    assert bfq._compiles(torch.zeros(bfq.COMPILE_MIN_NUMEL), "auto") and not bfq._compiles(small, "eager")
    got = mx_fake_quantize(small, "e4m3", dim=1)
    assert _bits_equal(got, formats.mx_quantize(small, "e4m3", dim=1).dequantize())
