"""Quantized AdamW against tampered or mismatched optimizer states (issue #17).

A state dict is data from outside: ``load_state_dict`` must refuse, before changing anything, any
state that is not exactly what this optimizer creates for each parameter (format record, keys,
dtypes, shapes), and the C kernel's Python entry points must refuse mis-sized tensors whatever
the caller. Loads and kernel calls that could run the C loop out of bounds run in a subprocess,
so that a crash (exit 134 / 139) fails the test instead of killing pytest.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowprec.kernels import adamw_step_cpu as K
from lowprec.optim import AdamW4bit, AdamW8bit, AdamWFp8
from lowprec.optim.state_quant import num_blocks

STATE_FORMAT_KEY = "state_format"  # the record state_dict() adds to each parameter's saved state
CLASSES = [AdamW4bit, AdamW8bit, AdamWFp8]
BIG = 256 * 128  # elements of "0.weight": quantized states
SMALL = 256  # elements of "0.bias": float32 states


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 128, generator=gen)).square().mean().backward()
        opt.step()


def _saved_state(sd: dict, name: str) -> dict:
    """The saved state of the parameter called ``name`` (optimizers built on named parameters)."""
    group = sd["param_groups"][0]
    return sd["state"][group["params"][group["param_names"].index(name)]]


def _run_child(code: str, *args: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run ``code`` in a fresh interpreter; its stdout's JSON lines, and the process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                       timeout=300, env=env)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return lines, r


# ----------------------------------------------------------------------------------------------
# Tampered states: refused by load_state_dict, for each optimizer class
# ----------------------------------------------------------------------------------------------

# Each case: the parameter, and a statement run on its saved state ``st``.
TAMPERINGS = {
    "codes_shortened": ("0.weight", "st['exp_avg_codes'] = st['exp_avg_codes'][:-1].clone()"),
    "absmax_shortened": ("0.weight", "st['exp_avg_sq_absmax'] = st['exp_avg_sq_absmax'][:-1].clone()"),
    "fp32_moment_shortened": ("0.bias", "st['exp_avg_sq'] = st['exp_avg_sq'][:-1].clone()"),
    "float32_codes": ("0.weight", "st['exp_avg_codes'] = st['exp_avg_codes'].float()"),
    "missing_key": ("0.weight", "del st['exp_avg_absmax']"),
    "extra_key": ("0.weight", "st['exp_avg_max'] = torch.zeros(3)"),
    "step_float64": ("0.weight", "st['step'] = st['step'].double()"),
    "step_nan": ("2.bias", "st['step'] = torch.tensor(float('nan'))"),
}

TAMPER_CHILD = """
import io, json, sys
import torch
from torch import nn
import lowprec.optim as lo

cls = getattr(lo, sys.argv[1])
cases = json.loads(sys.argv[2])

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))

def train(m, opt):
    m(torch.randn(8, 128)).square().mean().backward()
    opt.step()
    opt.zero_grad()

for case, (name, statement) in cases.items():
    m = model()
    opt = cls(m.named_parameters(), lr=1e-2)
    train(m, opt)
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    st = sd["state"][group["params"][group["param_names"].index(name)]]
    exec(statement)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = cls(m.named_parameters(), lr=1e-2)
    try:
        fresh.load_state_dict(sd)
    except ValueError as e:
        print(json.dumps({"case": case, "refused": str(e)}), flush=True)
        continue
    print(json.dumps({"case": case, "loaded": True}), flush=True)
    train(m, fresh)  # the step the tampered state would have run
    print(json.dumps({"case": case, "stepped": True}), flush=True)
