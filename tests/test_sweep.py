"""The learning-rate sweep protocol: the best point is bracketed, the grid extends past an end,
the seeds run at the best rate, and a diverged point never wins."""

from __future__ import annotations

import math

import pytest

from lowprec.data import stdlib_corpus
from lowprec.sweep import MIN_POINTS, log_grid, lr_sweep


def _bowl(optimum: float):
    """A deterministic loss, smallest at ``optimum``, with a seed-dependent offset; records calls."""
    calls: list[tuple[float, int]] = []

    def run(lr: float, seed: int) -> float:
        calls.append((lr, seed))
        return (math.log2(lr / optimum)) ** 2 + 0.01 * seed

    return run, calls


def test_a_bracketed_optimum_needs_no_extension():
    run, calls = _bowl(1e-3)
    r = lr_sweep("a", run, log_grid(1e-3), seeds=(0, 1, 2))
    assert r.best_lr == pytest.approx(1e-3) and r.bracketed
    assert len(r.points) == MIN_POINTS
    assert r.seed_losses == pytest.approx({0: 0.0, 1: 0.01, 2: 0.02})
    assert r.mean == pytest.approx(0.01) and r.spread == pytest.approx(0.01)
    assert [c for c in calls if c[1] != 0] == [(r.best_lr, 1), (r.best_lr, 2)]


def test_an_optimum_past_the_grid_extends_it_until_bracketed():
    run, _ = _bowl(1.6e-2)  # 4 grid steps above the top of log_grid(1e-3)
    r = lr_sweep("a", run, log_grid(1e-3))
    assert r.best_lr == pytest.approx(1.6e-2) and r.bracketed
    assert max(r.points) == pytest.approx(3.2e-2)  # one point past the optimum, no more
    run, _ = _bowl(1e-6)
    r = lr_sweep("a", run, log_grid(1e-3), max_points=7)
    assert not r.bracketed and len(r.points) == 7  # said plainly when the budget runs out


def test_a_diverged_point_never_wins_and_grids_are_checked():
    r = lr_sweep("a", lambda lr, seed: math.nan if lr > 1e-3 else -lr, log_grid(1e-3))
    assert r.best_lr == pytest.approx(1e-3) and math.isinf(r.points[max(r.points)])
    with pytest.raises(ValueError, match="at least 5"):
        lr_sweep("a", lambda lr, seed: 0.0, [1e-3, 2e-3])
    with pytest.raises(ValueError, match="center > 0"):
        log_grid(-1.0)


def test_stdlib_halves_are_disjoint():
    a, b = stdlib_corpus(max_bytes=600_000, half=0), stdlib_corpus(max_bytes=600_000, half=1)
    assert a.train.numel() > 10_000 and b.train.numel() > 10_000
    assert bytes(a.train[:2000].tolist()) != bytes(b.train[:2000].tolist())
    assert a.source.endswith("(half 0)") and b.source.endswith("(half 1)")
    with pytest.raises(ValueError, match="half must be 0, 1 or None"):
        stdlib_corpus(half=2)
