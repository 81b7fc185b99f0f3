"""Quantized-state AdamW: quantizers, the optimizer contract, checkpoints, bad input, and the
zero-point failure that the no-zero map for v prevents."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lowprec.formats import CodebookFormat, encode_codebook, linear_map
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
    StateFormat,
    decode4_arith,
    dequantize_blocks,
    dequantize_rank1,
    encode,
    encode4_arith,
    encode_codebook_search,
    encode_i32,
    pack_halves,
    quantize_blocks,
    quantize_rank1,
    unpack_halves,
    zero_state,
)

OPTIMIZERS = [AdamW4bit, AdamW8bit, AdamWFp8]


# ----------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STATE_FORMATS))
def test_encoders_agree_with_formats_nearest_code(name):
    """Binary search, compare-count (compiled path) and lowprec.formats' bucketize give one code."""
    sf = STATE_FORMATS[name]
    if sf.is_fp8:
        pytest.skip("FP8 states encode by torch's cast (checked below)")
    t = sf.fmt.table
    x = torch.cat([torch.rand(5000) * 2 - 1, t, sf.fmt.midpoints, sf.fmt.midpoints.nextafter(torch.tensor(2.0))])
    want = encode_codebook(x, sf.fmt)
    assert torch.equal(encode(x, sf), want)
    assert torch.equal(encode_i32(x, sf).to(torch.uint8), want)


def test_fp8_state_codes_are_torch_casts():
    x = torch.randn(4, 256)
    for sf in (M_E4M3_B256, V_E5M2_B256):
        codes, absmax = quantize_blocks(x, sf)
        n = x * (1.0 / absmax)[:, None]
        assert torch.equal(codes, (n * sf.fmt.max).clamp(-sf.fmt.max, sf.fmt.max).to(sf.fmt.dtype).view(torch.uint8))


def test_pack_halves_round_trip_and_layout():
    codes = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = pack_halves(codes)
    assert packed.shape == (3, 64)
    assert torch.equal(unpack_halves(packed), codes)
    assert torch.equal(packed[:, 5] & 15, codes[:, 5]) and torch.equal(packed[:, 5] >> 4, codes[:, 69])


@pytest.mark.parametrize("mf,vf", [(M_DE4_B128, V_LINEAR4_B128), (M_DE8_B256, V_DE8U_B256)])
def test_block_quantization_error_within_half_the_code_gap(mf, vf):
    """|x - deq(q(x))| <= absmax * (half the largest gap between adjacent codes, or the whole
    distance from the range's end to the outermost code: DE4 has no -1, v's map no 0)."""
    for sf, x in ((mf, torch.randn(8, mf.block_size) * torch.logspace(-8, 2, 8)[:, None]),
                  (vf, torch.rand(8, vf.block_size) * torch.logspace(-12, 0, 8)[:, None])):
        codes, absmax = quantize_blocks(x, sf)
        err = (dequantize_blocks(codes, absmax, sf) - x).abs()
        t = sf.fmt.table
        lo = -1.0 if float(t[0]) < 0 else 0.0
        edge = max(float(t[0]) - lo, 1.0 - float(t[-1]))
        bound = absmax[:, None] * max(float((t[1:] - t[:-1]).max()) / 2, edge) * (1 + 1e-6)
        assert bool((err <= bound).all()), (sf.name, float((err - bound).max()))


def test_zero_block_and_v_map_without_zero():
    codes, absmax = zero_state(1000, V_LINEAR4_B128)
    assert codes.shape == (8, 64) and absmax.shape == (8,)
    assert torch.equal(dequantize_blocks(codes, absmax, V_LINEAR4_B128), torch.zeros(8, 128))
    # a tiny positive v is never coded as zero by the no-zero map (the zero-point fix)
    x = torch.full((1, 128), 1e-9)
    x[0, 0] = 1.0
    c, a = quantize_blocks(x, V_LINEAR4_B128)
    assert bool((dequantize_blocks(c, a, V_LINEAR4_B128) > 0).all())


