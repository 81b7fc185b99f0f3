"""Block-scaled training linears (MXFP8, NVFP4): the three GEMMs against reference formulas built
from ``lowprec.formats.fake_quantize_block`` (bit-exact), the NVFP4 switches one by one, seeded
randomness, NaN counting, the recipes and the high-precision plan."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lowprec
from lowprec.errors import RecipeError
from lowprec.formats import fake_quantize_block as fq
from lowprec.kernels.nvfp4_quantize import rht16
from lowprec.matmul.block_scaled import (
    _RHT,
    _SR_DGRAD,
    _SR_WGRAD,
    BlockScaledGemm,
    BlockScaling,
    _swizzle_scales,
    resolve_block_backend,
    rht_pair,
)
from lowprec.matmul.gemm import CastGemm
from lowprec.recipes import Recipe, RecipeFieldError
from lowprec.rht import rht

torch.set_num_threads(1)

NV_ALL = BlockScaling("nvfp4", rht=True, stochastic_rounding=True, weight_blocks_2d=True)
NV_NONE = BlockScaling("nvfp4")
SMALL_LLAMA = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64)


def _operands(m=40, k=64, n=48, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)[None, :]  # channels of very different scales
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    gy = torch.randn(m, n, generator=g)
    return x, w, b, gy


def _run(gemm, x, w, b, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = gemm(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _pad_rows(t, multiple=16):
    return F.pad(t, (0, 0, 0, (-t.shape[0]) % multiple))


# ----------------------------------------------------------------------------------------------
# The three GEMMs, bit-exact against the reference formulas
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fwd,bwd", [("e4m3", "e4m3"), ("e4m3", "e5m2")])
def test_mxfp8_three_gemms_equal_reference_formulas(fwd, bwd):
    """Y = Q_K(X) Q_K(W)^T + b, dX = Q_N(dY) Q_N(W), dW = Q_M(dY)^T Q_M(X): every operand blocked
    along its GEMM's reduction dimension, W quantized again along N for the backward."""
    x, w, b, gy = _operands()
    gemm = BlockScaledGemm(BlockScaling("mxfp8", forward=fwd, backward=bwd))
    y, gx, gw, gb = _run(gemm, x, w, b, gy)
    sf, sb = ("mxfp8", "mxfp8" if bwd == "e4m3" else "mxfp8_e5m2")
    assert torch.equal(y, F.linear(fq(x, sf, dim=1), fq(w, sf, dim=1), b))
    assert torch.equal(gx, fq(gy, sb, dim=1) @ fq(w, sf, dim=0))
    assert torch.equal(gw, fq(gy, sb, dim=0).t() @ fq(x, sf, dim=0))
    assert torch.equal(gb, gy.sum(0))
    # the backward's W really is re-quantized along N: the forward's W (along K) would differ
    assert not torch.equal(fq(w, sf, dim=0), fq(w, sf, dim=1))


def test_mxfp8_reduction_dim_not_a_multiple_of_32_is_padded():
    """K = 48 and N = 80 (multiples of 16, not of 32), M = 37: the formats pad each block
    dimension with zeros, which changes neither a block's scale nor the dot product."""
    x, w, b, gy = _operands(m=37, k=48, n=80)
    y, gx, gw, _ = _run(BlockScaledGemm(BlockScaling("mxfp8")), x, w, b, gy)
    assert torch.equal(y, F.linear(fq(x, "mxfp8", dim=1), fq(w, "mxfp8", dim=1), b))
    assert torch.equal(gx, fq(gy, "mxfp8", dim=1) @ fq(w, "mxfp8", dim=0))
    assert torch.equal(gw, fq(gy, "mxfp8", dim=0).t() @ fq(x, "mxfp8", dim=0))
    padded = F.pad(x, (0, 16))  # explicit zero padding quantizes the real elements identically
    assert torch.equal(fq(padded, "mxfp8", dim=1)[:, :48], fq(x, "mxfp8", dim=1))


