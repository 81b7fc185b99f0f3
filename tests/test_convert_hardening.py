"""``lowprec.convert`` hardening (issue #17, items 4, 6, 7 and the plan errors of 10).

* FP8 scaling state survives meta-device conversion + ``to_empty()`` + ``load_state_dict``;
* ``cast.keep_high_precision`` accepts only module kinds and patterns that match a module;
* a converted model is not converted again (same recipe and plan: a no-op);
* a conversion that fails leaves the model bit-identical (parameters, buffers, module classes,
  Parameter objects, no ``lowprec_recipe``), and ``lowprec train --plan bad.json`` is one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lowprec
from lowprec import cli
from lowprec.matmul.fp8_gemm import Fp8Gemm
from lowprec.models import demo_llama
from lowprec.recipes import Recipe, RecipeError, load_plan
from lowprec.training import lm_loss

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)
DOWN0 = "model.layers.0.mlp.down_proj"


def _fp8_recipe(**cast) -> Recipe:
    return Recipe.from_dict({"name": "fp8-custom", "cast": {"format": "fp8", **cast}})


def _fingerprint(model: nn.Module) -> dict:
    """Everything a failed or refused conversion must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "parameters": [(n, id(p)) for n, p in model.named_parameters()],
        "recipe": getattr(model, "lowprec_recipe", None),
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["parameters"] == before["parameters"]
    assert after["recipe"] is before["recipe"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"values changed: {changed[:5]}"


def _train(model: nn.Module, steps: int = 3) -> list[float]:
    """``steps`` AdamW steps on fixed random byte sequences; the losses."""
    tokens = torch.randint(0, 256, (steps, 2, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in tokens:
        loss = lm_loss(model, batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------
# Item 4: meta device
# ----------------------------------------------------------------------------------------------


def test_meta_device_conversion_trains_exactly_like_an_eager_one():
    eager = lowprec.convert(demo_llama(**SMALL), "fp8-delayed")
    with torch.device("meta"):
        meta = demo_llama(**SMALL)
    lowprec.convert(meta, "fp8-delayed")
    meta.to_empty(device="cpu")
    meta._init_weights(meta.model.rotary_emb)  # HF's own non-persistent RoPE buffers: HF recomputes them
    meta.load_state_dict(eager.state_dict())
    expected, got = _train(eager), _train(meta)
    assert all(math.isfinite(v) for v in got), got
    assert got == expected


def test_fp8_gemm_reset_parameters_restores_the_initial_state_after_to_empty():
    with torch.device("meta"):
        gemm = Fp8Gemm()
    gemm.to_empty(device="cpu")
    gemm.reset_parameters()
    fresh = Fp8Gemm().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in gemm.state_dict().items())
    assert gemm.fp8_max.tolist() == [448.0, 448.0, 57344.0]


# ----------------------------------------------------------------------------------------------
# Item 6: cast.keep_high_precision
# ----------------------------------------------------------------------------------------------


def test_keep_high_precision_typo_is_an_error_naming_entry_and_kinds_and_changes_nothing():
    model = demo_llama(**SMALL)
    before = _fingerprint(model)
    with pytest.raises(RecipeError) as e:
        lowprec.convert(model, _fp8_recipe(keep_high_precision=["embeddings", "norm"]))
    msg = str(e.value)
    assert "cast.keep_high_precision" in msg and "'embeddings'" in msg and "\n" not in msg
    assert "valid kinds: embedding, lm_head, norm" in msg
    _assert_same(model, before)
    assert type(model.lm_head) is nn.Linear  # the typo did not send the LM head to FP8


def test_keep_high_precision_patterns_keep_matching_modules_and_say_so():
    model, rep = lowprec.convert(demo_llama(**SMALL), _fp8_recipe(keep_high_precision=["lm_head", "*.layers.0.mlp.*"]),
                                 report=True)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(model.model.layers[0].mlp, name)) is nn.Linear
        assert "'*.layers.0.mlp.*'" in rep.skipped[f"model.layers.0.mlp.{name}"]
    assert isinstance(model.model.layers[1].mlp.down_proj.gemm, Fp8Gemm)
    assert isinstance(model.model.layers[0].self_attn.q_proj.gemm, Fp8Gemm)

    # a pattern naming a parent keeps every linear inside it (here unit-scaled, without a GEMM backend)
    recipe = Recipe.from_name("unit-fp8")
    recipe = recipe.replace(cast=recipe.cast.__class__(**{**recipe.cast.__dict__,
                                                          "keep_high_precision": ("lm_head", "model.layers.1")}))
    model, rep = lowprec.convert(demo_llama(**SMALL), recipe, report=True)
    assert model.model.layers[1].mlp.down_proj.gemm is None and model.model.layers[1].self_attn.q_proj.gemm is None
    assert isinstance(model.model.layers[0].mlp.down_proj.gemm, Fp8Gemm)
    assert "'model.layers.1'" in rep.skipped["model.layers.1.mlp.down_proj"]


# ----------------------------------------------------------------------------------------------
# Item 7: converting twice, atomic conversion
# ----------------------------------------------------------------------------------------------


def test_converting_a_converted_model_is_refused_and_changes_nothing():
    model = lowprec.convert(demo_llama(**SMALL), "unit-fp8")
    _train(model, steps=1)  # amax histories and scales are no longer their initial values
    before = _fingerprint(model)
    with pytest.raises(RecipeError, match=r"already converted with recipe 'unit-fp8'.*recipe 'fp8'.*fresh copy"):
        lowprec.convert(model, "fp8")
    _assert_same(model, before)
    assert model.lowprec_recipe.unit_scaling.enabled  # lm_loss keeps the unit-scaled cross-entropy


def test_converting_again_with_the_same_recipe_and_plan_is_a_no_op():
    plan = {DOWN0: 4}
    model, rep = lowprec.convert(demo_llama(**SMALL), "fp8-delayed", plan=plan, report=True)
    _train(model, steps=1)
    before = _fingerprint(model)
    again, rep2 = lowprec.convert(model, Recipe.from_name("fp8-delayed"), plan=dict(plan), report=True)
    assert again is model and rep2 is rep
    _assert_same(model, before)
    with pytest.raises(RecipeError, match="same recipe with a different QAT plan"):
        lowprec.convert(model, "fp8-delayed", plan={DOWN0: 3})
    _assert_same(model, before)


def test_a_model_converted_piece_by_piece_is_refused():
    from lowprec.qat import apply_plan

    model = apply_plan(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), {"2": 4})
    before = _fingerprint(model)
    with pytest.raises(RecipeError, match=r"'2\.parametrizations\.weight\.0' is a IntWeightFakeQuant.*fresh copy"):
        lowprec.convert(model, "fp8")
    _assert_same(model, before)


@pytest.mark.parametrize("recipe, plan, match", [
    ("unit", {"model.layers.9.mlp.down_proj": 4}, r"plan: LlamaForCausalLM has no module 'model\.layers\.9"),
    ("unit", {DOWN0: 0}, r"plan: module 'model\.layers\.0\.mlp\.down_proj'.*2 to 16 bits"),
    ("unit-fp8", {"model.layers.0.mlp.act_fn": 4}, r"plan: module 'model\.layers\.0\.mlp\.act_fn': .*2\+ dims"),
    (_fp8_recipe(keep_high_precision=["embeddings"]), None, r"'embeddings'"),
])
def test_a_failing_conversion_is_a_recipe_error_and_leaves_the_model_bit_identical(recipe, plan, match):
    model = demo_llama(**SMALL)
    before = _fingerprint(model)
    with pytest.raises(RecipeError, match=match):
        lowprec.convert(model, recipe, plan=plan)
    _assert_same(model, before)


def test_a_step_failing_midway_rolls_the_whole_conversion_back(monkeypatch):
    """Failures no upfront check catches: the module tree is restored, no weight was re-drawn."""
    # FP8 finds no eligible layer only after unit scaling has swapped every linear
    mlp = nn.Sequential(nn.Linear(30, 10), nn.GELU(), nn.Linear(10, 5))
    before = _fingerprint(mlp)
    with pytest.raises(ValueError, match="no linear layer eligible for FP8"):
        lowprec.convert(mlp, "unit-fp8")
    _assert_same(mlp, before)

    # the last step (the QAT plan) fails after unit scaling and FP8 casts
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("lowprec.qat.apply_plan", broken)
    model = demo_llama(**SMALL)
    before, rng = _fingerprint(model), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="simulated"):
        lowprec.convert(model, "unit-fp8", plan={DOWN0: 4})
    _assert_same(model, before)
    assert torch.equal(torch.get_rng_state(), rng)  # no weight was re-initialised
    monkeypatch.undo()
    lowprec.convert(model, "unit-fp8", plan={DOWN0: 4})  # and the model converts afterwards
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down.gemm, Fp8Gemm)
    # the deferred unit init re-drew the stored weight under the QAT parametrization (HF's init: std 0.02)
    assert abs(float(down.parametrizations.weight.original.std()) - 1.0) < 0.05