def test_rank1_normalisation_round_trip():
    v = torch.rand(48, 100) ** 4 * torch.logspace(-6, 0, 100)[None, :]
    codes, r, c = quantize_rank1(v, V_LINEAR4_B128)
    back = dequantize_rank1(codes, r, c, V_LINEAR4_B128)
    norm = torch.minimum(r[:, None], c[None, :])
    # interior gaps are 1/16 (error <= 1/32); below the first code 1/16 the error is up to 1/16
    assert bool(((back - v).abs() <= norm / 16 * (1 + 1e-6)).all())
    assert bool(((back - v).abs()[v >= norm / 16] <= (norm / 32 * (1 + 1e-6))[v >= norm / 16]).all())


# ----------------------------------------------------------------------------------------------
# Optimizer behaviour
# ----------------------------------------------------------------------------------------------


def _pair(shape=(64, 128), seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    w = torch.randn(shape).to(dtype)
    return nn.Parameter(w.clone()), nn.Parameter(w.clone())


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_first_step_equals_torch_adamw(cls):
    """Step 1 uses the unrounded new moments, so it equals AdamW with fp32 states up to float
    rounding of the same formula (and bit for bit our own fp32-state path)."""
    a, b = _pair()
    c = nn.Parameter(a.detach().clone())
    opt = cls([a], lr=1e-2, weight_decay=0.1, compile=False)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    fp32 = cls([c], lr=1e-2, weight_decay=0.1, min_quant_size=10**9, compile=False)
    g = torch.randn_like(a)
    for p in (a, b, c):
        p.grad = g.clone()
    opt.step(), ref.step(), fp32.step()
    assert "exp_avg_codes" in opt.state[a] and "exp_avg" in fp32.state[c]
    assert torch.equal(a, c)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_tracks_fp32_adamw_and_states_decode_close(cls):
    """Over 30 steps the weights stay close to fp32-state AdamW, and the dequantized moments are
    within a few code gaps of the fp32 ones."""
    a, b = _pair((32, 256))
    opt = cls([a], lr=1e-3, compile=False)
    ref = torch.optim.AdamW([b], lr=1e-3)
    for _ in range(30):
        g = torch.randn_like(a) * (1 + torch.arange(256) / 64)  # column-dependent scales
        a.grad, b.grad = g.clone(), g.clone()
        opt.step(), ref.step()
    moved = float((b.detach() - _pair((32, 256))[0].detach()).abs().mean())
    # measured (seed 0): 4-bit 0.26 / 0.34 / 0.12, 8-bit 0.02 / 0.03 / 0.02, FP8 0.05 / 0.06 / 0.15
    # (weights' gap relative to their movement; m and v relative errors); bounds ~1.5x that
    limits = {AdamW4bit: (0.4, 0.5, 0.2), AdamW8bit: (0.05, 0.05, 0.05), AdamWFp8: (0.1, 0.1, 0.25)}[cls]
    assert float((a - b).detach().abs().mean()) < limits[0] * moved
    st, rs = opt.state[a], ref.state[b]
    m = dequantize_blocks(st["exp_avg_codes"], st["exp_avg_absmax"], cls.M_FORMAT).reshape(a.shape)
    v = dequantize_blocks(st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], cls.V_FORMAT).reshape(a.shape)
    # the trajectories differ a little, so compare relative error of the states in aggregate
    assert float((m - rs["exp_avg"]).norm() / rs["exp_avg"].norm()) < limits[1]
    assert float((v - rs["exp_avg_sq"]).norm() / rs["exp_avg_sq"].norm()) < limits[2]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target)


def _train(model, opt, steps=150, batch=64, sched=None):
    x, y = _digits()
    losses = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls,kw", [(AdamW4bit, {}), (AdamW8bit, {}), (AdamWFp8, {}),
                                    (AdamW4bit, {"factor_second_moment": True}), (AdamW4bit, {"v_mode": "rank1"})])
def test_loss_goes_down_on_digits(cls, kw):
    model = _mlp()
    opt = cls(model.parameters(), lr=1e-2, compile=False, **kw)
    losses = _train(model, opt, steps=40)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.35 * sum(losses[:5]) / 5
    assert "exp_avg_codes" in opt.state[model[0].weight]  # 8192 elements: quantized
    assert "exp_avg" in opt.state[model[0].bias]  # 128 elements: fp32


def test_state_bytes_per_param():
    p = nn.Parameter(torch.zeros(512, 512))
    for cls, kw, limit in ((AdamW4bit, {}, 1.07), (AdamW8bit, {}, 2.04), (AdamWFp8, {}, 2.04),
                           (AdamW4bit, {"factor_second_moment": True}, 0.6)):
        opt = cls([p], compile=False, **kw)
        p.grad = torch.zeros_like(p)
        opt.step()
        assert opt.state_nbytes() / p.numel() <= limit, (cls.__name__, kw, opt.state_nbytes() / p.numel())


