"""The plumbing of one run of the CLI or the demo: its directory, metrics JSON, PNG plots, and the
optimizer a recipe asks for.

Every ``lowprec`` command that does work writes into a run directory (``runs/<command>-<time>``
unless the user names one) and says where it is when it ends. Nothing here trains or converts;
it only builds, measures and records.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class FeatureMissing(RuntimeError):
    """A part of lowprec this run needs is not present in this build (named in the message)."""


def require(module: str, attr: str | None = None, *, what: str) -> Any:
    """Import ``module`` (and fetch ``attr``), or raise :class:`FeatureMissing` naming ``what`` needs it.

    Pieces of lowprec land independently; a command that needs one that is missing must say so
    plainly rather than fail deep inside with an ``AttributeError``.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise FeatureMissing(f"{what} needs {module}, which this lowprec build does not provide ({e})") from None
    if attr is None:
        return mod
    obj = getattr(mod, attr, None)
    if obj is None:
        raise FeatureMissing(f"{what} needs {module}.{attr}, which this lowprec build does not provide yet")
    return obj


# ----------------------------------------------------------------------------------------------
# Run directories and metrics
# ----------------------------------------------------------------------------------------------


def make_run_dir(command: str, out: str | os.PathLike | None = None, root: str | os.PathLike = "runs") -> Path:
    """``out`` if given, else ``runs/<command>-<UTC time>`` (a suffix keeps two runs apart)."""
    if out is not None:
        path = Path(out)
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{command}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{command}-{stamp}-{n}"
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run directory {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no NaN/inf; keep the value readable
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (non-finite floats as strings) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(payload), indent=2, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is the optional "plot" extra; without it a run says so and writes no PNG)
# ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    dashed: Iterable[str] = (),
) -> Path | None:
    """Line plot of named ``(x, y)`` curves into a PNG; ``None`` when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    dashed = set(dashed)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), label=label, linestyle="--" if label in dashed else "-")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(
    path: str | os.PathLike, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str
) -> Path | None:
    """Bar chart (one bar per label) into a PNG; ``None`` when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(labels) + 2), 4.5))
    ax.bar(range(len(values)), list(values))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(list(labels), rotation=90, fontsize=7)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def training_plot(path: str | os.PathLike, results: Mapping[str, Any], title: str, start_step: int = 0) -> Path | None:
    """Training loss (smoothed, solid) and validation loss (dashed) of one or more ``TrainResult``
    (``start_step``: the step a resumed run started from)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    dashed = []
    for label, r in results.items():
        curves[f"{label} train"] = (list(range(start_step + 1, start_step + len(r.train_loss) + 1)),
                                    smooth(r.train_loss))
        if r.val_loss:
            curves[f"{label} val"] = ([s for s, _ in r.val_loss], [v for _, v in r.val_loss])
            dashed.append(f"{label} val")
    return plot_curves(path, curves, title=title, ylabel="cross-entropy (nats/byte)", dashed=dashed)


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------

_LOWPREC_OPTIMIZERS = ("AdamW4bit", "AdamW8bit", "AdamWFp8")


def param_groups_for(model: nn.Module, recipe, lr: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for ``recipe``: u-muP groups (``lowprec.scaling.param_groups``) for a
    unit-scaled model, one plain group otherwise."""
    opt = recipe.optimizer
    lr = opt.lr if lr is None else lr
    if recipe.unit_scaling.enabled:
        groups = require("lowprec.scaling", "param_groups", what=f"recipe {recipe.name!r} (u-muP learning rates)")
        return list(groups(model, lr, weight_decay=opt.weight_decay, norm_lr_mult=recipe.unit_scaling.norm_lr_mult))
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": opt.weight_decay}]