def test_nvfp4_all_techniques_equal_reference_formulas():
    """NVFP4 with RHT, SR and 2-D weight blocks: Y = Q(X) Q2d(W)^T; dX = SR(dY) Q2d(W) with the
    forward's quantized W; dW = SR(H dY)^T Q(H X) (M = 40 padded to 48 for the 16x16 RHT)."""
    x, w, b, gy = _operands(m=40)
    gemm = BlockScaledGemm(NV_ALL, seed=123)
    y, gx, gw, _ = _run(gemm, x, w, b, gy)
    step = 0
    w2d = fq(w, "nvfp4", block_2d=True)
    assert torch.equal(y, F.linear(fq(x, "nvfp4", dim=1), w2d, b))
    s_dgrad, s_wgrad, s_rht = (gemm.seed_for(step, p) for p in (_SR_DGRAD, _SR_WGRAD, _RHT))
    assert torch.equal(gx, fq(gy, "nvfp4", dim=1, rounding="stochastic", seed=s_dgrad) @ w2d)
    hdy, hx = rht16(_pad_rows(gy), s_rht, dim=0), rht16(_pad_rows(x), s_rht, dim=0)
    ref_gw = fq(hdy, "nvfp4", dim=0, rounding="stochastic", seed=s_wgrad).t() @ fq(hx, "nvfp4", dim=0)
    assert torch.equal(gw, ref_gw)
    # and it estimates the true dW (NVFP4 noise, not a wrong formula): relative error well below 1
    exact = gy.t() @ x
    assert (gw - exact).norm() / exact.norm() < 0.35


def test_nvfp4_without_techniques_equals_plain_reference():
    x, w, b, gy = _operands()
    y, gx, gw, _ = _run(BlockScaledGemm(NV_NONE), x, w, b, gy)
    assert torch.equal(y, F.linear(fq(x, "nvfp4", dim=1), fq(w, "nvfp4", dim=1), b))
    assert torch.equal(gx, fq(gy, "nvfp4", dim=1) @ fq(w, "nvfp4", dim=0))
    assert torch.equal(gw, fq(gy, "nvfp4", dim=0).t() @ fq(x, "nvfp4", dim=0))


def test_rht_without_quantization_leaves_dw_unchanged():
    """The transform is orthogonal and the same for both operands: (H dY)^T (H X) = dY^T X up to
    float32 rounding, zero-padded tokens included."""
    x, _, _, gy = _operands(m=37)
    a, b = rht_pair(gy, x, seed=7)
    assert a.shape[0] == b.shape[0] == 48
    exact = gy.double().t() @ x.double()
    assert torch.allclose((a.double().t() @ b.double()), exact, rtol=0, atol=1e-4 * exact.abs().max().item())
    assert not torch.allclose(a[:37], gy)  # it did transform
    # the transform is lowprec.rht.rht (the kernels' butterfly order, within float32 summation error)
    assert torch.allclose(a, rht(_pad_rows(gy), 7, dim=0), rtol=0, atol=1e-5 * gy.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Each switch changes what it should and nothing else
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switch,changes", [
    ("rht", {"gw"}),
    ("stochastic_rounding", {"gx", "gw"}),
    ("weight_blocks_2d", {"y", "gx"}),
])
def test_each_nvfp4_switch_changes_only_its_gemms(switch, changes):
    x, w, b, gy = _operands()
    on = dict(y=None)
    base = BlockScaling("nvfp4", rht=True, stochastic_rounding=True, weight_blocks_2d=True)
    off = BlockScaling("nvfp4", **{**dict(rht=True, stochastic_rounding=True, weight_blocks_2d=True), switch: False})
    on = dict(zip(("y", "gx", "gw", "gb"), _run(BlockScaledGemm(base, seed=5), x, w, b, gy)))
    without = dict(zip(("y", "gx", "gw", "gb"), _run(BlockScaledGemm(off, seed=5), x, w, b, gy)))
    for key in ("y", "gx", "gw", "gb"):
        assert torch.equal(on[key], without[key]) == (key not in changes), (switch, key)


def test_weight_blocks_2d_forward_and_backward_share_the_quantized_weight():
    """With 16x16 tiles the quantized W is the same whichever direction it is read in; with 1-D
    blocks the forward (along K) and backward (along N) weights differ."""
    _, w, _, _ = _operands()
    assert torch.equal(fq(w, "nvfp4", dim=0, block_2d=True), fq(w, "nvfp4", dim=1, block_2d=True))
    assert not torch.equal(fq(w, "nvfp4", dim=0), fq(w, "nvfp4", dim=1))
    # the module's backward uses exactly the forward's W: dX for dY = I picks W's rows out
    gemm = BlockScaledGemm(BlockScaling("nvfp4", weight_blocks_2d=True))
    x = torch.randn(16, 64, requires_grad=True)
    y = gemm(x, w, None)
    eye = torch.zeros(16, 48)
    eye[torch.arange(16), torch.arange(16)] = 1.0
    y.backward(eye)
    assert torch.equal(x.grad, fq(w, "nvfp4", block_2d=True)[:16])


