"""Bit selection: an exact integer program (HAWQ-V3) and the Pareto frontier (HAWQ-V2).

Minimise ``sum_i score_i(b_i)`` over one bit width per layer subject to a size budget, with
one-hot binaries ``x[i, b]``, solved exactly by ``scipy.optimize.milp`` (HiGHS branch and bound;
hundreds of layers take well under a second). The budget is either an average bit width over
all scored weights (``sum_i n_i b_i <= avg_bits * sum_i n_i``) or bytes
(``sum_i ceil(n_i b_i / 8) + 4 rows_i <= size_budget_bytes``: packed codes plus fp32 scales).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowprec.matmul.convert import HIGH_PRECISION_PLAN_KEY, HIGH_PRECISION_PLAN_VERSION
from lowprec.sensitivity.report import SensitivityReport


def _problem(report: SensitivityReport, bits: Sequence[int] | None):
    cand = tuple(report.bits if bits is None else sorted(set(bits)))
    bad = [b for b in cand if b not in report.bits]
    if bad:
        raise ValueError(f"bit widths {bad} were not scored in this report (it has {report.bits})")
    if not cand:
        raise ValueError("no candidate bit widths")
    layers = report.layers
    if not layers:
        raise ValueError("the report has no layers")
    c = np.array([[report.scores[n][b] for b in cand] for n in layers], dtype=np.float64)
    if not np.isfinite(c).all():
        bad_layers = [layers[i] for i in np.where(~np.isfinite(c).all(axis=1))[0]]
        raise ValueError(f"non-finite scores for layers {bad_layers}; cannot select bits")
    return cand, layers, c


def _weights(report: SensitivityReport, cand, layers, unit: str) -> np.ndarray:
    if unit == "bits":
        return np.array([[report.n_params[n] * b for b in cand] for n in layers], dtype=np.float64)
    return np.array([[report.size_bytes(n, b) for b in cand] for n in layers], dtype=np.float64)


def _solve(c: np.ndarray, w: np.ndarray, budget: float, lower: float = -np.inf) -> np.ndarray | None:
    """The optimal one-hot choice per layer with ``lower <= sum w x <= budget``; None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    L, K = c.shape
    one_hot = np.zeros((L, L * K))
    for i in range(L):
        one_hot[i, i * K:(i + 1) * K] = 1.0
    # Scale the objective so HiGHS's absolute tolerances are meaningful for tiny loss changes.
    span = float(np.abs(c).max()) or 1.0
    res = milp(
        c.reshape(-1) / span,
        constraints=[LinearConstraint(one_hot, 1.0, 1.0), LinearConstraint(w.reshape(1, -1), lower, budget)],
        integrality=np.ones(L * K),
        bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, "presolve": False},
    )
    if res.status == 2:  # infeasible: only possible with a lower bound (the all-smallest plan fits otherwise)
        return None
    if not res.success or res.x is None:
        raise RuntimeError(f"the bit-selection integer program failed: {res.message}")
    return np.round(res.x).reshape(L, K).argmax(axis=1)


def select_bits(
    report: SensitivityReport,
    avg_bits: float | None = None,
    size_budget_bytes: float | None = None,
    bits: Sequence[int] | None = None,
    exact: bool = False,
) -> dict[str, int]:
    """The plan (layer -> bits) that minimises the total score within the budget.

    Give exactly one of ``avg_bits`` (parameter-weighted average bit width) or
    ``size_budget_bytes``. ``bits`` restricts the candidates to a subset of the report's.
    A budget below what the smallest candidate bit width needs is an error that states the minimum.

    ``exact=True`` spends the whole budget: the plan's size must equal it (an average of exactly
    ``avg_bits``; for bytes, exactly ``size_budget_bytes``), so a comparison against a uniform
    plan of the same size is not won by a smaller plan. When no combination of layer sizes reaches
    the budget exactly, a ValueError says so and names the largest size at or below it.
    """
    if (avg_bits is None) == (size_budget_bytes is None):
        raise ValueError("give exactly one budget: avg_bits=... or size_budget_bytes=...")
    cand, layers, c = _problem(report, bits)
    if avg_bits is not None:
        if not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
            raise ValueError(f"avg_bits must be a finite number; got {avg_bits!r}")
        w = _weights(report, cand, layers, "bits")
        total = float(sum(report.n_params[n] for n in layers))
        budget = avg_bits * total
        minimum = float(w.min(axis=1).sum())
        if budget < minimum - 1e-9 * minimum:
            raise ValueError(f"avg_bits={avg_bits} is below the minimum {minimum / total:g} bits per weight that the "
                             f"smallest bit width ({min(cand)}) allows")
    else:
        if not isinstance(size_budget_bytes, (int, float)) or not math.isfinite(size_budget_bytes):
            raise ValueError(f"size_budget_bytes must be a finite number; got {size_budget_bytes!r}")
        w = _weights(report, cand, layers, "bytes")
        budget = float(size_budget_bytes)
        minimum = float(w.min(axis=1).sum())
        if budget < minimum:
            raise ValueError(f"size_budget_bytes={size_budget_bytes:g} is below the minimum {int(minimum)} bytes that the "
                             f"smallest bit width ({min(cand)}) allows (codes plus fp32 per-channel scales)")
    target = budget
    budget = budget * (1 + 1e-12) + 1e-9
    lower = target * (1 - 1e-12) - 1e-9 if exact else -np.inf
    choice = _solve(c, w, budget, lower)
    if choice is None:
        closest = _solve(-w, w, budget)  # the largest plan within the budget
        size = float(w[np.arange(len(layers)), closest].sum())
        what = (f"an average of {size / float(sum(report.n_params[n] for n in layers)):.6g} bits" if avg_bits is not None
                else f"{size:.0f} bytes")
        raise ValueError(f"exact=True: no plan over bit widths {cand} reaches the budget exactly with these layer sizes; "
                         f"the largest plan within it is {what}")
    return {n: cand[j] for n, j in zip(layers, choice)}


