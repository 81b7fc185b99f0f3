"""The C kernel of the quantized AdamW step (kernels/adamw_step_cpu.c) against its oracle, the eager
PyTorch reference ``lowprec.optim.functional.adamw_blocks_``: bit for bit, for every state format,
parameter dtype, thread count, and for both the AVX-512 build this machine gets and the portable
build (no -march), so the scalar fallbacks are checked here too."""

from __future__ import annotations

import ctypes
import warnings

import numpy as np
import pytest
import torch

from lowprec.kernels import adamw_step_cpu as K
from lowprec.kernels import cpu_library
from lowprec.optim import AdamW4bit, AdamW8bit, AdamWFp8
from lowprec.optim import functional as F
from lowprec.optim.state_quant import (
    M_DE4_B128,
    M_DE8_B256,
    M_E4M3_B256,
    STATE_FORMATS,
    V_DE8U_B256,
    V_E5M2_B256,
    V_LINEAR4_B128,
    encode,
    zero_state,
)

pytestmark = pytest.mark.skipif(not K.available(), reason="no C compiler: the optimizer uses its PyTorch path")

PAIRS = [(M_DE4_B128, V_LINEAR4_B128), (M_DE8_B256, V_DE8U_B256), (M_E4M3_B256, V_E5M2_B256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    """Run a test against the -march=native library and against the portable one (no target
    flags: SSE2 on x86-64, so every AVX-512 path is compiled out)."""
    if request.param == "portable":
        lib = K.bind(ctypes.CDLL(str(cpu_library.build(K.LIBRARY, ()))))
        monkeypatch.setattr(K, "_library", lambda: lib)
    return request.param


def _probe_values(sf) -> torch.Tensor:
    """Normalised values that decide an encoder: random, every code value, every decision
    boundary and its two float32 neighbours, tiny and huge values, signed zeros, infinities, NaN."""
    g = torch.Generator().manual_seed(0)
    if sf.is_fp8:
        vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(sf.fmt.dtype).float()
        vals = vals[torch.isfinite(vals)].sort().values
        mids = (vals[1:] + vals[:-1]) / 2
        grid = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9))]) / sf.fmt.max
        rand = torch.randn(100_000, generator=g) * torch.exp(torch.randn(100_000, generator=g) * 3) / sf.fmt.max
    else:
        mids = sf.midpoints()
        grid = torch.cat([sf.table(), -sf.table(), mids, mids.nextafter(torch.tensor(2.0)),
                          mids.nextafter(torch.tensor(-2.0))])
        rand = torch.cat([torch.rand(100_000, generator=g) * 2.2 - 1.1, torch.randn(20_000, generator=g) * 1e-6])
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3e38, -3e38, float("inf"), -float("inf"),
                            float("nan")])
    return torch.cat([rand, grid, special])


@pytest.mark.parametrize("name", sorted(STATE_FORMATS))
def test_encoder_equals_reference(name, build):
    sf = STATE_FORMATS[name]
    x = _probe_values(sf)
    assert torch.equal(K.encode(x, sf), encode(x, sf).to(torch.int32))


def test_bucket_table_puts_at_most_one_midpoint_in_a_bucket():
    """The 8-bit encoder's lookup: counting midpoints below each value exhaustively over a sample
    of bucket edges agrees with the table (and too coarse a bucket is refused)."""
    mids = M_DE8_B256.midpoints().numpy()
    start = K.bucket_table(mids, 16)
    assert start is not None
    keys = np.arange(0, 1 << 16, 7, dtype=np.uint32)
    lows = (keys << 16).view(np.float32)
    finite = np.isfinite(lows) & (lows >= 0)
    want = np.searchsorted(mids, lows[finite], side="left")
    assert np.array_equal(start[keys[finite]], want)
    assert K.bucket_table(mids, 26) is None  # 64 buckets cannot separate 255 midpoints


