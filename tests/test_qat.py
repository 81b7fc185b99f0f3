"""QAT plans (issue 6): straight-through INT-k fake-quant on planned weights, composable with
LowPrecisionLinear (FP8/16-bit GEMM backends), safe checkpoints, clear errors."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec
from lowprec.matmul.gemm import CastGemm
from lowprec.matmul.linear import LowPrecisionLinear
from lowprec.qat import apply_plan, fake_quant_weight, planned_bits, remove_plan, scale_method
from lowprec.recipes import CastConfig, ConversionReport, Recipe


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_weight_is_per_channel_int_grid(bits):
    w = torch.randn(12, 40) * torch.logspace(-3, 1, 12)[:, None]  # rows of very different scale
    q = fake_quant_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(dim=1, keepdim=True) / qmax
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the row's grid
    assert codes.abs().max() <= qmax + 1e-3
    assert ((q - w).abs() <= step / 2 * (1 + 1e-5)).all()  # round to nearest: error at most half a step
    assert torch.allclose(q.abs().amax(dim=1), w.abs().amax(dim=1))  # the row's amax is representable
    conv = torch.randn(6, 3, 3, 3)
    qc = fake_quant_weight(conv, bits)
    assert torch.equal(qc, fake_quant_weight(conv.reshape(6, -1), bits).reshape(conv.shape))


def test_forward_uses_quantized_weight_and_gradient_is_straight_through():
    model = _model()
    ref = _model()
    x = torch.randn(8, 16)
    apply_plan(model, {"0": 3, "4": 2})
    assert planned_bits(model[0]) == 3 and planned_bits(model[2]) is None
    with torch.no_grad():
        ref[0].weight.copy_(fake_quant_weight(ref[0].weight, 3))
        ref[4].weight.copy_(fake_quant_weight(ref[4].weight, 2))
    assert torch.equal(model(x), ref(x))
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    # STE: the full-precision weight gets exactly the gradient taken at the quantized weight
    assert torch.equal(model[0].parametrizations.weight.original.grad, ref[0].weight.grad)
    assert torch.equal(model[4].parametrizations.weight.original.grad, ref[4].weight.grad)


def test_qat_training_lowers_the_loss_and_keeps_full_precision_master():
    torch.manual_seed(0)
    model = _model()
    apply_plan(model, {"0": 3, "2": 3, "4": 3})
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    master = model[2].parametrizations.weight.original
    assert not torch.equal(master, fake_quant_weight(master, 3))  # the master copy is not on the grid
    assert torch.equal(model[2].weight, fake_quant_weight(master, 3))


def test_composes_with_low_precision_linear_via_convert(tmp_path):
    model = _model()
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"bits": {"0": 4, "2": 3}}))
    recipe = Recipe(name="bf16-qat", cast=CastConfig(format="bf16"))
    x = torch.randn(5, 16)
    expected_w = fake_quant_weight(model[2].weight, 3)
    model, rep = lowprec.convert(model, recipe, plan=plan_file, report=True)
    assert isinstance(model[2], LowPrecisionLinear) and isinstance(model[2].gemm, CastGemm)
    assert "int3" in rep.converted["2"] and "LowPrecisionLinear" in rep.converted["2"]
    h = model[1](model[0](x))
    ref = CastGemm("bf16")(h, expected_w, model[2].bias)
    assert torch.equal(model[2](h), ref)
    model(x).sum().backward()
    assert model[2].parametrizations.weight.original.grad is not None


def test_state_dict_loads_weights_only_and_remove_plan_restores():
    model = _model()
    original = model[2].weight.detach().clone()
    apply_plan(model, {"2": 2})
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = apply_plan(_model(seed=1), {"2": 2})
    fresh.load_state_dict(state)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))
    apply_plan(model, {"2": 4})  # re-planning changes the bit width, no stacked rounding
    assert len(model[2].parametrizations.weight) == 1 and planned_bits(model[2]) == 4
    remove_plan(model)
    assert torch.equal(model[2].weight, original) and isinstance(model[2].weight, nn.Parameter)


def test_bad_plans_are_clear_errors_and_change_nothing():
    model = _model()
    with pytest.raises(KeyError, match="'nope'.*'3.x'|'3.x'.*'nope'"):
        apply_plan(model, {"nope": 3, "0": 3, "3.x": 4})
    with pytest.raises(ValueError, match=r"plan\['0'\].*bit width 1"):
        apply_plan(model, {"0": 1})
    with pytest.raises(ValueError, match=r"plan\['1'\].*GELU"):
        apply_plan(model, {"1": 4, "0": 4})
    with pytest.raises(ValueError, match="integer"):
        apply_plan(model, {"0": 3.5})
    assert planned_bits(model[0]) is None  # nothing applied after a failed plan
    rep = ConversionReport()
    apply_plan(model, {"0": 3}, Recipe(exclude=lowprec.recipes.ExcludeConfig(patterns=("0",))), rep)
    assert planned_bits(model[0]) is None and "0" in rep.skipped


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_scale_is_on_a_clipped_grid_and_never_worse_than_absmax(bits):
    torch.manual_seed(bits)
    # Bell-shaped rows, heavy-tailed rows, rows of very different magnitude and an all-zero row.
    w = torch.cat([torch.randn(8, 64), torch.distributions.StudentT(2.0).sample((8, 64)), torch.zeros(1, 64)])
    w = w * torch.logspace(-3, 1, w.shape[0])[:, None]
    qa, qm = fake_quant_weight(w, bits, "absmax"), fake_quant_weight(w, bits, "mse")
    err_a, err_m = (qa - w).square().sum(dim=1), (qm - w).square().sum(dim=1)
    assert (err_m <= err_a * (1 + 1e-6)).all()  # the search includes ratio 1.0 (absmax)
    assert (err_m[:16] < err_a[:16]).sum() >= 12  # and clipping helps most rows at low bits
    assert torch.equal(qm[-1], torch.zeros(64))
    qmax = 2 ** (bits - 1) - 1
    step = qm.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / qmax  # the largest code is +-qmax (clipped)
    codes = qm[:-1] / step[:-1]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= qmax + 1e-3
    assert (qm.abs().amax(dim=1) <= w.abs().amax(dim=1) * (1 + 1e-6)).all()  # clipped, never stretched


def test_scale_method_context_sets_the_default_and_plans_keep_theirs():
    w = torch.randn(6, 32)
    assert torch.equal(fake_quant_weight(w, 2), fake_quant_weight(w, 2, "absmax"))
    with scale_method("mse"):
        assert torch.equal(fake_quant_weight(w, 2), fake_quant_weight(w, 2, "mse"))
        model = apply_plan(_model(), {"2": 2})
    assert torch.equal(fake_quant_weight(w, 2), fake_quant_weight(w, 2, "absmax"))  # restored
    master = model[2].parametrizations.weight.original
    assert torch.equal(model[2].weight, fake_quant_weight(master, 2, "mse"))  # fixed at apply time
    with pytest.raises(ValueError, match="absmax.*mse"):
        apply_plan(_model(), {"2": 2}, method="minmax")
    with pytest.raises(ValueError, match="absmax.*mse"):
        fake_quant_weight(w, 2, "l1")