def plan_size(report: SensitivityReport, plan: Mapping[str, int]) -> dict[str, float]:
    """Bytes, parameter-weighted average bits and total score of a plan under ``report``."""
    missing = [n for n in report.layers if n not in plan]
    if missing:
        raise ValueError(f"plan has no bit width for layers {missing}")
    n_total = sum(report.n_params[n] for n in report.layers)
    return {
        "bytes": float(sum(report.size_bytes(n, plan[n]) for n in report.layers)),
        "avg_bits": sum(report.n_params[n] * plan[n] for n in report.layers) / n_total,
        "score": float(sum(report.scores[n][plan[n]] for n in report.layers)),
    }


def pareto_frontier(report: SensitivityReport, points: int = 24, bits: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Plans on the size / total-score frontier: the integer program solved at ``points`` byte
    budgets from the smallest to the largest plan, dominated and repeated plans dropped.
    Each entry: ``bytes``, ``avg_bits``, ``score``, ``plan``; sorted by size."""
    cand, layers, c = _problem(report, bits)
    w = _weights(report, cand, layers, "bytes")
    lo, hi = float(w.min(axis=1).sum()), float(w.max(axis=1).sum())
    out: dict[tuple[int, ...], dict[str, Any]] = {}
    for budget in np.linspace(lo, hi, max(2, points)):
        choice = _solve(c, w, float(budget) + 1e-9)
        assert choice is not None  # no lower bound: the all-smallest plan is always feasible
        key = tuple(int(j) for j in choice)
        if key not in out:
            plan = {n: cand[j] for n, j in zip(layers, choice)}
            out[key] = {**plan_size(report, plan), "plan": plan}
    entries = sorted(out.values(), key=lambda e: (e["bytes"], e["score"]))
    frontier, best = [], math.inf
    for e in entries:
        if e["score"] < best:
            frontier.append(e)
            best = e["score"]
    return frontier


def plot_pareto(frontier: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Size against total score of a frontier, as PNG (matplotlib imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([e["bytes"] / 1024 for e in frontier], [e["score"] for e in frontier], "o-")
    ax.set_xlabel("weight size (KiB)")
    ax.set_ylabel("total score (predicted loss increase)")
    ax.set_title(title or "Pareto frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_plan(plan: Mapping[str, int], path: str | Path) -> Path:
    """Write a plan as JSON (qualified module name -> bits), readable by ``lowprec.recipes.load_plan``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: int(v) for k, v in plan.items()}, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Training precision: which linear layers stay in high precision under a FLOP budget (issue 15)
# ----------------------------------------------------------------------------------------------



def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0.0 <= float(budget) <= 1.0):
        raise ValueError(f"budget must be a fraction of linear FLOPs in [0, 1]; got {budget!r}")
    return float(budget)


def _check_flops(flops: Mapping[str, int], names: Sequence[str] | None = None) -> dict[str, int]:
    if not isinstance(flops, Mapping) or not flops:
        raise ValueError("flops must be a non-empty mapping of layer name -> FLOPs per token")
    bad = [n for n, f in flops.items() if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f <= 0]
    if bad:
        raise ValueError(f"flops must be positive integers (FLOPs per token); not for layers {bad}")
    if names is not None:
        missing = [n for n in names if n not in flops]
        if missing:
            raise ValueError(f"flops has no entry for layers {missing}")
    return {str(n): int(f) for n, f in flops.items()}