@pytest.mark.parametrize("mf,vf", PAIRS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_equals_reference(mf, vf, dtype, build):
    """Four steps from zero states, with a zero block, a block of tiny gradients, maximize on the
    odd steps: parameter, codes and absmax bit-equal to the eager reference after every step."""
    bs = mf.block_size
    n = 37 * bs
    torch.manual_seed(bs + len(str(dtype)))
    p = torch.randn(n // bs, bs).to(dtype)
    p[3] = 0
    states = [*zero_state(n, mf), *zero_state(n, vf)]
    ref = [p.clone(), *(t.clone() for t in states)]
    fast = [p.clone(), *(t.clone() for t in states)]
    for step in range(1, 5):
        g = (torch.randn(n // bs, bs) * 1e-2).to(dtype)
        g[5] = 0
        g[6, :7] = 1e-30
        hp = F.hyperparams(1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        F.adamw_blocks_(ref[0], g, *ref[1:], hp, mf, vf, maximize=bool(step % 2))
        K.adamw_blocks_cpu_(fast[0], g, *fast[1:], hp, mf, vf, maximize=bool(step % 2))
        for name, a, b in zip(("p", "m_codes", "m_absmax", "v_codes", "v_absmax"), ref, fast):
            assert torch.equal(a, b), (name, step)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_blocks_without_changing_bits(threads, monkeypatch):
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 128)
    mf, vf = M_DE4_B128, V_LINEAR4_B128
    n = 101 * 128
    p = torch.randn(n // 128, 128)
    states = [*zero_state(n, mf), *zero_state(n, vf)]
    one = [p.clone(), *(t.clone() for t in states)]
    many = [p.clone(), *(t.clone() for t in states)]
    for step in range(1, 3):
        g = torch.randn(n // 128, 128) * 1e-3
        hp = F.hyperparams(1e-3, 0.9, 0.95, 1e-8, 0.1, step)
        K.adamw_blocks_cpu_(one[0], g, *one[1:], hp, mf, vf, threads=1)
        K.adamw_blocks_cpu_(many[0], g, *many[1:], hp, mf, vf, threads=threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", [(AdamW4bit, {}), (AdamW4bit, {"v_mode": "rank1"}), (AdamW8bit, {}),
                                    (AdamWFp8, {})], ids=["4bit", "4bit-rank1", "8bit", "fp8"])
def test_optimizer_with_c_kernel_equals_eager_optimizer(cls, kw):
    """Whole optimizer: the default (C kernel) and compile=False (eager reference) give the same
    weights and state_dict after 5 steps, with a padded (non-multiple-of-block) tensor, a bf16
    parameter and an fp32-state one."""
    torch.manual_seed(0)
    shapes = [(64, 96), (3, 2000), (10,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    ps = [[torch.randn(s).to(d).requires_grad_() for s, d in zip(shapes, dtypes)] for _ in range(2)]
    for a, b in zip(*ps):
        b.data.copy_(a.data)
    fast = cls(ps[0], lr=1e-2, weight_decay=0.1, **kw)
    eager = cls(ps[1], lr=1e-2, weight_decay=0.1, compile=False, **kw)
    for _ in range(5):
        for a, b in zip(*ps):
            grad = torch.randn(a.shape).to(a.dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        fast.step()
        eager.step()
    for a, b in zip(*ps):
        assert torch.equal(a, b)
    sa, sb = fast.state_dict()["state"], eager.state_dict()["state"]
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in sa[i]:
            a, b = sa[i][key], sb[i][key]  # tensors, and the state_format record (a str)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (i, key)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    """A compiler that fails is a warning and a PyTorch step, never an error or a wrong result."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv(cpu_library.ENV_CACHE, str(tmp_path))
    cpu_library.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_library.load(K.LIBRARY) is None
        assert any("C kernel adamw_step_cpu unavailable" in str(w.message) for w in caught)
    finally:
        cpu_library.load.cache_clear()
    monkeypatch.setenv(cpu_library.ENV_DISABLE, "0")
    assert cpu_library.load(K.LIBRARY) is None
    cpu_library.load.cache_clear()


def test_bad_arguments_are_named():
    mf, vf = M_DE4_B128, V_LINEAR4_B128
    p = torch.zeros(2, 128)
    mc, ma = zero_state(256, mf)
    vc, va = zero_state(256, vf)
    hp = F.hyperparams(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="m_codes must be torch.uint8 of shape"):
        K.adamw_blocks_cpu_(p, p.clone(), mc[:1], ma, vc, va, hp, mf, vf)
    with pytest.raises(ValueError, match="expected p and g of one dtype"):
        K.adamw_blocks_cpu_(p, p.double(), mc, ma, vc, va, hp, mf, vf)
    with pytest.raises(ValueError, match="p must be a contiguous CPU tensor"):
        K.adamw_blocks_cpu_(torch.zeros(128, 2).t(), p, mc, ma, vc, va, hp, mf, vf)


def test_optimizer_routes_cpu_tensors_through_one_c_call_per_kind(monkeypatch):
    """A group's block-quantized tensors go to the C kernel in one call, its fp32-state tensors in
    another, a tensor that is not a whole number of blocks in a call of its own on a padded copy;
    LOWPREC_KERNELS=torch takes the PyTorch path."""
    calls = []
    for fn in ("adamw_tensors_cpu_", "adamw_fp32_tensors_cpu_"):
        real = getattr(K, fn)
        monkeypatch.setattr(K, fn, lambda *a, _real=real, _fn=fn, **k: (calls.append((_fn, len(a[0]))), _real(*a, **k)))
    ps = [torch.zeros(64, 128, requires_grad=True), torch.zeros(32, 256, requires_grad=True),
          torch.zeros(10, requires_grad=True), torch.zeros(3, 2000, requires_grad=True)]
    opt = AdamW4bit(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(calls) == [("adamw_fp32_tensors_cpu_", 1), ("adamw_tensors_cpu_", 1), ("adamw_tensors_cpu_", 2)]
    calls.clear()
    monkeypatch.setenv("LOWPREC_KERNELS", "torch")
    opt.step()
    assert calls == []
    assert all(float(opt.state[p]["step"]) == 2.0 for p in ps)


@pytest.mark.parametrize("mf,vf", PAIRS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", [(64, 96), (3, 2000), (300, 7)], ids=str)
def test_rank1_step_equals_reference(mf, vf, shape, build, monkeypatch):
    """Rank-1 normalised v (two passes, per-thread row/column maxima): parameter, m's codes and
    absmax, v's codes and row/column maxima bit-equal to ``adamw_rank1_`` after every step, for
    rows shorter and longer than a block, a padded last block, fp32/bf16/fp16 and 1 or 3 threads."""
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 64)
    n = shape[0] * shape[1]
    for dtype, threads in ((torch.float32, 1), (torch.bfloat16, 3), (torch.float16, 3)):
        torch.manual_seed(n)
        p = torch.randn(shape).to(dtype)
        mc, ma = zero_state(n, mf)
        vc, _ = zero_state(n, vf)
        states = [mc, ma, vc, torch.zeros(shape[0]), torch.zeros(shape[1])]
        ref = [p.clone(), *(t.clone() for t in states)]
        fast = [p.clone(), *(t.clone() for t in states)]
        for step in range(1, 4):
            g = (torch.randn(shape) * 1e-2).to(dtype)
            hp = F.hyperparams(1e-2, 0.9, 0.999, 1e-8, 0.01, step)
            F.adamw_rank1_(ref[0], g, *ref[1:], hp, mf, vf, bool(step % 2))
            K.adamw_rank1_cpu_(fast[0], g, *fast[1:], hp, mf, vf, bool(step % 2), threads=threads)
            for name, a, b in zip(("p", "m_codes", "m_absmax", "v_codes", "v_row", "v_col"), ref, fast):
                assert torch.equal(a, b), (name, dtype, step)


def test_fp8_special_codes_decode_through_the_table(build):
    """FP8 states are decoded arithmetically except in blocks holding an Inf/NaN code, whose table
    entries (NaN -> 0, Inf -> the largest float) the arithmetic would not give: such a block still
    matches the reference bit for bit."""
    mf, vf = M_E4M3_B256, V_E5M2_B256
    n = 4 * 256
    p = torch.randn(4, 256)
    states = [*zero_state(n, mf), *zero_state(n, vf)]
    g = torch.randn(4, 256) * 1e-2
    hp = F.hyperparams(1e-2, 0.9, 0.999, 1e-8, 0.01, 1)
    F.adamw_blocks_(p, g, *states, hp, mf, vf)  # realistic codes and absmax
    states[0][1, :3] = torch.tensor([0x7F, 0xFF, 0x7E], dtype=torch.uint8)  # E4M3: NaN, -NaN, 448
    states[2][2, :3] = torch.tensor([0x7C, 0x7D, 0x7F], dtype=torch.uint8)  # E5M2: +Inf, NaN, NaN (-Inf would
    # make v negative and p NaN, which torch.equal cannot compare)
    ref = [p.clone(), *(t.clone() for t in states)]
    fast = [p.clone(), *(t.clone() for t in states)]
    hp = F.hyperparams(1e-2, 0.9, 0.999, 1e-8, 0.01, 2)
    F.adamw_blocks_(ref[0], g, *ref[1:], hp, mf, vf)
    K.adamw_blocks_cpu_(fast[0], g, *fast[1:], hp, mf, vf)
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_finite_finds_every_nan_and_inf(dtype, monkeypatch):
    """The group's finite check: False for a NaN or +-Inf anywhere (first, last, middle tensor,
    any thread's range), True for finite values up to the dtype's max; None for tensors it cannot
    read (non-contiguous), so the optimizer falls back to its sum check."""
    monkeypatch.setattr(K, "PARALLEL_MIN_ELEMENTS", 64)
    big = torch.finfo(dtype).max
    ts = [torch.full((5,), big, dtype=dtype), torch.randn(1000).to(dtype), torch.zeros(3, dtype=dtype)]
    for threads in (1, 3):
        assert K.all_finite(ts, threads=threads) is True
        for bad in (float("nan"), float("inf"), -float("inf")):
            for ti, idx in ((0, 0), (1, 999), (1, 500), (2, 2)):
                t2 = [t.clone() for t in ts]
                t2[ti][idx] = bad
                assert K.all_finite(t2, threads=threads) is False, (bad, ti, idx)
    assert K.all_finite([torch.zeros(4, 4).t()]) is None
