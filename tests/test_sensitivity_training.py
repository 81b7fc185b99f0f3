"""Sensitivity for training precision (issue 15): per-layer scores under block-scaled training
formats, the FLOP-budget integer program that keeps layers in BF16, its two baselines, the plan
file contract, and ``lowprec sensitivity --for-training``. On a tiny Llama with random byte batches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec.sensitivity as S
from lowprec import cli, formats
from lowprec.models import demo_llama
from lowprec.sensitivity.training_formats import TrainingSensitivityReport

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=2)
FORMATS = ("nvfp4", "mxfp8", "bf16")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss_fn(model, batch):
    """Next-byte cross-entropy in the model's own dtype (lm_loss computes it in float32)."""
    x, y = batch
    logits = model(x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _batches(n=2, b=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 256, (b, t + 1), generator=g)
        out.append((tok[:, :-1], tok[:, 1:]))
    return out


@pytest.fixture(scope="module")
def tiny():
    """float64, so that loss changes far below float32's resolution of the loss (~5e-7 at 5.5)
    are exact: bf16 scores are that small."""
    torch.manual_seed(0)
    model = demo_llama(**TINY).double()
    return model, _batches()


@pytest.fixture(scope="module")
def measured(tiny):
    model, batches = tiny
    return S.score(model, loss_fn, batches, method="measured", formats=FORMATS, progress=False)


def _fq_weight(w, fmt):
    """The weight layouts of issue 15, written out independently of lowprec.sensitivity."""
    if fmt == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    return formats.fake_quantize_block(w, fmt, dim=-1, rounding="nearest", block_2d=(fmt == "nvfp4"))


def _fq_act(x, fmt):
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    return formats.fake_quantize_block(x, fmt, dim=-1, rounding="nearest")


def _mean_loss(model, batches):
    with torch.no_grad():
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _brute_force(model, batches, name, fmt):
    """The loss change with layer ``name`` hand-replaced by F.linear(fake_q(x), fake_q(w), b)."""
    m = model.get_submodule(name)
    was = model.training
    model.eval()
    base = _mean_loss(model, batches)
    qw = _fq_weight(m.weight.detach(), fmt)
    m.forward = lambda x: F.linear(_fq_act(x, fmt), qw, m.bias)
    try:
        return _mean_loss(model, batches) - base
    finally:
        del m.forward
        model.train(was)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


def test_measured_scores_equal_the_brute_force_loss_change(tiny, measured):
    model, batches = tiny
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert measured.layers == [n for n in linears if n != "lm_head"]  # the LM head stays high precision
    assert measured.formats == FORMATS
    for n in measured.layers:
        for f in FORMATS:
            assert measured.scores[n][f] == _brute_force(model, batches, n, f), (n, f)
    m = model.get_submodule("model.layers.0.mlp.down_proj")
    assert measured.flops["model.layers.0.mlp.down_proj"] == 2 * m.in_features * m.out_features == 2 * 128 * 64


def test_bf16_scores_are_much_smaller_than_nvfp4(measured):
    nv = np.array([measured.scores[n]["nvfp4"] for n in measured.layers])
    bf = np.array([measured.scores[n]["bf16"] for n in measured.layers])
    mx = np.array([measured.scores[n]["mxfp8"] for n in measured.layers])
    # bf16 keeps 8 significand bits, mxfp8 (E4M3) 4, nvfp4 (E2M1) 2: each step is a large factor
    assert np.abs(bf).sum() < 0.05 * np.abs(nv).sum()
    assert np.abs(mx).sum() < 0.5 * np.abs(nv).sum()


@pytest.mark.parametrize("method", ["measured", "pqi"])
def test_scoring_leaves_the_model_bit_identical(method):
    model = demo_llama(**TINY).train()
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    S.score(model, loss_fn, _batches(1), method=method, formats=("nvfp4", "bf16"), progress=False)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_failing_loss_restores_everything():
    model = demo_llama(**TINY).train()
    before = _snapshot(model)
    calls = []

    def flaky(m, batch):
        calls.append(1)
        if len(calls) == 3:  # fails inside a layer's perturbed forward
            raise RuntimeError("boom")
        return loss_fn(m, batch)

    for method in ("measured", "pqi"):
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            S.score(model, flaky, _batches(1), method=method, formats=("nvfp4",), progress=False)
        assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert not any(m._forward_pre_hooks for m in model.modules())


def test_pqi_integrates_weight_and_activation_perturbations(tiny, measured):
    """The loss is smooth along the path, so 4 Gauss-Legendre nodes reach the measured change;
    a weight-only perturbation would miss the activation part (checked: it differs)."""
    model, batches = tiny
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    pqi = S.score(model, loss_fn, batches, method="pqi", formats=("nvfp4",), layers=layers, points=4,
                  progress=False)
    assert pqi.meta["gradients"] == 4 * len(batches) * len(layers)
    for n in layers:
        exact = measured.scores[n]["nvfp4"]
        assert pqi.scores[n]["nvfp4"] == pytest.approx(exact, rel=1e-3), n
    # the activation part matters: quantizing the weight alone changes the loss by a different amount
    misses = []
    for n in layers:
        m = model.get_submodule(n)
        qw = _fq_weight(m.weight.detach(), "nvfp4")
        model.eval()
        base = _mean_loss(model, batches)
        m.forward = lambda x, m=m, qw=qw: F.linear(x, qw, m.bias)
        try:
            misses.append(abs(_mean_loss(model, batches) - base - measured.scores[n]["nvfp4"]))
        finally:
            del m.forward
    assert max(misses[i] / abs(measured.scores[n]["nvfp4"]) for i, n in enumerate(layers)) > 0.1


def test_bad_arguments_are_named(tiny):
    model, batches = tiny
    with pytest.raises(ValueError, match="not both"):
        S.score(model, loss_fn, batches, method="measured", bits=(4,), formats=("nvfp4",))
    with pytest.raises(ValueError, match="hawq"):
        S.score(model, loss_fn, batches, method="hawq", formats=("nvfp4",))
    with pytest.raises(ValueError, match="one of nvfp4.*got 'fp4'"):
        S.score(model, loss_fn, batches, method="measured", formats=("fp4",))
    with pytest.raises(ValueError, match="not linear.*embed_tokens"):
        S.score(model, loss_fn, batches, method="measured", formats=("nvfp4",), layers=["model.embed_tokens"],
                progress=False)


def test_report_round_trips_through_json(measured, tmp_path):
    back = TrainingSensitivityReport.from_json(measured.to_json(tmp_path / "r.json"))
    assert back.scores == measured.scores and back.flops == measured.flops and back.formats == measured.formats
    assert "nvfp4" in str(measured).splitlines()[1]
    assert measured.plot(tmp_path / "r.png", keep=measured.layers[:2]).read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------


def _synthetic(n=9, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i // 3}.{p}" for i, p in zip(range(n), itertools.cycle(["a", "b", "c"]))]
    flops = {nm: int(f) for nm, f in zip(names, rng.integers(1, 50, n) * 2)}
    scores = {nm: {"nvfp4": float(rng.normal(0.01, 0.02)), "bf16": float(rng.normal(0, 0.001))} for nm in names}
    for nm in names[1::4]:  # a few layers that BF16 does not help (gain <= 0): never kept
        scores[nm]["bf16"] = scores[nm]["nvfp4"] + float(rng.uniform(0, 0.001))
    return TrainingSensitivityReport(method="measured", formats=("nvfp4", "bf16"), scores=scores, flops=flops,
                                     n_params={nm: 1 for nm in names})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_choice_is_optimal_and_within_budget(seed):
    rep = _synthetic(seed=seed)
    names, total = rep.layers, sum(rep.flops.values())
    gain = {n: rep.gain(n, "nvfp4") for n in names}
    assert any(g <= 0 for g in gain.values()) and any(g > 0 for g in gain.values())
    for budget in (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0):
        keep = S.select_high_precision(rep, "nvfp4", budget)
        assert sum(rep.flops[n] for n in keep) <= budget * total
        assert all(gain[n] > 0 for n in keep)
        best = max(sum(gain[n] for n in sub)
                   for r in range(len(names) + 1) for sub in itertools.combinations(names, r)
                   if sum(rep.flops[n] for n in sub) <= budget * total)
        assert sum(gain[n] for n in keep) == pytest.approx(best, rel=1e-9, abs=1e-15), budget
    assert S.select_high_precision(rep, "nvfp4", 0.0) == []
    assert S.select_high_precision(rep, "nvfp4", 1.0) == [n for n in names if gain[n] > 0]


def test_budget_exactly_at_a_layers_share_keeps_it():
    rep = TrainingSensitivityReport(method="measured", formats=("nvfp4", "bf16"),
                                    scores={"a": {"nvfp4": 1.0, "bf16": 0.0}, "b": {"nvfp4": 2.0, "bf16": 0.0}},
                                    flops={"a": 1, "b": 9}, n_params={"a": 1, "b": 1})
    assert S.select_high_precision(rep, "nvfp4", 0.1) == ["a"]
    assert S.select_high_precision(rep, "nvfp4", 0.0999) == []
    assert S.select_high_precision(rep, "nvfp4", 0.9) == ["b"]  # a and b do not both fit; b gains more
    with pytest.raises(ValueError, match="budget"):
        S.select_high_precision(rep, "nvfp4", 1.5)
    with pytest.raises(ValueError, match="mxfp8.*not scored"):
        S.select_high_precision(rep, "mxfp8", 0.1)


def test_last_layers_keeps_whole_blocks_from_the_end():
    names = [f"model.layers.{b}.{p}" for b in range(4) for p in ("q", "k", "up")] + ["lm_head"]
    flops = {n: (4 if n.endswith("up") else 1) for n in names}  # 6 per block, 24 + 1 in all
    total = sum(flops.values())
    assert S.last_layers(names, 6 / total, flops) == names[9:12]
    assert S.last_layers(names, 6 / total - 1e-6, flops) == []
    assert S.last_layers(names, 13 / total, flops) == names[6:12]
    assert S.last_layers(names, 1.0, flops) == names[:12]  # the LM head is in no block
    assert S.last_layers([names[0:3], names[3:6]], 1.0, flops) == names[:6]  # explicit blocks
    # single linears from the end, for models whose one block is over the budget
    assert S.last_layers(names, 5 / total, flops, whole_blocks=False) == names[10:12]
    assert S.last_layers(names, 3 / total, flops, whole_blocks=False) == []  # up (4) does not fit: stop
    for budget in np.linspace(0, 1, 11):
        keep = S.last_layers(names, budget, flops)
        assert sum(flops[n] for n in keep) <= budget * total and len(keep) % 3 == 0


def test_random_layers_is_seeded_maximal_and_within_budget():
    rep = _synthetic(n=12)
    names, flops, total = rep.layers, rep.flops, sum(rep.flops.values())
    sets = set()
    for seed in range(5):
        keep = S.random_layers(names, 0.3, flops, seed=seed)
        assert keep == S.random_layers(names, 0.3, flops, seed=seed)
        used = sum(flops[n] for n in keep)
        assert used <= 0.3 * total
        assert all(used + flops[n] > 0.3 * total for n in names if n not in keep)  # nothing else fits
        sets.add(tuple(keep))
    assert len(sets) > 1


def test_plan_file_round_trips_with_the_contract_keys(tmp_path, measured):
    keep = S.select_high_precision(measured, "nvfp4", 0.1)
    assert keep
    path = S.save_high_precision_plan(tmp_path / "p" / "high_precision_plan.json", keep, fmt="nvfp4", budget=0.1,
                                      method="measured", scores=measured.scores, flops=measured.flops)
    d = json.loads(path.read_text())
    assert {"lowprec_high_precision_plan", "format", "budget", "keep", "method", "flops_fraction",
            "scores"} <= set(d)
    assert d["lowprec_high_precision_plan"] == 1 and d["format"] == "nvfp4" and d["budget"] == 0.1
    assert d["keep"] == keep and d["method"] == "measured"
    assert d["flops_fraction"] == measured.flops_fraction(keep) <= 0.1
    assert d["scores"] == measured.scores
    assert S.load_high_precision_plan(path) == d
    with pytest.raises(ValueError, match="over the budget"):
        S.save_high_precision_plan(tmp_path / "x.json", measured.layers, fmt="nvfp4", budget=0.1, method="m",
                                   flops=measured.flops)
    with pytest.raises(ValueError, match="no entry for layers.*nope"):
        S.save_high_precision_plan(tmp_path / "x.json", ["nope"], fmt="nvfp4", budget=1.0, method="m",
                                   flops=measured.flops)
    (tmp_path / "bits.json").write_text(json.dumps({"model.layers.0.mlp.up_proj": 4}))
    with pytest.raises(ValueError, match="not a high-precision plan"):
        S.load_high_precision_plan(tmp_path / "bits.json")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "max_position_embeddings": 64}
SMALL = ["--batch-size", "2", "--seq-len", "32", "--batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def test_cli_writes_the_plan_and_the_scores(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    assert cli.main(["sensitivity", "--config", tiny_config, "--for-training", "nvfp4",
                     "--high-precision-budget", "0.2", "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    plan = S.load_high_precision_plan(out / "high_precision_plan.json")
    report = TrainingSensitivityReport.from_json(out / "training_sensitivity.json")
    assert report.formats == ("nvfp4", "bf16") and report.method == "measured"
    assert plan["keep"] == S.select_high_precision(report, "nvfp4", 0.2) and plan["keep"]
    assert plan["flops_fraction"] <= 0.2 and plan["format"] == "nvfp4" and plan["budget"] == 0.2
    assert (out / "training_sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    assert f"{100 * plan['flops_fraction']:.2f}% of linear FLOPs" in text
    assert all(n in text for n in plan["keep"])


@pytest.mark.parametrize("argv, message", [
    (["--for-training", "nvfp4", "--high-precision-budget", "1.5"], "in [0, 1]"),
    (["--for-training", "fp4"], "training format must be one of"),
])
def test_cli_rejects_bad_options_at_parse_time(tiny_config, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sensitivity", "--config", tiny_config, *argv, *SMALL])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--high-precision-budget", "0.1"], "needs --for-training"),
    (["--for-training", "nvfp4", "--method", "hawq"], "does not score training formats"),
    (["--for-training", "nvfp4", "--avg-bits", "4"], "--avg-bits choose bits per layer"),
    (["--for-training", "nvfp4", "--recipe", "unit-fp8"], "scores the unconverted model under nvfp4"),
])
def test_cli_rejects_mixed_modes(tmp_path, tiny_config, argv, message, capsys):
    assert cli.main(["sensitivity", "--config", tiny_config, *argv, "--out", str(tmp_path / "r"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