def build_optimizer(model: nn.Module, recipe, *, name: str | None = None, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``recipe.optimizer`` names (or ``name``), over :func:`param_groups_for`.

    ``AdamW`` is torch's; the others are :mod:`lowprec.optim`'s quantized-state AdamW.
    """
    cfg = recipe.optimizer
    name = name or cfg.name
    groups = param_groups_for(model, recipe, lr)
    kwargs: dict[str, Any] = dict(lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(groups, **kwargs)
    if name not in _LOWPREC_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected AdamW or one of {', '.join(_LOWPREC_OPTIMIZERS)}")
    cls = require("lowprec.optim", name, what=f"optimizer {name!r}")
    extra: dict[str, Any] = {}
    if cfg.factor_second_moment:
        extra["factor_second_moment"] = True
    if cfg.fp32_state_patterns:
        # the optimizer matches these regular expressions against parameter names: give it the names
        extra["fp32_state_patterns"] = tuple(cfg.fp32_state_patterns)
        name_of = {id(p): n for n, p in model.named_parameters()}
        for g in groups:
            g["param_names"] = [name_of.get(id(p), "") for p in g["params"]]
    try:
        return cls(groups, **kwargs, **extra)
    except TypeError as e:
        raise FeatureMissing(f"lowprec.optim.{name} does not accept the recipe's optimizer settings {sorted(extra)}: {e}") from None


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """True storage of the optimizer's state: every tensor in ``optimizer.state``, each storage
    counted once (code books shared between parameters are not counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            local = x.to_local() if hasattr(x, "to_local") else x
            storage = local.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for state in optimizer.state.values():
        visit(state)
    return total


# ----------------------------------------------------------------------------------------------
# Sensitivity and bit plans (lowprec sensitivity and the demo)
# ----------------------------------------------------------------------------------------------


def sensitivity_batches(corpus, n: int, batch_size: int, seq_len: int, seed: int = 1234) -> list:
    """Fixed training batches for scoring (a different seed from training's, same windows every run)."""
    from lowprec.data import batch_at

    return [batch_at(corpus.train, i, batch_size, seq_len, seed) for i in range(n)]


def lm_loss_fn(model, batch):
    """``loss_fn(model, batch)`` for lowprec.sensitivity: next-byte cross-entropy."""
    from lowprec.training import lm_loss

    return lm_loss(model, *batch)


def score_and_plan(model, batches, *, method: str, bits: Sequence[int], avg_bits: float | None,
                   size_budget_bytes: int | None, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Score layers with :func:`lowprec.sensitivity.score`, choose bits with ``select_bits``, and
    write into ``run_dir``: ``sensitivity.json`` and ``sensitivity.png`` (the report),
    ``plan.json`` (qualified module name -> bits, what ``lowprec.convert(..., plan=)`` and
    ``lowprec train --plan`` read), ``plan.png`` (bits per layer) and ``pareto.png`` (size against
    total score). Shared by ``lowprec sensitivity`` and the demo."""
    sens = require("lowprec.sensitivity", what="sensitivity scoring")
    score = require("lowprec.sensitivity", "score", what="sensitivity scoring")
    select_bits = require("lowprec.sensitivity", "select_bits", what="bit selection")
    t0 = time.perf_counter()
    report = score(model, lm_loss_fn, batches, method=method, bits=tuple(bits), progress=progress)
    seconds = time.perf_counter() - t0
    print(report)
    budget = {"size_budget_bytes": size_budget_bytes} if size_budget_bytes is not None else {"avg_bits": avg_bits}
    plan = {k: int(v) for k, v in select_bits(report, **budget).items()}
    files: list[Path | None] = []
    if hasattr(report, "to_json"):
        report.to_json(run_dir / "sensitivity.json")
        files.append(run_dir / "sensitivity.json")
    if hasattr(report, "plot"):
        files.append(Path(report.plot(run_dir / "sensitivity.png")))
    files.append(write_json(run_dir / "plan.json", plan))
    names = list(plan)
    files.append(plot_bars(run_dir / "plan.png", names, [plan[n] for n in names],
                           title=f"bit plan ({method}, {_budget_text(budget)})", ylabel="bits"))
    if hasattr(sens, "pareto_frontier") and hasattr(sens, "plot_pareto") and _pyplot() is not None:
        files.append(Path(sens.plot_pareto(sens.pareto_frontier(report), run_dir / "pareto.png",
                                           title=f"size vs predicted loss increase ({method})")))
    numel = {n: m.weight.numel() for n, m in model.named_modules() if n in plan and hasattr(m, "weight")}
    total = sum(numel.values())
    mean_bits = sum(plan[n] * numel[n] for n in numel) / total if total else float("nan")
    counts = {b: sum(1 for v in plan.values() if v == b) for b in sorted(set(plan.values()))}
    print(f"plan: {len(plan)} layers, {mean_bits:.2f} bits per weight on average ({_budget_text(budget)}); "
          f"layers per bit width {counts}; scored with {method} in {seconds:.1f} s")
    return {"plan": plan, "files": files, "seconds": seconds, "mean_bits": mean_bits, "report": report}


def _budget_text(budget: dict[str, Any]) -> str:
    k, v = next(iter(budget.items()))
    return f"average {v} bits" if k == "avg_bits" else f"budget {v:,} bytes"
