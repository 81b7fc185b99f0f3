"""lowprec.convert with unit scaling: the numerics table, keep-mode equivalence, param groups, compile, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowprec
from lowprec.inspect import inspect
from lowprec.models import demo_llama, mlp, small_bert, small_gpt2
from lowprec.recipes import Recipe, RecipeError
from lowprec.scaling import UnitLinear, param_groups, parameter_roles

KEEP = Recipe.from_dict({"unit_scaling": {"enabled": True, "init": "keep"}}, source="<test>")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _logits(model, *args, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kw)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.slow
def test_inspect_table_converted_llama_is_unit_and_unconverted_is_not():
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (1, 128)), torch.randint(0, 256, (1, 128))
    model = lowprec.convert(demo_llama(seed=0), "unit")
    rep = inspect(model, (x, y), formats=("e4m3", "fp16"))
    outs, grads = rep.where("output"), rep.where("input_grad")
    assert len(outs) >= 50 and len(grads) >= 60  # every op of 4 layers, not a handful
    # every op output (embedding, norms, projections, attention, SwiGLU, residual adds, logits)
    assert rep.outside("output", 0.5, 2.0) == []
    assert rep.fraction_within("input_grad", 0.5, 2.0) >= 0.90
    assert rep.outside("input_grad", 0.1, 10.0) == []
    assert {r["op"] for r in outs} >= {"UnitEmbedding", "UnitRMSNorm", "UnitLinear", "UnitSDPA", "UnitGLU",
                                       "ResidualAdd"}
    assert "e4m3_saturated" in outs[0] and "fp16_underflow" in outs[0]
    assert "model.layers.3.self_attn.sdpa" in str(rep)

    base = inspect(demo_llama(seed=0), (x, y), formats=())
    assert base.outside("output", 0.1, 10.0)  # HF init: std-0.02 embeddings and projections
    assert base.outside("input_grad", 0.1, 10.0)  # mean loss: tiny activation gradients


@pytest.mark.parametrize("name", ["llama", "llama_gqa_eager", "gpt2", "bert"])
def test_keep_mode_computes_the_same_function_and_loads_into_the_original_class(name):
    torch.manual_seed(0)
    if name == "llama":
        build = lambda: demo_llama(seed=1, num_hidden_layers=2)
    elif name == "llama_gqa_eager":  # grouped KV heads, eager attention (additive float mask), padding mask
        build = lambda: demo_llama(seed=1, num_hidden_layers=2, num_key_value_heads=2, attn_implementation="eager")
    elif name == "gpt2":
        build = lambda: small_gpt2(seed=1)
    else:
        build = lambda: small_bert(seed=1)
    ids = torch.randint(0, 256, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, 40:] = 0
    ref_model = build().eval()
    kw = {} if name == "llama" else {"attention_mask": mask}
    ref = _logits(ref_model, ids, **kw)
    model, report = lowprec.convert(build().eval(), KEEP, report=True)
    assert any(isinstance(m, UnitLinear) for m in model.modules())
    got = _logits(model, ids, **kw)
    keep = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
    assert _max_rel(got[keep], ref[keep]) <= 1e-4
    # activations of the converted model sit near unit scale, the original's do not
    assert report.converted and not [n for n in report.skipped if "left as it is" in report.skipped[n]]
    # same keys, same values: the state dict loads into the original Hugging Face class
    fresh = type(ref_model)(ref_model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_logits(fresh, ids, **kw), ref)


def test_unit_mode_llama_keeps_keys_names_and_tags_roles():
    model = demo_llama(seed=0, num_hidden_layers=2)
    keys = set(model.state_dict())
    lowprec.convert(model, "unit-fp16")
    assert set(model.state_dict()) == keys
    mlp0 = model.model.layers[0].mlp
    assert all(isinstance(getattr(mlp0, n), UnitLinear) for n in ("gate_proj", "up_proj", "down_proj"))  # contract 2
    assert type(mlp0.down_proj.gemm).__name__ == "CastGemm"  # contract 1: apply_casts set .gemm
    assert model.lm_head.gemm is None  # LM head kept in high precision
    assert 0.95 < float(model.model.layers[1].self_attn.q_proj.weight.detach().std()) < 1.05  # re-initialised N(0, 1)

    roles = parameter_roles(model)
    assert {v["role"] for v in roles.values()} == {"hidden", "embedding", "readout", "norm"}
    groups = param_groups(model, lr=1.0, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    lr = lambda p: by_param[id(p)]["lr"]
    assert lr(model.model.layers[0].self_attn.q_proj.weight) == pytest.approx(256**-0.5 * 2**-0.5)
    assert lr(model.model.layers[0].mlp.down_proj.weight) == pytest.approx(688**-0.5 * 2**-0.5)
    assert lr(model.model.embed_tokens.weight) == pytest.approx(256**-0.5)
    assert lr(model.model.layers[0].input_layernorm.weight) == pytest.approx(2**-0.5)
    assert lr(model.model.norm.weight) == pytest.approx(1.0)
    # decay per step is lr * weight_decay for every parameter, whatever its own rate
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.1) for g in groups)


def test_norm_lr_mult_scales_the_norm_gains_alone_and_comes_from_the_recipe():
    from lowprec.recipes import resolve, with_overrides
    from lowprec.runs import build_optimizer

    model = lowprec.convert(demo_llama(seed=0, num_hidden_layers=2), "unit")
    plain = {id(p): g for g in param_groups(model, 0.3, weight_decay=0.1) for p in g["params"]}
    slow = {id(p): g for g in param_groups(model, 0.3, weight_decay=0.1, norm_lr_mult=1 / 16) for p in g["params"]}
    roles = parameter_roles(model)
    for name, info in roles.items():
        k = id(info["param"])
        want = plain[k]["lr"] / 16 if info["role"] == "norm" else plain[k]["lr"]
        assert slow[k]["lr"] == pytest.approx(want), name
        # decay stays lr * weight_decay per step whatever the parameter's own rate
        assert slow[k]["lr"] * slow[k]["weight_decay"] == pytest.approx(0.3 * 0.1), name
    assert {info["role"] for info in roles.values()} >= {"norm", "hidden"}
    for bad in (0.0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="norm_lr_mult"):
            param_groups(model, 0.3, norm_lr_mult=bad)
    # the recipe field reaches the optimizer lowprec builds
    recipe = with_overrides(resolve("unit"), {"unit_scaling.norm_lr_mult": 0.25})
    opt = build_optimizer(model, recipe, lr=0.3)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    norm = model.model.layers[0].input_layernorm.weight
    assert by_param[id(norm)] == pytest.approx(plain[id(norm)]["lr"] / 4)
    with pytest.raises(RecipeError, match="norm_lr_mult"):
        with_overrides(resolve("unit"), {"unit_scaling.norm_lr_mult": 0.0})


@pytest.mark.slow
def test_training_step_on_unit_fp16_lowers_the_loss():
    from lowprec.data import stdlib_corpus
    from lowprec.training import TrainConfig, train

    torch.manual_seed(0)
    model = lowprec.convert(demo_llama(seed=0, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=2, num_key_value_heads=2), "unit-fp16")
    opt = torch.optim.AdamW(param_groups(model, 1.0, weight_decay=0.1), lr=1.0, betas=(0.9, 0.95))
    res = train(model, opt, stdlib_corpus(), TrainConfig(steps=12, batch_size=4, seq_len=32, warmup_steps=3,
                                                         eval_every=12, eval_batches=1))
    assert res.diverged_at is None
    assert sum(res.train_loss[-3:]) / 3 < res.train_loss[0] - 1.0


def test_sequential_mlp_keep_and_unknown_modules_reported():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 64, 1), nn.Flatten(), mlp((64, 128, 128, 10)))
    x = torch.randn(8, 4, 1)
    ref = _logits(net, x)
    net, report = lowprec.convert(net, KEEP, report=True)
    assert isinstance(net[2][0], UnitLinear) and net[2][0].readout is None and net[2][4].readout == "unit"
    assert _max_rel(_logits(net, x), ref) <= 1e-5
    assert "0" in report.skipped and "Conv1d" in report.skipped["0"]
    assert "2.0" in report.converted


@pytest.mark.slow
def test_torch_compile_matches_eager():
    from lowprec.training import lm_loss

    torch.manual_seed(0)
    model = lowprec.convert(demo_llama(seed=0, num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=2, num_key_value_heads=2), "unit")
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    eager = lm_loss(model, x, y)
    eager.backward()
    g_eager = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    loss = lm_loss(compiled, x, y)
    loss.backward()
    assert abs(loss.item() - eager.item()) <= 1e-5 * abs(eager.item())
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, g_eager, rtol=1e-4, atol=1e-5)


def test_bad_input_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'.*unit-fp16.*") as e:
        lowprec.convert(demo_llama(num_hidden_layers=1), "nope")
    assert "unit" in str(e.value)
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('[unit_scaling]\nenabled = true\ninitt = "keep"\n')
    with pytest.raises(RecipeError, match=r"bad_key\.toml.*'unit_scaling\.initt'"):
        lowprec.convert(nn.Linear(2, 2), str(bad_key))
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('[unit_scaling]\nenabled = "yes"\n')
    with pytest.raises(RecipeError, match=r"bad_type\.toml.*'unit_scaling\.enabled' must be a boolean"):
        lowprec.convert(nn.Linear(2, 2), str(bad_type))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lowprec.convert({"not": "a model"}, "unit")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        param_groups([nn.Parameter(torch.zeros(1))], 1.0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        inspect("model", None)
