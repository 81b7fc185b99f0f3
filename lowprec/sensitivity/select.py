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