# ----------------------------------------------------------------------------------------------
# Item 10: plan errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan, match", [
    ([["x", 4]], r"a plan is a mapping .* or the path of a JSON file; got list"),
    ({"x": 0}, r"plan: module 'x'.*2 to 16 bits"),
    ({"x": True}, r"plan: module 'x'.*integer"),
    ({"": 4}, r"plan: '' is not a qualified module name"),
])
def test_load_plan_checks_names_and_bit_widths(plan, match):
    with pytest.raises(RecipeError, match=match):
        load_plan(plan)


def test_load_plan_names_the_file_and_the_expected_shape(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps([["model.layers.0.mlp.down_proj", 4]]))
    with pytest.raises(RecipeError, match=r"plan file '.*plan\.json' must be a JSON object mapping"):
        load_plan(path)
    path.write_text(json.dumps({"bits": {"a": 17}}))
    with pytest.raises(RecipeError, match=r"plan file '.*plan\.json': module 'a'.*2 to 16 bits"):
        load_plan(path)


@pytest.mark.parametrize("plan, words", [
    ({"model.layers.9.mlp.down_proj": 4}, ["model.layers.9.mlp.down_proj", "has no module"]),
    ({DOWN0: 0}, [DOWN0, "2 to 16 bits"]),
])
def test_cli_train_with_a_bad_plan_exits_2_with_one_line(tmp_path, capsys, plan, words):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 256, **SMALL}))
    text = tmp_path / "text.txt"
    text.write_bytes(Path(__file__).read_bytes() * 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan))
    rc = cli.main(["train", "unit", "--plan", str(bad), "--config", str(config), "--data", str(text),
                   "--seq-len", "16", "--steps", "1", "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("lowprec train: error: ") and "Traceback" not in err
    assert "bad.json" in err and all(w in err for w in words)
    assert not (tmp_path / "runs").exists()  # it failed at convert, before any run directory
