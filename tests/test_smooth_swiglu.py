"""Smooth-SwiGLU: function-preserving in fp32, exact gradients through the smoothed FP8 GEMM,
and the outlier case it exists for (aligned w1/w2 channels, an input spike, delayed scaling)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec
from lowprec.formats import E4M3, E5M2
from lowprec.matmul import Fp8Gemm, ScalingConfig, smooth_swiglu, smoothing_scales, swiglu
from lowprec.recipes import Recipe


class SwiGLU(nn.Module):
    def __init__(self, d: int = 64, f: int = 128) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _recipe(**cast) -> Recipe:
    return Recipe.from_dict({"name": "t", "cast": {"format": "fp8", "keep_high_precision": [], **cast}})


def _fq(t, fmt, s):
    return (t.float() * s).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() / s


@pytest.mark.parametrize("power_of_two", [True, False])
def test_smooth_swiglu_is_function_preserving_in_fp32(power_of_two):
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64)
    wg, wu, wd = torch.randn(128, 64) / 8, torch.randn(128, 64) / 8, torch.randn(64, 128) / 11
    wu[5] = wg[5] * 4  # an aligned channel: h has one large channel, so s really varies
    ref = swiglu(x, wg, wu, wd)
    out = smooth_swiglu(x, wg, wu, wd, quantize=None, power_of_two=power_of_two)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()  # max abs difference relative to the output's max
    assert rel <= 1e-6
    if power_of_two:  # multiplying by a power of two is exact: same bits
        assert torch.equal(out, ref)


def test_smoothing_scales_are_powers_of_two_that_bring_each_channel_to_unit_range():
    h = torch.randn(50, 48) * torch.logspace(-3, 3, 48)
    h[:, 7] = 0.0
    h[0, 9] = float("nan")
    s = smoothing_scales(h)
    m, e = torch.frexp(s)
    assert torch.all(m == 0.5)  # powers of two
    amax = (h * s).abs().amax(0)
    ok = torch.ones(48, dtype=torch.bool)
    ok[[7, 9]] = False
    assert torch.all(amax[ok] > 0.5) and torch.all(amax[ok] <= 1.0)
    assert s[7] == 1.0 and s[9] == 1.0


def test_smoothed_fp8_gemm_matches_its_definition_forward_and_backward():
    torch.manual_seed(0)
    h = torch.randn(64, 128)
    h[:, 3] *= 300  # an outlier channel
    w = torch.randn(32, 128) * 0.05
    dy = torch.randn(64, 32) * 1e-2
    gemm = Fp8Gemm(ScalingConfig(kind="current"), backend="emulated", smooth=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    y = gemm(hh, ww)
    y.backward(dy)
    s = smoothing_scales(h)
    hs, ws = h * s, w / s
    hq = _fq(hs, E4M3, E4M3.max / hs.abs().max())
    wq = _fq(ws, E4M3, E4M3.max / ws.abs().max())
    dyq = _fq(dy, E5M2, E5M2.max / dy.abs().max())
    torch.testing.assert_close(y.detach(), hq @ wq.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, (dyq @ wq) * s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ww.grad, (dyq.t() @ hq) / s, rtol=1e-5, atol=1e-7)


def _outlier_case():
    """A SwiGLU MLP whose w1 (up) and w2 (gate) rows are aligned on two channels (what weight
    decay does late in long runs), and a batch where one token points along that direction: the
    aligned channels of h grow quadratically (~60x the usual amax here) while x stays in range."""
    torch.manual_seed(0)
    ref = SwiGLU()
    with torch.no_grad():
        for c in (3, 77):
            ref.up_proj.weight[c] = ref.gate_proj.weight[c] * 2
    spike = torch.sign(ref.gate_proj.weight[3]) * 3.0  # |x| <= 3, below a normal batch's amax
    return ref, spike


def _delayed_mlp_error(ref: nn.Module, spike: torch.Tensor, smooth: bool) -> float:
    model = copy.deepcopy(ref)
    lowprec.convert(model, _recipe(scaling="delayed", history_len=16, smooth_swiglu=smooth))
    assert model.down_proj.gemm.smooth is smooth
    g = torch.Generator().manual_seed(1)
    for _ in range(8):  # ordinary steps fill the amax history
        model(torch.randn(64, 64, generator=g))
    x = torch.randn(64, 64, generator=g)
    x[10] = spike
    with torch.no_grad():
        y, y_ref = model(x), ref(x)
    return ((y - y_ref).norm() / y_ref.norm()).item()


def test_smooth_swiglu_cuts_fp8_error_on_aligned_outliers_under_delayed_scaling():
    ref, spike = _outlier_case()
    plain = _delayed_mlp_error(ref, spike, smooth=False)
    smooth = _delayed_mlp_error(ref, spike, smooth=True)
    # measured: plain 0.96 (the spike saturates at the scale of earlier steps), smooth 0.027
    assert plain > 0.3
    assert plain / smooth >= 5.0


def test_convert_turns_it_on_for_hf_llama_mlps_only_when_asked():
    from lowprec.models import demo_llama

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    model, rep = lowprec.convert(demo_llama(**small), _recipe(smooth_swiglu=True), report=True)
    for layer in model.model.layers:
        assert layer.mlp.down_proj.gemm.smooth and not layer.mlp.up_proj.gemm.smooth
        assert not layer.self_attn.o_proj.gemm.smooth
    assert rep.converted["model.layers.1.mlp.down_proj"].endswith("Smooth-SwiGLU")
    plain = lowprec.convert(demo_llama(**small), "fp8")
    assert not any(isinstance(m, Fp8Gemm) and m.smooth for m in plain.modules())
    # an MLP whose down_proj is excluded is reported, not silently smoothed
    r = Recipe.from_dict({"name": "t", "cast": {"format": "fp8", "smooth_swiglu": True},
                          "exclude": {"patterns": ["*.0.mlp.down_proj"]}})
    _, rep = lowprec.convert(demo_llama(**small), r, report=True)
    assert "excluded" in rep.skipped["model.layers.0.mlp.down_proj"]


def test_unit_fp8_applies_smooth_swiglu_to_unit_scaled_mlps():
    pytest.importorskip("lowprec.scaling.convert")
    from lowprec.models import demo_llama
    from lowprec.training import lm_loss

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    model = lowprec.convert(demo_llama(**small), "unit-fp8")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj.gemm, Fp8Gemm) and mlp.down_proj.gemm.smooth
    x = torch.randint(0, 256, (2, 32))
    loss = lm_loss(model, x, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mlp.down_proj.weight.grad).all()
    assert mlp.down_proj.gemm.nonfinite_inputs.sum() == 0