def test_mxfp8_ignores_nvfp4_switches():
    from lowprec.matmul.block_scaled import BlockScaling as BS

    cast = Recipe.from_name("mxfp8").cast
    assert BS.from_cast(cast) == BS("mxfp8", forward="e4m3", backward="e4m3")
    with pytest.raises(ValueError, match="NVFP4 techniques"):
        BS("mxfp8", rht=True)


# ----------------------------------------------------------------------------------------------
# Randomness: reproducible, fresh per step and per layer
# ----------------------------------------------------------------------------------------------


def test_stochastic_rounding_reproducible_and_fresh_per_step():
    x, w, b, gy = _operands()
    a, b2 = BlockScaledGemm(NV_ALL, seed=1), BlockScaledGemm(NV_ALL, seed=1)
    first = _run(a, x, w, b, gy)
    assert all(torch.equal(u, v) for u, v in zip(first, _run(b2, x, w, b, gy)))  # same seed state, same bits
    second = _run(a, x, w, b, gy)  # same inputs, next step: new SR draws and RHT signs
    assert torch.equal(first[0], second[0])  # the forward is RNE
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[2], second[2])
    assert int(a.step) == 2
    # a resume from a checkpoint of the state (seed, step) continues the same stream
    c = BlockScaledGemm(NV_ALL, seed=999)
    c.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(_run(a, x, w, b, gy), _run(c, x, w, b, gy)))


def test_seed_follows_the_run_seed_and_the_layer_name():
    torch.manual_seed(3)
    a = BlockScaledGemm(NV_ALL, name="l.0")
    torch.manual_seed(3)
    a2 = BlockScaledGemm(NV_ALL, name="l.0")
    b = BlockScaledGemm(NV_ALL, name="l.1")
    torch.manual_seed(4)
    c = BlockScaledGemm(NV_ALL, name="l.0")
    assert int(a.seed) == int(a2.seed) and len({int(a.seed), int(b.seed), int(c.seed)}) == 3
    a.step.fill_(5)
    a.reset_parameters()
    assert int(a.seed) == int(a2.seed) and int(a.step) == 0


def test_calls_without_backward_do_not_draw():
    x, w, b, _ = _operands()
    gemm = BlockScaledGemm(NV_ALL, seed=0)
    with torch.no_grad():
        y0 = gemm(x, w, b)
    gemm(x, w, b)  # no input requires grad
    assert int(gemm.step) == 0
    y1 = gemm(x, w.requires_grad_(), b)
    assert int(gemm.step) == 1 and torch.equal(y0, y1.detach())


# ----------------------------------------------------------------------------------------------
# NaN / Inf, dtypes, backend choice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [BlockScaling("mxfp8"), NV_ALL], ids=["mxfp8", "nvfp4"])
def test_nonfinite_operands_are_counted_or_raise_in_debug(scaling):
    x, w, b, gy = _operands()
    x[3, 5] = float("nan")
    gy[0, 0] = float("inf")
    gemm = BlockScaledGemm(scaling)
    y, gx, gw, _ = _run(gemm, x, w, b, gy)
    assert gemm.nonfinite_inputs.tolist() == [1, 0, 1]
    assert torch.isnan(y[3]).all() and torch.isfinite(y[4]).all()  # the NaN block poisons its own row only
    from lowprec.training import fp8_nonfinite_inputs

    model = torch.nn.Module()
    model.g = gemm
    assert fp8_nonfinite_inputs(model) == 2  # training's counter sums this buffer as it sums Fp8Gemm's
    with pytest.raises(FloatingPointError, match=r"BlockScaledGemm 'l'.*input X.*NaN or Inf"):
        BlockScaledGemm(scaling, debug=True, name="l")(x, w, b)