def test_threshold_padding_and_fp32_by_name():
    model = nn.ModuleDict(dict(embed=nn.Embedding(100, 64), odd=nn.Linear(4097, 1, bias=False),
                               small=nn.Linear(8, 8)))
    opt = AdamW4bit(model.named_parameters(), fp32_state_patterns=[r"embed"], compile=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = model["odd"].weight.detach().clone()
    opt.step()
    st = opt.state
    assert "exp_avg" in st[model["embed"].weight]  # 6400 elements but matched by name
    assert "exp_avg" in st[model["small"].weight]  # below 4096
    odd = st[model["odd"].weight]  # 4097 elements: padded to 33 blocks, not left in fp32
    assert odd["exp_avg_codes"].shape == (33, 64) and odd["exp_avg_absmax"].shape == (33,)
    assert not torch.equal(before, model["odd"].weight)
    # the padded tail is updated like the rest: compare with the fp32-state path on step 1
    ref = nn.Parameter(before.clone())
    ref.grad = model["odd"].weight.grad.clone()
    AdamW4bit([ref], min_quant_size=10**9, compile=False).step()
    assert torch.equal(ref, model["odd"].weight)


def test_bf16_params_use_fp32_math():
    a, _ = _pair((64, 128), dtype=torch.bfloat16)
    b = nn.Parameter(a.detach().float())
    oa, ob = AdamW4bit([a], lr=1e-3, compile=False), AdamW4bit([b], lr=1e-3, compile=False)
    g = torch.randn(64, 128)
    a.grad, b.grad = g.bfloat16(), g.bfloat16().float()
    oa.step(), ob.step()
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b.bfloat16())  # fp32 math, one rounding to bf16 at the end


def test_param_groups_scheduler_zero_grad_maximize():
    model = _mlp()
    opt = AdamW4bit([{"params": model[0].parameters(), "lr": 1e-3},
                     {"params": model[2].parameters(), "weight_decay": 0.0}], lr=5e-3, maximize=False, compile=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    _train(model, opt, steps=10, sched=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # maximize ascends: one step with maximize equals one step on the negated gradient
    a, b = _pair()
    a.grad = torch.randn_like(a)
    b.grad = -a.grad
    AdamW4bit([a], maximize=True, compile=False).step()
    AdamW4bit([b], compile=False).step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", [(AdamW4bit, {}), (AdamW8bit, {}), (AdamWFp8, {}),
                                    (AdamW4bit, {"factor_second_moment": True}), (AdamW4bit, {"v_mode": "rank1"})])
