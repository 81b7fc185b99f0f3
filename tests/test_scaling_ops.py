"""Unit-scaled ops: exact scaling semantics, unit outputs/gradients for unit inputs, exact residual gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowprec.scaling import functional as U
from lowprec.scaling.modules import UnitLinear
from lowprec.scaling.nonlinearity import activation_scales, glu_scales


def _std(t: torch.Tensor) -> float:
    return float(t.detach().float().std())


def test_scaled_scales_value_and_gradient_separately():
    x = torch.randn(5, 7, requires_grad=True)
    y = U.scaled(x, 3.0, 0.25)
    assert torch.equal(y, x * 3.0)
    g = torch.randn(5, 7)
    y.backward(g)
    assert torch.equal(x.grad, g * 0.25)
    # equal scales are a plain multiplication (true gradient)
    x.grad = None
    U.scaled(x, 2.0, 2.0).backward(g)
    assert torch.equal(x.grad, g * 2.0)


def test_hidden_linear_is_unit_in_both_directions():
    torch.manual_seed(0)
    lin = UnitLinear(256, 256, bias=True)
    x = torch.randn(512, 256, requires_grad=True)
    y = lin(x)
    assert 0.9 < _std(y) < 1.1
    y.backward(torch.randn_like(y))
    assert 0.9 < _std(x.grad) < 1.1
    assert 0.9 < _std(lin.weight.grad) < 1.1
    # the value is exactly the scaled linear
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias) / 16.0)


def test_readout_gradient_is_unit_for_any_shape_and_forward_follows_rule():
    torch.manual_seed(0)
    for readout, fwd in (("unit", 128**-0.5), ("mup", 1 / 128)):
        lin = UnitLinear(128, 512, bias=False, readout=readout)
        x = torch.randn(256, 128, requires_grad=True)
        y = lin(x)
        torch.testing.assert_close(y, x @ lin.weight.t() * fwd)
        y.backward(torch.randn_like(y))
        assert 0.9 < _std(x.grad) < 1.1  # fan_out**-0.5, a cut edge


def test_linear_calls_the_gemm_backend_between_the_scales():
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, x, w, b):
            calls.append((x.shape, w.shape))
            return F.linear(x, w, b)

    lin = UnitLinear(64, 32)
    lin.gemm = Recording()
    x = torch.randn(8, 64)
    y = lin(x)
    assert calls == [((8, 64), (32, 64))]
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias) / 8.0)


def test_activation_scales_match_closed_forms_and_sampling():
    # relu: E[relu(X)^2] = 1/2, E[relu(X)] = 1/sqrt(2 pi); relu' = 1[x > 0] has rms 1/sqrt(2)
    out, grad = activation_scales("relu")
    # (Gauss-Hermite converges slowly on relu's kink: 0.12% here; smooth activations are exact)
    assert out == pytest.approx(1 / math.sqrt(0.5 - 1 / (2 * math.pi)), rel=2e-3)
    assert grad == pytest.approx(math.sqrt(2), rel=1e-6)
    torch.manual_seed(0)
    x = torch.randn(2_000_000, dtype=torch.float64)
    for kind, fn in (("gelu", F.gelu), ("silu", F.silu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        assert activation_scales(kind)[0] == pytest.approx(1 / float(fn(x).std()), rel=3e-3)
        assert 0.995 < float(U.activation(x, kind).std()) < 1.005
    g, u = x[:1_000_000], x[1_000_000:]
    # silu(g) * u is heavy-tailed: the sampled std of 1e6 products has ~0.2% standard error
    assert glu_scales("silu")[0] == pytest.approx(1 / float((F.silu(g) * u).std()), rel=1e-2)
    assert 0.98 < float(U.swiglu(g, u).std()) < 1.02


@pytest.mark.parametrize("causal", [True, False])
def test_attention_output_and_input_grads_are_unit(causal):
    torch.manual_seed(0)
    d = 64
    q, k, v = (torch.randn(4, 4, 128, d, requires_grad=True) for _ in range(3))
    mult = U.default_attention_mult(d)
    c = U.attention_qk_grad_mult(d, mult)
    out = U.scaled_dot_product_attention(q, k, v, is_causal=causal, mult=mult, qk_grad_mult=c)
    assert 0.75 < _std(out) < 1.33
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert 0.6 < _std(t.grad) < 1.6, _std(t.grad)


def test_residual_split_add_give_the_exact_stream_gradient():
    torch.manual_seed(0)
    w = torch.randn(32, 32) / 32**0.5
    tau = 0.7
    x1 = torch.randn(16, 32, requires_grad=True)
    branch, skip = U.residual_split(x1, tau)
    y1 = U.residual_add(torch.tanh(branch @ w), skip, tau)
    x2 = x1.detach().clone().requires_grad_(True)
    d = math.sqrt(1 + tau**2)
    y2 = (tau * torch.tanh(x2 @ w) + x2) / d
    torch.testing.assert_close(y1, y2)
    g = torch.randn(16, 32)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_depth_rule_gives_equal_contributions():
    taus = U.transformer_residual_taus(6, residual_mult=1.0, residual_attn_ratio=0.5)
    flat = [t for pair in taus for t in pair]
    # final-stream variance contributed by the embedding and by each branch (unit inputs)
    coef = [1.0]  # embedding
    for tau in flat:
        d2 = 1 + tau**2
        coef = [c / d2 for c in coef] + [tau**2 / d2]
    emb, attn, mlp = coef[0], coef[1::2], coef[2::2]
    assert max(attn) == pytest.approx(min(attn), rel=1e-9)
    assert max(mlp) == pytest.approx(min(mlp), rel=1e-9)
    assert attn[0] / mlp[0] == pytest.approx(0.5**2, rel=1e-9)
    # attention total and MLP total average residual_mult**2 times the embedding's contribution
    assert (sum(attn) + sum(mlp)) / emb == pytest.approx(2.0, rel=1e-9)
    assert sum(coef) == pytest.approx(1.0, rel=1e-9)


def test_cross_entropy_value_is_the_mean_and_logit_gradient_is_unit():
    torch.manual_seed(0)
    n, v = 64, 256
    logits = (torch.randn(n, v) * 0.1).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    targets[:4] = -100
    loss = U.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    expect = (p - F.one_hot(targets.clamp_min(0), v)) * (v / math.sqrt(v - 1))
    expect[:4] = 0
    torch.testing.assert_close(logits.grad, expect)
    assert 0.9 < _std(logits.grad[4:]) < 1.1
    with pytest.raises(ValueError, match=r"shape \(N, V\)"):
        U.cross_entropy(logits.detach()[None], targets)
    with pytest.raises(ValueError, match="targets of shape"):
        U.cross_entropy(logits.detach(), targets[:3])


def test_embedding_and_norm_gradient_scales():
    torch.manual_seed(0)
    w = torch.randn(100, 16, requires_grad=True)
    ids = torch.randint(0, 100, (4, 25))
    U.embedding(ids, w).sum().backward()
    ref = torch.zeros(100, 16).index_add_(0, ids.flatten(), torch.ones(100, 16))
    torch.testing.assert_close(w.grad, ref * math.sqrt(100 / 100))
    x = torch.randn(8, 32, 16)
    g = torch.ones(16, requires_grad=True)
    y = U.rms_norm(x, (16,), g, 1e-6)
    ref_y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, ref_y)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(g.grad, (ref_y.sum((0, 1))) * math.sqrt(16 / x.numel()))