def test_bf16_operands_and_3d_input():
    x, w, b, gy = _operands(m=24)
    xb = x.reshape(2, 12, 64).bfloat16().requires_grad_()
    wb = w.bfloat16().requires_grad_()
    y = BlockScaledGemm(BlockScaling("mxfp8"))(xb, wb, None)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 12, 48)
    ref = F.linear(fq(xb.detach().float().reshape(24, 64), "mxfp8", dim=1), fq(wb.detach().float(), "mxfp8", dim=1))
    assert torch.equal(y.reshape(24, 48), ref.bfloat16())
    y.backward(gy.reshape(2, 12, 48).bfloat16())
    assert xb.grad.dtype == wb.grad.dtype == torch.bfloat16


def test_bad_shapes_name_the_layer():
    gemm = BlockScaledGemm(BlockScaling("mxfp8"), name="blk.fc")
    with pytest.raises(ValueError, match=r"'blk.fc'.*last dimension is 32, the weight expects 64"):
        gemm(torch.randn(4, 32), torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"'blk.fc'.*bias must have shape \(16,\)"):
        gemm(torch.randn(4, 64), torch.randn(16, 64), torch.randn(8))


def test_backend_on_cpu_is_emulated_and_scale_swizzle_follows_cublas_layout():
    cpu = torch.device("cpu")
    assert resolve_block_backend("auto", cpu) == resolve_block_backend("scaled_mm", cpu) == "emulated"
    with pytest.raises(ValueError, match="one of auto, scaled_mm, emulated"):
        resolve_block_backend("fast", cpu)
    # cuBLAS 1-D block scaling factors layout: 128 x 4 tiles, element (r, c) of a tile at
    # offset (r % 32) * 16 + (r // 32) * 4 + c; tiles row-major over (row tile, column tile).
    rows, cols = 130, 6
    codes = (torch.arange(rows * cols) % 250).to(torch.uint8).reshape(rows, cols)
    out = _swizzle_scales(codes.view(torch.float8_e8m0fnu)).view(torch.uint8)
    assert out.numel() == 256 * 8
    n_col_tiles = 2
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * n_col_tiles + c // 4
            rr, cc = r % 128, c % 4
            assert out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] == codes[r, c]


# ----------------------------------------------------------------------------------------------
# Recipes, conversion, training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp8", "nvfp4", "unit-mxfp8"])
def test_shipped_block_recipes_validate(name):
    r = Recipe.from_name(name)
    assert r.name == name and r.cast.format in ("mxfp8", "nvfp4")
    if r.cast.format == "mxfp8":
        assert (r.cast.forward, r.cast.backward) == ("e4m3", "e4m3")  # TransformerEngine's MXFP8 recipe
    else:
        assert r.cast.rht and r.cast.stochastic_rounding and r.cast.weight_blocks_2d
        assert r.cast.high_precision_format == "bf16"
    assert set(r.cast.keep_high_precision) >= {"embedding", "lm_head", "norm"}
    assert r.unit_scaling.enabled == name.startswith("unit")


def test_cast_field_rules():
    with pytest.raises(RecipeFieldError, match="cast.high_precision_format' must be one of none, bf16"):
        Recipe.from_dict({"cast": {"format": "nvfp4", "high_precision_format": "fp16"}})
    with pytest.raises(RecipeFieldError, match="cast.high_precision_plan' must be empty when cast.format is none"):
        Recipe.from_dict({"cast": {"high_precision_plan": "plan.json"}})
    with pytest.raises(RecipeFieldError, match="cast.rht' must be a boolean"):
        Recipe.from_dict({"cast": {"format": "nvfp4", "rht": "yes"}})