def _within(used: int, budget: float, total: int) -> bool:
    """``used / total <= budget``, exactly for a budget given as a decimal (1e-12 relative slack
    absorbs the float product only)."""
    return used <= budget * total * (1 + 1e-12)


def select_high_precision(report, fmt: str = "nvfp4", budget: float = 0.1, *, high: str = "bf16") -> list[str]:
    """The linear layers to keep in ``high`` precision while the rest train in ``fmt``.

    ``report`` is a :class:`~lowprec.sensitivity.training_formats.TrainingSensitivityReport` that
    scored both ``fmt`` and ``high``. Each layer's gain is ``score[fmt] - score[high]``: the loss
    increase that keeping it in ``high`` removes. The 0/1 integer program (``scipy.optimize.milp``,
    solved exactly, as :func:`select_bits`) maximises the total gain of the kept layers subject to
    ``sum(flops of kept) <= budget * sum(flops of all scored layers)``. A layer whose gain is not
    positive is never kept (it would spend budget for nothing). Returns the kept names in the
    report's (model) order; ``budget=0`` keeps nothing, ``budget=1`` every layer with a positive gain.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    from lowprec.sensitivity.training_formats import check_format

    budget = _check_budget(budget)
    check_format(fmt, "fmt")
    check_format(high, "high")
    if fmt == high:
        raise ValueError(f"fmt and high are both {fmt!r}: keeping a layer in high precision would change nothing")
    formats = tuple(getattr(report, "formats", ()))
    for f, what in ((fmt, "fmt"), (high, "high")):
        if f not in formats:
            raise ValueError(f"{what}={f!r} was not scored in this report (it has {formats or 'no formats'}); "
                             f"score with formats=({fmt!r}, {high!r})")
    layers = list(report.layers)
    if not layers:
        raise ValueError("the report has no layers")
    flops = _check_flops(report.flops, layers)
    gain = np.array([report.scores[n][fmt] - report.scores[n][high] for n in layers], dtype=np.float64)
    if not np.isfinite(gain).all():
        raise ValueError(f"non-finite scores for layers {[layers[i] for i in np.where(~np.isfinite(gain))[0]]}")
    f = np.array([flops[n] for n in layers], dtype=np.float64)
    total = int(sum(flops[n] for n in layers))
    useful = gain > 0
    if not useful.any() or budget == 0.0:
        return []
    span = float(gain[useful].max())
    res = milp(
        -gain / span,
        constraints=[LinearConstraint(f.reshape(1, -1), -np.inf, budget * total * (1 + 1e-12))],
        integrality=np.ones(len(layers)),
        bounds=Bounds(np.zeros(len(layers)), useful.astype(np.float64)),
        options={"mip_rel_gap": 0.0, "presolve": False},
    )
    if not res.success or res.x is None:
        raise RuntimeError(f"the high-precision selection integer program failed: {res.message}")
    keep = [n for n, x in zip(layers, np.round(res.x)) if x > 0.5]
    assert _within(sum(flops[n] for n in keep), budget, total), "milp exceeded the FLOP budget"
    return keep


def _block_key(name: str) -> str | None:
    """The transformer block a linear layer belongs to: its name up to the first all-digit
    component (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``), None outside any block."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _blocks(model_layers: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(model_layers, str) or not isinstance(model_layers, Sequence) or not model_layers:
        raise ValueError("model_layers must be a non-empty sequence of linear layer names in model order, or of "
                         "blocks (each a sequence of names)")
    if all(isinstance(x, str) for x in model_layers):
        groups: dict[str, list[str]] = {}
        for n in model_layers:
            key = _block_key(n)
            if key is not None:
                groups.setdefault(key, []).append(n)
        if not groups:
            raise ValueError(f"no layer name in model_layers has a block index (such as model.layers.3.*): "
                             f"{list(model_layers)[:4]}")
        return list(groups.values())
    if any(isinstance(b, str) or not isinstance(b, Sequence) for b in model_layers):
        raise ValueError("model_layers mixes names and blocks; give one or the other")
    return [list(b) for b in model_layers]


