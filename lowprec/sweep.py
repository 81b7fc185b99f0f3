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

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
