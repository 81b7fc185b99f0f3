"""FP8 training kernels (fused cast+transpose+amax, delayed-scaling amax/scale update) against
their PyTorch references, bit for bit, on small ragged shapes.

Triton decides at decoration time whether a kernel is interpreted, so the kernel cases run in a
child process with ``TRITON_INTERPRET=1`` (CPU tensors); on a CUDA machine they also run
in-process, compiled. Dispatch and bad-input checks run in the main process.
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

from lowprec.kernels.fp8_amax_scale import (
    amax_scale_update,
    amax_scale_update_reference,
    amax_scale_update_triton,
)
from lowprec.kernels.fp8_cast_transpose import cast_transpose, cast_transpose_reference, cast_transpose_triton

SHAPES = [(1, 1), (1, 5), (5, 1), (7, 33), (33, 17), (64, 16), (40, 70), (0, 5)]


def _same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bytes, except that any NaN equals any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    na, nb = torch.isnan(a.float()).cpu(), torch.isnan(b.float()).cpu()
    ab, bb = a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu()
    return torch.equal(na, nb) and torch.equal(ab[~na], bb[~nb])


def _values(shape, spread: float, seed: int) -> torch.Tensor:
    """Random values with the awkward ones spliced in: NaN, +-inf, -0, float32 subnormals, overflow,
    and the rounding carries the interpreter's own conversion gets wrong (31.13, -121.75)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread
    special = torch.tensor([31.13, -121.75, -0.0, 1e-40, 1e30, -1e30, 0.0, float("inf"), float("nan")])
    flat = x.view(-1)
    k = min(flat.numel(), special.numel())
    flat[:k] = special[:k]
    return x


@parent_only
def test_kernels_bit_exact_under_the_triton_interpreter():
    run_in_interpreter(__file__, min_passed=30)


# ----------------------------------------------------------------------------------------------
# cast + transpose + amax
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cast_transpose_bit_exact(fmt, shape):
    spread = 60.0 if fmt == "e4m3" else 20000.0
    for i, (scale, nan_free) in enumerate(((1.0, False), (3.7, True), (1e-3, True), (2.0**20, True))):
        x = _values(shape, spread, seed=i).to(DEVICE)
        if nan_free:
            x = torch.nan_to_num(x, nan=1.0)
        s = torch.tensor(scale, device=DEVICE)
        q, qt, amax = cast_transpose_triton(x, s, fmt)
        rq, rqt, ramax = cast_transpose_reference(x, s, fmt)
        assert _same_fp8(q, rq), (fmt, shape, scale)
        assert _same_fp8(qt, rqt) and qt.shape == (shape[1], shape[0])
        assert torch.equal(amax.isnan(), ramax.isnan()) and (amax.isnan() or amax == ramax)


@needs_kernels
def test_cast_transpose_every_fp8_code_and_midpoint():
    """Every finite E4M3/E5M2 value, the midpoints between neighbours (ties go to even) and values
    just off the codes: all land where torch's cast puts them."""
    for fmt, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        codes = torch.arange(256, dtype=torch.uint8).view(dt).float()
        codes = codes[torch.isfinite(codes)].sort().values
        v = torch.cat([codes, (codes[:-1] + codes[1:]) / 2, codes * (1 + 2**-5), codes * (1 - 2**-5),
                       torch.nextafter(codes, torch.full_like(codes, 1e9))])
        x = v.reshape(-1, 1).to(DEVICE)
        q, _, _ = cast_transpose_triton(x, torch.tensor(1.0, device=DEVICE), fmt, transpose=False)
        rq, _, _ = cast_transpose_reference(x, torch.tensor(1.0, device=DEVICE), fmt, transpose=False)
        assert _same_fp8(q, rq), fmt


@needs_kernels
def test_cast_transpose_strided_and_half_precision_inputs():
    base = _values((24, 40), 30.0, seed=5).to(DEVICE)
    for x in (base.t(), base[:, ::2], base.to(torch.bfloat16), base.to(torch.float16)):
        s = torch.tensor(2.5, device=DEVICE)
        q, qt, amax = cast_transpose_triton(x, s, "e4m3")
        rq, rqt, ramax = cast_transpose_reference(x, s, "e4m3")
        assert _same_fp8(q, rq) and _same_fp8(qt, rqt)
        assert torch.equal(amax.isnan(), ramax.isnan())