@pytest.mark.parametrize("name,overrides", [
    ("mxfp8", {}), ("unit-mxfp8", {}), ("nvfp4", {}),
    ("nvfp4", {"cast.rht": False, "cast.stochastic_rounding": False, "cast.weight_blocks_2d": False}),
])
def test_demo_llama_trains_with_each_block_recipe(name, overrides):
    from lowprec import runs
    from lowprec.models import demo_llama
    from lowprec.training import lm_loss

    torch.manual_seed(0)
    model, rep = lowprec.convert(demo_llama(**SMALL_LLAMA), name, overrides=overrides, report=True)
    recipe = lowprec.recipes.with_overrides(lowprec.recipes.resolve(name), overrides)
    gemms = [m for m in model.modules() if isinstance(m, BlockScaledGemm)]
    assert len(gemms) == 7  # q, k, v, o, gate, up, down; the LM head stays in high precision
    if name == "unit-mxfp8":
        assert model.model.layers[0].mlp.down_proj.gemm.smooth  # Smooth-SwiGLU inside the MXFP8 GEMM
    if name == "nvfp4":
        assert isinstance(model.lm_head.gemm, CastGemm) and "BF16" in rep.converted["lm_head"]
    # 10 steps must show learning: the non-unit recipes' swept rate (5e-4) is tuned for 300 steps
    opt = runs.build_optimizer(model, recipe, lr=None if recipe.unit_scaling.enabled else 3e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (8, 33), generator=g)
    losses = []
    for _ in range(10):
        loss = lm_loss(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(int(m.nonfinite_inputs.sum()) for m in gemms) == 0
    assert all(int(m.step) == 10 for m in gemms)


def test_smooth_swiglu_mxfp8_gemm_matches_reference():
    from lowprec.matmul.fp8_gemm import smoothing_scales

    x, w, b, gy = _operands()
    gemm = BlockScaledGemm(BlockScaling("mxfp8"), smooth=True)
    y, gx, gw, _ = _run(gemm, x, w, b, gy)
    s = smoothing_scales(x)
    assert torch.equal(y, F.linear(fq(x * s, "mxfp8", dim=1), fq(w / s, "mxfp8", dim=1), b))
    assert torch.equal(gx, (fq(gy, "mxfp8", dim=1) @ fq(w / s, "mxfp8", dim=0)) * s)
    assert torch.equal(gw, (fq(gy, "mxfp8", dim=0).t() @ fq(x * s, "mxfp8", dim=0)) / s)


# ----------------------------------------------------------------------------------------------
# The high-precision plan
# ----------------------------------------------------------------------------------------------


def _plan(tmp_path, keep, **extra):
    path = tmp_path / "hp_plan.json"
    path.write_text(json.dumps({"lowprec_high_precision_plan": 1, "format": "nvfp4", "budget": 0.1, "keep": keep,
                                "scores": {"ignored": 1}, **extra}))
    return path


def test_high_precision_plan_keeps_exactly_its_layers(tmp_path):
    from lowprec.matmul.convert import load_high_precision_plan
    from lowprec.models import demo_llama

    keep = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    path = _plan(tmp_path, keep)
    assert load_high_precision_plan(path) == tuple(keep)
    model, rep = lowprec.convert(demo_llama(**SMALL_LLAMA), "nvfp4", overrides={"cast.high_precision_plan": str(path)},
                                 report=True)
    for name, module in model.named_modules():
        if hasattr(module, "gemm") and name:
            kept = name in keep or name == "lm_head"
            assert isinstance(module.gemm, CastGemm if kept else BlockScaledGemm), name
    assert f"kept in high precision: high_precision_plan {path}" in rep.converted[keep[0]]
    # with high_precision_format "none" the kept layers stay plain linears, listed as left alone
    model, rep = lowprec.convert(demo_llama(**SMALL_LLAMA), "mxfp8", overrides={"cast.high_precision_plan": str(path)},
                                 report=True)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert "high_precision_plan" in rep.skipped[keep[0]]


def test_high_precision_plan_relative_to_the_recipe_file(tmp_path):
    from lowprec.models import demo_llama

    _plan(tmp_path, ["model.layers.0.mlp.up_proj"])
    recipe_file = tmp_path / "mine.toml"
    recipe_file.write_text('[cast]\nformat = "mxfp8"\nhigh_precision_plan = "hp_plan.json"\n')
    model = lowprec.convert(demo_llama(**SMALL_LLAMA), str(recipe_file))
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.gate_proj.gemm, BlockScaledGemm)