def test_state_dict_round_trip_is_bit_exact(cls, kw):
    """Save after 5 steps, load into a fresh optimizer with weights_only=True, continue 10 steps:
    identical to the uninterrupted run, bit for bit (schedule included)."""
    def make(model):
        opt = cls(model.parameters(), lr=3e-3, compile=False, **kw)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)

    model = _mlp()
    opt, sched = make(model)
    _train(model, opt, steps=5, sched=sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _train(model, opt, steps=10, sched=sched)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = _mlp(seed=1)
    model2.load_state_dict(ck["model"])
    opt2, sched2 = make(model2)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    _train(model2, opt2, steps=10, sched=sched2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_group_and_counts(bad):
    model = _mlp()
    opt = AdamW4bit([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2, compile=False)
    _train(model, opt, steps=2)
    snap_w = [p.detach().clone() for p in model.parameters()]
    snap_s = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad[3, 5] = bad
    opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 1 and opt.param_groups[1]["skipped_steps"] == 0
    assert opt.skipped_steps == 1
    for p, w in zip(model[0].parameters(), snap_w[:2]):
        assert torch.equal(p, w)
        for k, v in opt.state[p].items():
            assert torch.equal(v, snap_s[id(p)][k]), k
    assert not torch.equal(model[2].weight, snap_w[2])  # the healthy group still stepped
    opt_r = AdamW4bit(model.parameters(), nonfinite="raise", compile=False)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt_r.step()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW4bit([])
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW4bit([nn.Parameter(torch.zeros(3))], amsgrad=True)
    emb = nn.Embedding(100, 64, sparse=True)
    opt = AdamW4bit(emb.parameters(), compile=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    z = nn.Parameter(torch.zeros(8, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        AdamW8bit([z], compile=False).step()


# ----------------------------------------------------------------------------------------------
# The zero-point problem (Li et al. 2023, section 4.1)
# ----------------------------------------------------------------------------------------------

V_LINEAR4_WITH_ZERO = StateFormat("linear4z-b128", CodebookFormat("linear4z", linear_map(4, include_zero=True)), 128)


class _AdamW4bitZeroV(AdamW4bit):
    """The same 4-bit optimizer, but v's linear map contains zero: the failure mode."""

    V_FORMAT = V_LINEAR4_WITH_ZERO


def test_zero_point_in_v_map_diverges_ours_does_not():
    """With zero in v's map, small second moments round to 0 and the next update is
    m / (sqrt(v) + eps) with v ~ (1 - beta2) g^2: steps up to ~30x too large, and the loss blows up
    within a few steps. The same quantizer with the map (i + 1) / 16 trains."""
    results = {}
    for cls in (_AdamW4bitZeroV, AdamW4bit):
        model = _mlp()
        opt = cls(model.parameters(), lr=1e-2, compile=False)
        results[cls] = _train(model, opt, steps=60, batch=64)
    bad, good = results[_AdamW4bitZeroV], results[AdamW4bit]
    # measured: zero in the map -> loss 57 by step 5 and 30-200 after; ours 2.3 -> ~0.2
    assert all(math.isfinite(v) for v in good) and sum(good[-10:]) / 10 < 0.5
    worst = max((v if math.isfinite(v) else float("inf")) for v in bad[10:])
    assert worst > 10 * max(good[10:]), (worst, max(good[10:]))


# ----------------------------------------------------------------------------------------------
# The compiled CPU step
# ----------------------------------------------------------------------------------------------


def test_vector_friendly_4bit_encode_decode_equal_the_tables():
    """The compiled path's 4-bit decode (affine for the linear map, a select tree otherwise) equals
    the table on every code, and its encode (closed form / select-driven binary search) equals the
    table-based binary search on random values, every code value, every midpoint and its two
    float32 neighbours, values beyond the map, tiny, huge, signed zeros, infinities and NaN."""
    for sf in (M_DE4_B128, V_LINEAR4_B128):
        codes = torch.arange(16, dtype=torch.int32)
        assert torch.equal(decode4_arith(codes, sf), sf.table())
        mids = sf.midpoints()
        x = torch.cat([torch.rand(20000) * 2.2 - 1.1, torch.rand(20000) * 1e-2, sf.table(), -sf.table(), mids,
                       mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)),
                       torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38, float("inf"), -float("inf"),
                                     float("nan")])])
        want = encode_codebook_search(x, mids, sf.search_steps)
        assert torch.equal(encode4_arith(x, sf).to(torch.uint8), want)


@pytest.mark.slow
@pytest.mark.parametrize("mf,vf", [(M_DE4_B128, V_LINEAR4_B128), (M_E4M3_B256, V_E5M2_B256)])
def test_compiled_step_matches_eager_reference(mf, vf, monkeypatch):
    """The optimizer's compiled CPU step (two graphs per format pair, block count dynamic, run in
    chunks) against the eager reference, bit for bit, 3 steps, two sizes, several chunks each."""
    from lowprec.optim import adamw as A

    monkeypatch.setattr(A, "CPU_CHUNK_ELEMENTS", 16 * mf.block_size)
    for n in (64 * mf.block_size, 37 * mf.block_size):
        torch.manual_seed(n)
        p = torch.randn(n // mf.block_size, mf.block_size)
        args = [zero_state(n, mf), zero_state(n, vf)]
        ref = [p.clone(), *(t.clone() for s in args for t in s)]
        fast = [p.clone(), *(t.clone() for s in args for t in s)]
        for i in range(1, 4):
            g = torch.randn_like(p) * 1e-2
            hp = F.hyperparams(1e-2, 0.9, 0.999, 1e-8, 0.01, i)
            F.adamw_blocks_(ref[0], g, *ref[1:], hp, mf, vf)
            A._compiled_blocks_step(fast[0], g, *fast[1:], hp, mf, vf, False)
            for a, b in zip(ref, fast):
                assert torch.equal(a, b)