def last_layers(model_layers: Sequence[str] | Sequence[Sequence[str]], budget: float,
                flops: Mapping[str, int], *, whole_blocks: bool = True) -> list[str]:
    """NVIDIA's rule (NVFP4 pretraining, arXiv 2509.25149: the last blocks stay in BF16), at a FLOP budget.

    ``model_layers`` is the list of linear names in model order (grouped into transformer blocks by
    the first all-digit component of the name, ``model.layers.<i>``; names outside every block,
    such as an LM head, are never kept) or an explicit list of blocks. Whole blocks are kept from
    the last one backwards while the kept linears' FLOPs stay within ``budget * sum(flops.values())``;
    the walk stops at the first block that does not fit (no block further up is taken instead).

    ``whole_blocks=False`` walks single linears instead (from the last block's last linear
    backwards, same stopping rule): the positional rule for a model so shallow that one block
    exceeds the budget (a 4-block model's block is 25% of its linear FLOPs).
    """
    budget = _check_budget(budget)
    blocks = _blocks(model_layers)
    if not whole_blocks:
        blocks = [[n] for b in blocks for n in b]
    flops = _check_flops(flops, [n for b in blocks for n in b])
    total = sum(flops.values())
    keep: list[str] = []
    used = 0
    for block in reversed(blocks):
        cost = sum(flops[n] for n in block)
        if not _within(used + cost, budget, total):
            break
        keep = list(block) + keep
        used += cost
    return keep


def random_layers(names: Sequence[str], budget: float, flops: Mapping[str, int], *, seed: int = 0) -> list[str]:
    """A random set of linear layers within the FLOP budget (the control for the other two rules).

    The layers of ``names`` are visited in a random order (``numpy.random.default_rng(seed)``
    permutation: the same seed, the same set) and each is kept when it still fits within
    ``budget * sum(flops.values())``; so the set is random but fills the budget about as well as
    the others do. Returned in the order of ``names``.
    """
    budget = _check_budget(budget)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError("names must be a non-empty sequence of linear layer names")
    flops = _check_flops(flops, names)
    total = sum(flops.values())
    chosen: set[str] = set()
    used = 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        n = names[int(i)]
        if n not in chosen and _within(used + flops[n], budget, total):
            chosen.add(n)
            used += flops[n]
    return [n for n in dict.fromkeys(names) if n in chosen]


def save_high_precision_plan(
    path: str | Path,
    keep: Sequence[str],
    *,
    fmt: str,
    budget: float,
    method: str,
    flops: Mapping[str, int],
    scores: Mapping[str, Mapping[str, float]] | None = None,
    high: str = "bf16",
) -> Path:
    """Write the high-precision plan, the contract with the training layer (recipe key
    ``high_precision_plan``), as JSON::

        {"lowprec_high_precision_plan": 1, "format": "nvfp4", "budget": 0.1, "high": "bf16",
         "keep": [qualified linear names], "method": "measured", "flops_fraction": 0.094,
         "flops": {name: FLOPs per token}, "scores": {name: {format: loss increase}}}

    ``flops`` covers every layer the budget is shared by (so ``flops_fraction``, the kept share, is
    recomputable); ``method`` says how ``keep`` was chosen (a scorer, ``"last_layers"``,
    ``"random"``, ...). A plan over its budget, or naming a layer without FLOPs, is refused.
    """
    from lowprec.sensitivity.training_formats import check_format

    budget = _check_budget(budget)
    check_format(fmt, "fmt")
    check_format(high, "high")
    if isinstance(keep, str) or not all(isinstance(n, str) for n in keep):
        raise ValueError(f"keep must be a list of qualified linear layer names; got {keep!r}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep names a layer twice: {keep}")
    flops = _check_flops(flops, keep)
    total = sum(flops.values())
    used = sum(flops[n] for n in keep)
    if not _within(used, budget, total):
        raise ValueError(f"keep holds {used / total:.6g} of linear FLOPs, over the budget {budget}")
    payload = {
        HIGH_PRECISION_PLAN_KEY: HIGH_PRECISION_PLAN_VERSION,
        "format": fmt,
        "budget": budget,
        "high": high,
        "keep": list(keep),
        "method": str(method),
        "flops_fraction": used / total,
        "flops": flops,
        "scores": {str(n): {str(f): float(v) for f, v in s.items()} for n, s in (scores or {}).items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def load_high_precision_plan(path: str | Path) -> dict[str, Any]:
    """Read and check a plan written by :func:`save_high_precision_plan` (the training layer's reader,
    :func:`lowprec.matmul.convert.read_high_precision_plan`, plus ``format`` and ``budget``); errors
    name the file and the field."""
    from lowprec.matmul.convert import read_high_precision_plan
    from lowprec.sensitivity.training_formats import check_format

    d = read_high_precision_plan(path)
    check_format(d.get("format"), f"high-precision plan {str(path)!r}: field 'format'")
    try:
        _check_budget(d.get("budget"))
    except ValueError as e:
        raise ValueError(f"high-precision plan {str(path)!r}: field 'budget': {e}") from None
    return d