@pytest.mark.parametrize("content,match", [
    ("{not json", r"'.*bad.json' is not valid JSON"),
    ('["model.layers.0.mlp.up_proj"]', r"must be a JSON object"),
    ('{"lowprec_high_precision_plan": 2, "keep": []}', r"has 2 as field 'lowprec_high_precision_plan'.*version 1"),
    ('{"keep": []}', r"has no field 'lowprec_high_precision_plan'"),
    ('{"lowprec_high_precision_plan": 1, "keep": "model.layers.0.mlp.up_proj"}', r"field 'keep' must be a list"),
    ('{"lowprec_high_precision_plan": 1, "keep": [3]}', r"field 'keep' must be a list of qualified"),
    ('{"lowprec_high_precision_plan": 1, "keep": ["model.layers.0.mlp"]}', r"field 'keep': 'model.layers.0.mlp' is not a linear"),
    ('{"lowprec_high_precision_plan": 1, "keep": ["model.norm", "nope"]}', r"'model.norm', 'nope' are not linear layers"),
    (None, r"high-precision plan file '.*bad.json' does not exist"),
])
@pytest.mark.parametrize("recipe", ["nvfp4", "unit-mxfp8"])
def test_bad_high_precision_plan_is_a_clear_error_and_leaves_the_model_untouched(tmp_path, content, match, recipe):
    from lowprec.models import demo_llama

    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    model = demo_llama(**SMALL_LLAMA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, m, type(m)) for n, m in model.named_modules()]
    with pytest.raises(RecipeError, match=match):
        lowprec.convert(model, recipe, overrides={"cast.high_precision_plan": str(path)})
    assert [(n, m, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "lowprec_recipe")


@pytest.mark.slow
def test_nvfp4_stop_and_resume_is_bit_identical(corpus, tmp_path):
    """SR draws and RHT signs come from the saved (seed, step) buffers, so training 6 steps equals
    training 3, checkpointing, and resuming a fresh model for the other 3, bit for bit."""
    from lowprec import checkpoint as ckpt
    from lowprec.distributed import make_optimizer
    from lowprec.models import demo_llama
    from lowprec.training import TrainConfig, train

    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup_steps=2, eval_every=3, eval_batches=1)

    def fresh():
        torch.manual_seed(0)
        model = lowprec.convert(demo_llama(**SMALL_LLAMA), "nvfp4")
        return model, make_optimizer(model, model.lowprec_recipe, "AdamW", 3e-3)

    full = train(*fresh(), corpus, cfg)
    first = train(*fresh(), corpus, cfg, checkpoint_dir=tmp_path, stop_after=3)
    assert ckpt.latest(tmp_path) is not None
    model, opt = fresh()
    with torch.no_grad():  # a different run seed: the checkpoint's buffers must override it
        for m in model.modules():
            if isinstance(m, BlockScaledGemm):
                m.seed.add_(1)
    second = train(model, opt, corpus, cfg, resume_from=tmp_path)
    assert first.train_loss + second.train_loss == full.train_loss
    assert second.val_loss[-1] == full.val_loss[-1]


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the amax test: rank 1's input is 100x rank 0's, so the all-reduced tensor amax
    (NVFP4's per-tensor scale) differs from rank 0's own."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, w, _, gy = _operands(bias=False)
        x = x * (100.0 if rank == 1 else 1.0)
        y = BlockScaledGemm(NV_NONE)(x, w, None)
        global_amax = (_operands(bias=False)[0] * 100.0).abs().amax()
        same_as_global = torch.equal(y, F.linear(fq(x, "nvfp4", dim=1, tensor_amax=global_amax), fq(w, "nvfp4", dim=1)))
        same_as_local = torch.equal(y, F.linear(fq(x, "nvfp4", dim=1), fq(w, "nvfp4", dim=1)))
        torch.save({"global": same_as_global, "local": same_as_local}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_nvfp4_tensor_amax_is_all_reduced_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == {"global": True, "local": False}  # rank 0 used rank 1's larger amax
    assert r1["global"] and r1["local"]  # rank 1's own amax is the global one


def test_dimension_rule_keeps_layers_in_bf16_and_a_model_with_none_eligible_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.Linear(32, 48))
    model, rep = lowprec.convert(model, "nvfp4", report=True)
    assert isinstance(model[0].gemm, CastGemm) and isinstance(model[1].gemm, BlockScaledGemm)
    assert "NVFP4 GEMMs need dimensions that are multiples of 16 (in_features=30" in rep.converted["0"]
    assert "CastGemm(bf16)" in rep.converted["0"]
    with pytest.raises(RecipeError, match=r"casts matmuls to MXFP8, but Sequential has no linear layer eligible"):
        lowprec.convert(torch.nn.Sequential(torch.nn.Linear(30, 20)), "mxfp8")