# ----------------------------------------------------------------------------------------------
# amax history + scale update
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("h", [1, 7, 300, 1024])
@pytest.mark.parametrize("reduction", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_amax_scale_update_bit_exact(h, reduction, margin):
    g = torch.Generator().manual_seed(h + margin)
    n = 5
    hist = (torch.rand(n, h, generator=g) * 10).to(DEVICE)
    hist[3] = 0.0  # an all-zero window
    amax = torch.tensor([3.3, float("nan"), 0.0, 0.0, float("inf")], device=DEVICE)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=DEVICE)
    fmax = torch.tensor([448.0, 448.0, 57344.0, 448.0, 57344.0], device=DEVICE)
    for pos in sorted({0, h // 2, h - 1}):
        ht, hr = hist.clone(), hist.clone()
        st, sr = scale.clone(), scale.clone()
        _, kt = amax_scale_update_triton(ht, amax, st, fmax, pos, margin, reduction, block_h=64)
        _, kr = amax_scale_update_reference(hr, amax, sr, fmax, pos, margin, reduction)
        assert torch.equal(ht, hr) and torch.equal(st, sr) and torch.equal(kt, kr)
        # the invariants, independently of the reference
        assert bool(torch.isfinite(st).all()) and bool((st > 0).all())
        assert kr[1] and kr[3] and kr[4] and not kr[0]  # NaN, empty window, inf kept; 3.3 did not
        assert st[1] == scale[1] and st[4] == scale[4]


# ----------------------------------------------------------------------------------------------
# Main process: dispatch and bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="checks the CPU dispatch")
def test_dispatch_picks_the_reference_on_cpu_and_refuses_forced_triton(monkeypatch):
    x = torch.randn(6, 10) * 10
    q, qt, amax = cast_transpose(x, torch.tensor(2.0), "e5m2")
    rq, rqt, ramax = cast_transpose_reference(x, torch.tensor(2.0), "e5m2")
    assert _same_fp8(q, rq) and _same_fp8(qt, rqt) and amax == ramax
    hist = torch.zeros(2, 4)
    s, kept = amax_scale_update(hist, torch.tensor([2.0, 0.0]), torch.ones(2), torch.tensor([448.0, 57344.0]), 1)
    assert s.tolist() == [224.0, 1.0] and kept.tolist() == [False, True] and hist[0, 1] == 2.0
    monkeypatch.setenv("LOWPREC_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cast_transpose(x, torch.tensor(1.0), "e4m3")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2-D tensor"):
        cast_transpose_reference(torch.randn(2, 3, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="e4m3 or e5m2"):
        cast_transpose_reference(torch.randn(2, 3), torch.tensor(1.0), "fp16")
    with pytest.raises(TypeError, match="floating point"):
        cast_transpose_reference(torch.ones(2, 3, dtype=torch.int32), torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32 \\(n, H\\)"):
        amax_scale_update_reference(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2), torch.ones(2),
                                    torch.ones(2), 0)
    with pytest.raises(ValueError, match="outside the window"):
        amax_scale_update_reference(torch.zeros(2, 4), torch.zeros(2), torch.ones(2), torch.ones(2), 4)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        amax_scale_update_reference(torch.zeros(2, 4), torch.zeros(3), torch.ones(2), torch.ones(2), 0)


# ----------------------------------------------------------------------------------------------
# GEMM dispatch by compute capability (faked: this machine has no GPU)
# ----------------------------------------------------------------------------------------------


def _fake_capability(monkeypatch, cap):
    """Make every device look like a CUDA GPU of capability ``cap`` to the GEMM dispatch, and
    forget earlier warnings, so the decision and the warning can be checked on the CPU."""
    import lowprec.matmul.functional as fn

    monkeypatch.setattr(fn, "capability_of", lambda device: cap)
    monkeypatch.setattr(fn, "_warned_no_fp8", set())


@pytest.mark.skipif(INTERPRETED, reason="checks the non-interpreted process")
def test_auto_gemm_picks_scaled_mm_only_from_sm89(monkeypatch):
    import warnings

    from lowprec.matmul.functional import Fp8EmulationWarning, resolve_backend

    for cap, want in (((8, 0), "emulated"), ((8, 6), "emulated"), ((8, 9), "scaled_mm"), ((9, 0), "scaled_mm"),
                      ((10, 0), "scaled_mm"), (None, "emulated")):
        _fake_capability(monkeypatch, cap)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [resolve_backend("auto", torch.device("cpu")) for _ in range(3)]
            assert resolve_backend("emulated", torch.device("cpu")) == "emulated"
            assert resolve_backend("scaled_mm", torch.device("cpu")) == "scaled_mm"  # explicit: as asked
        assert got == [want] * 3
        n_warn = sum(issubclass(w.category, Fp8EmulationWarning) for w in caught)
        assert n_warn == (1 if want == "emulated" and cap is not None else 0), (cap, n_warn)


@pytest.mark.skipif(INTERPRETED, reason="checks the non-interpreted process")
@pytest.mark.parametrize("recipe", ["fp8", "unit-fp8", "fp8-delayed"])
def test_faked_sm80_runs_fp8_recipes_forward_and_backward_emulated_with_one_warning(monkeypatch, recipe):
    """An A100 (8.0): torch._scaled_mm would raise there, so it must never be called; training
    steps run the emulated GEMM and the user is told once that FP8 gives no speed-up."""
    import warnings

    from torch import nn

    import lowprec
    from lowprec.matmul.functional import Fp8EmulationWarning

    _fake_capability(monkeypatch, (8, 0))

    def refuse(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    model = lowprec.convert(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)), recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(16, 32, requires_grad=True)
            loss = model(x).square().mean()
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(issubclass(w.category, Fp8EmulationWarning) for w in caught) == 1


@pytest.mark.skipif(INTERPRETED, reason="checks the non-interpreted process")
def test_faked_sm90_uses_scaled_mm(monkeypatch):
    """On 8.9+ the same model goes through torch._scaled_mm (which also runs on the CPU here)."""
    from torch import nn

    import lowprec

    _fake_capability(monkeypatch, (9, 0))
    calls = []
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    model = lowprec.convert(nn.Sequential(nn.Linear(32, 64)), "fp8")
    model(torch.randn(16, 32, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # forward, grad-input, grad-weight
