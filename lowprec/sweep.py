"""The learning-rate sweep every side-by-side quality figure uses: each arm at its own best rate.

A comparison against a baseline at a guessed learning rate says nothing (u-muP, Blake et al.
2024, compares every parametrisation at its own swept optimum). The protocol:

1. run the arm at log-spaced learning rates (at least :data:`MIN_POINTS`);
2. while the best point is at either end of the grid, extend the grid past that end by the same
   factor (up to ``max_points``), so the optimum is bracketed;
3. run the remaining seeds at the best rate and report their mean and spread.

Same seed, batches and steps for every point: ``run(lr, seed)`` must be deterministic.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIN_POINTS = 5  # the fewest grid points a sweep may report


@dataclass
class SweepResult:
    """One arm's sweep: every point run, the best rate, and the seeds at that rate."""

    arm: str
    points: dict[float, float] = field(default_factory=dict)  # lr -> final validation loss (first seed)
    best_lr: float = math.nan
    bracketed: bool = False  # the best point has a neighbour on each side
    seed_losses: dict[int, float] = field(default_factory=dict)  # at best_lr

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seed_losses.values()) if self.seed_losses else math.nan

    @property
    def spread(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        v = list(self.seed_losses.values())
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = {f"{k:.3g}": v for k, v in sorted(self.points.items())}
        d["mean"], d["spread"] = self.mean, self.spread
        return d


def log_grid(center: float, points: int = MIN_POINTS, factor: float = 2.0) -> list[float]:
    """``points`` learning rates spaced by ``factor`` around ``center``."""
    if points < 1 or factor <= 1 or not center > 0:
        raise ValueError(f"log_grid needs points >= 1, factor > 1 and center > 0; got {points}, {factor}, {center}")
    lo = -(points // 2)
    return [center * factor ** (lo + i) for i in range(points)]


def lr_sweep(
    arm: str,
    run: Callable[[float, int], float],
    lrs: Sequence[float],
    *,
    seeds: Sequence[int] = (0,),
    max_points: int = 9,
    on_point: Callable[[str, float, int, float], None] | None = None,
) -> SweepResult:
    """Sweep ``run(lr, seed) -> final validation loss`` over ``lrs`` (log-spaced, ascending),
    extending the grid until its best point is not at an end (or ``max_points`` are run), then
    run the other ``seeds`` at the best rate. A non-finite loss counts as worse than any finite one."""
    grid = sorted(lrs)
    if len(grid) < MIN_POINTS:
        raise ValueError(f"a sweep needs at least {MIN_POINTS} learning rates; got {len(grid)}")
    factor = grid[1] / grid[0]
    result = SweepResult(arm=arm)

    def point(lr: float) -> None:
        if lr not in result.points:
            loss = run(lr, seeds[0])
            result.points[lr] = loss if math.isfinite(loss) else math.inf
            if on_point is not None:
                on_point(arm, lr, seeds[0], loss)

    for lr in grid:
        point(lr)
    while True:
        ordered = sorted(result.points)
        best = min(ordered, key=lambda lr: result.points[lr])
        at_end = best in (ordered[0], ordered[-1])
        if not at_end or len(ordered) >= max_points:
            break
        point(best * factor if best == ordered[-1] else best / factor)
    result.best_lr = best
    result.bracketed = not at_end
    result.seed_losses[seeds[0]] = result.points[best]
    for seed in seeds[1:]:
        loss = run(best, seed)
        result.seed_losses[seed] = loss
        if on_point is not None:
            on_point(arm, best, seed, loss)
    return result


class PointLog:
    """The points a sweep has run, one JSON line each, so an interrupted or extended sweep (another
    centre, more points, more seeds) reruns nothing: a point is ``(arm, lr, seed)`` under a
    ``setup`` (steps, batch, model: whatever changes the loss), and only lines whose setup equals
    this one are reused. Non-finite losses are stored as ``null`` and read back as inf."""

    def __init__(self, path: str | Path, setup: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.setup = dict(setup)
        self._done: dict[tuple[str, str, int], float] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if all(row.get(k) == v for k, v in self.setup.items()):
                    loss = row["loss"]
                    self._done[(row["arm"], _lr_key(row["lr"]), int(row["seed"]))] = (
                        math.inf if loss is None else float(loss))

    def get(self, arm: str, lr: float, seed: int) -> float | None:
        return self._done.get((arm, _lr_key(lr), seed))

    def add(self, arm: str, lr: float, seed: int, loss: float, **extra: Any) -> None:
        key = (arm, _lr_key(lr), seed)
        if key in self._done:
            return
        self._done[key] = loss if math.isfinite(loss) else math.inf
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"arm": arm, "lr": lr, "seed": seed, "loss": loss if math.isfinite(loss) else None,
               **self.setup, **extra}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def cached(self, arm: str, run: Callable[[float, int], float]) -> Callable[[float, int], float]:
        """``run`` for ``arm``, answered from the log when the point was run before, logged when not."""

        def wrapped(lr: float, seed: int) -> float:
            hit = self.get(arm, lr, seed)
            if hit is not None:
                return hit
            loss = float(run(lr, seed))
            self.add(arm, lr, seed, loss)
            return loss

        return wrapped


def _lr_key(lr: float) -> str:
    return f"{lr:.6g}"


def plot_sweeps(results: Mapping[str, SweepResult], path: str | Path, title: str) -> Path | None:
    """Final validation loss against learning rate, one curve per arm, the best point marked
    (matplotlib, when installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm, r in results.items():
        lrs = sorted(lr for lr in r.points if math.isfinite(r.points[lr]))
        line, = ax.plot(lrs, [r.points[lr] for lr in lrs], marker="o", label=arm)
        if math.isfinite(r.points.get(r.best_lr, math.inf)):
            ax.plot([r.best_lr], [r.points[r.best_lr]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