"""


def _expected_messages(cls: type) -> dict[str, list[str]]:
    """Per case, what the refusal must say (beyond the class and the parameter's name)."""
    mf, vf = cls.M_FORMAT, cls.V_FORMAT
    m_codes = (num_blocks(BIG, mf.block_size), mf.codes_per_block)
    v_blocks = num_blocks(BIG, vf.block_size)
    return {
        "codes_shortened": ["'exp_avg_codes'", f"torch.uint8 tensor of shape {m_codes}",
                            f"found a torch.uint8 tensor of shape {(m_codes[0] - 1, m_codes[1])}"],
        "absmax_shortened": ["'exp_avg_sq_absmax'", f"torch.float32 tensor of shape {(v_blocks,)}",
                             f"found a torch.float32 tensor of shape {(v_blocks - 1,)}"],
        "fp32_moment_shortened": ["'exp_avg_sq'", f"torch.float32 tensor of shape {(SMALL,)}",
                                  f"found a torch.float32 tensor of shape {(SMALL - 1,)}"],
        "float32_codes": ["'exp_avg_codes'", f"torch.uint8 tensor of shape {m_codes}",
                          f"found a torch.float32 tensor of shape {m_codes}"],
        "missing_key": ["missing ['exp_avg_absmax']", f"exp_avg_codes: a torch.uint8 tensor of shape {m_codes}"],
        "extra_key": ["unexpected ['exp_avg_max']", f"exp_avg_codes: a torch.uint8 tensor of shape {m_codes}"],
        "step_float64": ["'step'", "torch.float32 tensor of shape ()", "found a torch.float64 tensor of shape ()"],
        "step_nan": ["'step'", "non-negative whole number", "nan"],
    }


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_tampered_state_is_refused_before_any_step(cls):
    """Each tampered state (through torch.save / torch.load(weights_only=True)) is refused by
    load_state_dict with a ValueError naming the class, the parameter, the state, the expected
    dtype and shape and what was found; the subprocess never reaches a step (nor crashes)."""
    lines, r = _run_child(TAMPER_CHILD, cls.__name__, json.dumps(TAMPERINGS))
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    results = {line["case"]: line for line in lines}
    assert set(results) == set(TAMPERINGS), results
    for case, expected in _expected_messages(cls).items():
        msg = results[case].get("refused")
        assert msg is not None, f"{cls.__name__} accepted the tampered state {case!r}"
        name = TAMPERINGS[case][0]
        for part in [f"{cls.__name__}.load_state_dict", f"parameter {name} ", *expected]:
            assert part in msg, (case, part, msg)


# ----------------------------------------------------------------------------------------------
# Another optimizer's state: refused
# ----------------------------------------------------------------------------------------------


def _stepped_state(make, seed: int = 0) -> dict:
    model = _model()
    opt = make(model.named_parameters())
    _train(model, opt, steps=2, seed=seed)
    return opt.state_dict()


CROSS = {
    "AdamW8bit->AdamWFp8": (lambda ps: AdamW8bit(ps), AdamWFp8, "was written as"),
    "AdamWFp8->AdamW8bit": (lambda ps: AdamWFp8(ps), AdamW8bit, "was written as"),
    "AdamW4bit->AdamW8bit": (lambda ps: AdamW4bit(ps), AdamW8bit, "was written as"),
    "torch.AdamW->AdamW4bit": (lambda ps: torch.optim.AdamW(ps), AdamW4bit, "no 'state_format' record"),
    "block->rank1": (lambda ps: AdamW4bit(ps), lambda ps: AdamW4bit(ps, v_mode="rank1"), "layout=rank1"),
    "block->factored": (lambda ps: AdamW4bit(ps), lambda ps: AdamW4bit(ps, factor_second_moment=True),
                        "layout=factored"),
}


@pytest.mark.parametrize("case", list(CROSS))
def test_another_optimizers_state_is_refused(case):
    """States of another class, of torch's AdamW (no record: fp32 states for every parameter)
    or of another v layout are refused, the message naming the parameter and both formats."""
    make_saved, make_target, expected = CROSS[case]
    sd = _stepped_state(make_saved)
    target = make_target(_model().named_parameters())
    with pytest.raises(ValueError, match="load_state_dict: param group 0, parameter 0.weight") as err:
        target.load_state_dict(sd)
    group = target.param_groups[0]
    record, _ = target.state_spec(group["params"][0], "0.weight", group)
    assert expected in str(err.value) and f"this optimizer keeps {record!r}" in str(err.value)


def test_state_without_format_record_is_refused():
    """A state written before states recorded their format (same keys and shapes, no record) is
    refused with a message saying so."""
    sd = _stepped_state(lambda ps: AdamW4bit(ps))
    for st in sd["state"].values():
        del st[STATE_FORMAT_KEY]
    with pytest.raises(ValueError, match=r"AdamW4bit.load_state_dict: .* has no 'state_format' record"):
        AdamW4bit(_model().named_parameters()).load_state_dict(sd)


def test_layout_options_of_saved_groups_must_match():
    """A saved group whose min_quant_size differs is refused even when no state was written yet:
    torch's loader would adopt it, and the states created later would follow it."""
    small = [p for p in _model().parameters() if p.numel() < 4096]
    sd = AdamW4bit(small, min_quant_size=4096).state_dict()
    sd["param_groups"][0]["min_quant_size"] = 100
    with pytest.raises(ValueError, match="min_quant_size=100; this optimizer has 4096"):
        AdamW4bit(small, min_quant_size=4096).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# A failed load changes nothing
# ----------------------------------------------------------------------------------------------


def _snapshot(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    state = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    groups = [{k: (list(map(id, v)) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
              for g in opt.param_groups]
    return state, groups


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_failed_load_leaves_state_and_groups_untouched(cls):
    """The saved state differs everywhere (another run, another lr) and only the last parameter's
    state is bad: after the refused load, every state tensor and every group entry is as before."""
    model = _model()
    opt = cls(model.named_parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    before = _snapshot(opt)
    other = _model(seed=1)
    other_opt = cls(other.named_parameters(), lr=5e-3, weight_decay=0.3)
    _train(other, other_opt, steps=3, seed=1)
    sd = other_opt.state_dict()
    st = _saved_state(sd, "2.bias")
    st["exp_avg"] = st["exp_avg"][:10].clone()
    with pytest.raises(ValueError, match="parameter 2.bias"):
        opt.load_state_dict(sd)
    state, groups = _snapshot(opt)
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for pid, st in state.items():
        assert st.keys() == before[0][pid].keys()
        for k, v in st.items():
            assert v.dtype == before[0][pid][k].dtype and torch.equal(v, before[0][pid][k]), k


# ----------------------------------------------------------------------------------------------
# The C entry points refuse mis-sized tensors whatever the caller
# ----------------------------------------------------------------------------------------------

WRAPPER_CHILD = """
import json
import torch
from lowprec.kernels import adamw_step_cpu as K
from lowprec.optim import functional as F
from lowprec.optim.state_quant import M_DE4_B128, V_LINEAR4_B128, M_DE8_B256, V_DE8U_B256, zero_state

mf, vf = M_DE4_B128, V_LINEAR4_B128
n = 64 * 128
hp = F.hyperparams(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)

def blocks():
    p = torch.randn(n)
    return [p, torch.randn(n), *zero_state(n, mf), *zero_state(n, vf)]

def call_tensors(i, value, check=False, fmts=(mf, vf), hps=None):
    a = blocks()
    a[i] = value(a[i])
    p, g, mc, ma, vc, va = a
    K.adamw_tensors_cpu_([p], [g], [mc], [ma], [vc], [va], hps or [hp], *fmts, check=check)

def call_fp32(i, value):
    a = [torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300)]
    a[i] = value(a[i])
    K.adamw_fp32_tensors_cpu_(*[[t] for t in a], [hp], check=False)

def call_rank1(hp_value):
    p = torch.randn(64, 128)
    mc, ma = zero_state(n, mf)
    vc, _ = zero_state(n, vf)
    K.adamw_rank1_cpu_(p, torch.randn(64, 128), mc, ma, vc, torch.zeros(64), torch.zeros(128), hp_value, mf, vf)

cases = {
    "tensors: m_codes shortened": lambda: call_tensors(2, lambda t: t[:1]),
    "tensors: v_codes shortened": lambda: call_tensors(4, lambda t: t[:-1]),
    "tensors: m_absmax shortened": lambda: call_tensors(3, lambda t: t[:1]),
    "tensors: v_absmax shortened": lambda: call_tensors(5, lambda t: t[:-1]),
    "tensors: float32 codes": lambda: call_tensors(2, lambda t: t.float()),
    "tensors: non-contiguous codes": lambda: call_tensors(2, lambda t: t.t().contiguous().t()),
    "tensors: g shortened": lambda: call_tensors(1, lambda t: t[:128]),
    "tensors: g of another dtype": lambda: call_tensors(1, lambda t: t.bfloat16()),
    "tensors: p not whole blocks": lambda: call_tensors(0, lambda t: torch.randn(n + 1)),
    "tensors: float64 p": lambda: call_tensors(0, lambda t: t.double()),
    "tensors: formats of other block sizes": lambda: call_tensors(2, lambda t: t, fmts=(mf, V_DE8U_B256)),
    "tensors: short hyperparameters": lambda: call_tensors(2, lambda t: t, hps=[hp[:4]]),
    "tensors (check=True): m_codes shortened": lambda: call_tensors(2, lambda t: t[:1], check=True),
    "fp32: exp_avg shortened": lambda: call_fp32(2, lambda t: t[:-1]),
    "fp32: exp_avg_sq bfloat16": lambda: call_fp32(3, lambda t: t.bfloat16()),
    "fp32: g shortened": lambda: call_fp32(1, lambda t: t[:5]),
    "rank1: short hyperparameters": lambda: call_rank1(hp[:2]),
}
for case, fn in cases.items():
    try:
        fn()
    except ValueError as e:
        print(json.dumps({"case": case, "refused": str(e)}), flush=True)
    else:
        print(json.dumps({"case": case, "called": True}), flush=True)
"""


@pytest.mark.skipif(not K.available(), reason="the C kernel cannot be built here")
def test_c_entry_points_refuse_mis_sized_tensors():
    """Every mis-sized, mistyped or non-contiguous tensor (and short hyperparameter vector) is a
    ValueError naming it, also with check=False (the optimizer's call), never a call into C."""
    lines, r = _run_child(WRAPPER_CHILD)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    assert len(lines) == 17, r.stdout
    called = [line["case"] for line in lines if "refused" not in line]
    assert not called, f"called into C with bad tensors: {called}"
    msgs = {line["case"]: line["refused"] for line in lines}
    assert "tensor 0: m_codes must be a contiguous CPU torch.uint8 tensor of 4096 elements" in \
        msgs["tensors: m_codes shortened"]
    assert "v_absmax" in msgs["tensors: v_absmax shortened"] and "64 elements" in msgs["tensors: v_absmax shortened"]
    assert "got torch.float32" in msgs["tensors: float32 codes"]
    assert "not contiguous" in msgs["tensors: non-contiguous codes"]
    assert "exp_avg must be a contiguous CPU torch.float32 tensor of 300 elements" in msgs["fp32: exp_avg shortened"]
    assert "8 elements" in msgs["rank1: short hyperparameters"]


EDITED_STATE_CHILD = """
import json
import torch
from lowprec.optim import AdamW4bit

for shape in ((64, 128), (3, 2000)):  # whole blocks: the group's C call; padded: a call of its own
    for key in ("exp_avg_codes", "exp_avg_sq_absmax"):
        p = torch.nn.Parameter(torch.randn(shape))
        opt = AdamW4bit([p])
        p.grad = torch.randn(shape)
        opt.step()
        opt.state[p][key] = opt.state[p][key][:1].clone()  # edited in place: no load_state_dict to check it
        p.grad = torch.randn(shape)
        case = f"{shape} {key}"
        try:
            opt.step()
        except (ValueError, RuntimeError) as e:
            print(json.dumps({"case": case, "refused": str(e)}), flush=True)
        else:
            print(json.dumps({"case": case, "stepped": True}), flush=True)
"""


@pytest.mark.skipif(not K.available(), reason="the C kernel cannot be built here")
def test_live_state_edited_in_place_is_refused_by_the_step():
    """A state shortened in the live optimizer (after any load check) is refused by the step's
    kernel entry, on the batched C path and on a padded tensor's own call, never run."""
    lines, r = _run_child(EDITED_STATE_CHILD)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    assert len(lines) == 4, r.stdout
    for line in lines:
        assert "refused" in line, line
        assert ("exp_avg_codes" in line["case"]) == ("codes" in line["refused"]), line


# ----------------------------------------------------------------------------------------------
# The round trip stays bit-exact, records included
# ----------------------------------------------------------------------------------------------

ROUND_TRIPS = [(AdamW4bit, {}), (AdamW8bit, {}), (AdamWFp8, {}), (AdamW4bit, {"v_mode": "rank1"}),
               (AdamW4bit, {"factor_second_moment": True})]


@pytest.mark.parametrize("cls,kw", ROUND_TRIPS, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_round_trip_through_weights_only_load_is_bit_exact(cls, kw):
    """The default (C kernel) path: state_dict records each state's format, survives torch.save /
    torch.load(weights_only=True), loads, and the resumed run equals the uninterrupted one bit for
    bit; the live state stays tensors only (contiguous ones after the load)."""
    model = _model()
    opt = cls(model.named_parameters(), lr=3e-3, **kw)
    _train(model, opt, steps=3)
    sd = opt.state_dict()
    layouts = {"0.weight": "block", "0.bias": "fp32", "2.weight": "block", "2.bias": "fp32"}
    if kw:
        layouts["0.weight"] = layouts["2.weight"] = "rank1" if "v_mode" in kw else "factored"
    for name, layout in layouts.items():
        assert _saved_state(sd, name)[STATE_FORMAT_KEY] == opt.state_format(layout)
        assert f"m={cls.M_FORMAT.name},v={cls.V_FORMAT.name},layout={layout}" in opt.state_format(layout)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    _train(model, opt, steps=3, seed=1)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = _model(seed=2)
    model2.load_state_dict(ck["model"])
    opt2 = cls(model2.named_parameters(), lr=3e-3, **kw)
    opt2.load_state_dict(ck["opt"])
    for st in opt2.state.values():
        assert STATE_FORMAT_KEY not in st
        assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in st.values())
    _train(model2, opt2, steps=3, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, v in opt.state[p].items():
            assert v.dtype == opt2.state[q][k].dtype and torch.equal(v, opt2.state[q][k]), k


# ----------------------------------------------------------------------------------------------
# lowprec.checkpoint's loader goes through load_state_dict: the same refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_checkpoint_of_another_optimizer_is_refused(fmt, tmp_path):
    """An AdamW8bit checkpoint (file or DCP directory) loaded with an AdamWFp8 optimizer: refused
    with the format records named, the optimizer's state unchanged. (The DCP loader lets the
    ValueError through unwrapped, hence either type.)"""
    from lowprec import checkpoint as ckpt
    from lowprec.checkpoint import CheckpointError

    model = _model()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    _train(model, opt, steps=2)
    path = ckpt.save(tmp_path / "ck", model, opt, step=2, format=fmt)
    model2 = _model()
    opt2 = AdamWFp8(model2.parameters(), lr=1e-2)
    _train(model2, opt2, steps=1)
    before = _snapshot(opt2)
    with pytest.raises((CheckpointError, ValueError), match="was written as .*m=de8-b256"):
        ckpt.load(path, model2, opt2)
    state, _ = _snapshot(opt2)
    for pid, st in state.items():
        for k, v in st.items():
            assert torch.equal(v, before[0][pid][k]), k
