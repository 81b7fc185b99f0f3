"""Width transfer of the learning rate: the point of u-muP (Blake et al. 2024, Figure 1).

The demo Llama at hidden 128, 256 and 512 (head dim fixed at 64, so 2, 4 and 8 heads; MLP
intermediate size the demo's 688/256 of the hidden size, rounded to a multiple of 16: 352, 688,
1376; 4 layers), trained by two recipes over one grid of base learning rates each:

* ``fp32``: standard parametrisation, torch AdamW on one parameter group, no conversion;
* ``unit``: unit scaling with u-muP's per-parameter rates (``lowprec.scaling.param_groups`` via
  ``runs.build_optimizer``: hidden weights lr / sqrt(fan_in * depth), ...).

Every (recipe, width) is a :func:`lowprec.sweep.lr_sweep` (seed 0) over the recipe's grid: log
spaced by factors of 2, extended past an end that wins, so every width's optimum is bracketed and
every point lies on the same lattice. Same seed, data, batches and steps everywhere. u-muP says
the ``unit`` optimum should stay put as the width grows (the issue asks: at most one grid step,
a factor of 2, from 128 to 512); standard parametrisation gives no such promise. If the ``fp32``
optimum also stays put at this small scale, that is a finding, and the script says so.

Prints, per recipe, the best rate at each width and how many grid steps it moves from the
narrowest to the widest; writes ``width_transfer.json`` (every point), ``width_transfer.png``
(validation loss against learning rate, one curve per width, one panel per recipe) and the point
log ``width_transfer/points.jsonl`` (:class:`lowprec.sweep.PointLog`) into ``--out``: a rerun,
an interrupted run or an extended one (more widths, another centre) reruns no point it has.

Cost. Median step times measured here at 1 thread, batch 8 x 128 bytes (2-core CPU with the
other core busy, ``torch.set_num_threads(1)``, forward + backward + clip + AdamW step): hidden
128: 0.14 s (fp32) / 0.13 s (unit); 256: 0.31 / 0.34 s; 512: 1.18 / 1.41 s. So one point at all
three widths costs 1.63 s (fp32) and 1.88 s (unit) per step; at the defaults (``--steps 200
--batch-size 8``, 5 points per recipe and width: 30 runs) the grid is 5 x 200 x 3.51 s = 59
minutes on one thread (evaluation, 8 batches per run, adds about 1%), so it runs in the
background on a 2-core machine in about an hour and leaves the other core free. Every extension
of a sweep past an end costs one more point at that width (at hidden 512, 200 x 1.2 to 1.4 s:
about 4 to 5 minutes). Batch 16 would double the cost (0.22 / 0.64 s a step at 128 / 256). A run sees
200 x 8 x 128 = 205 K bytes, a third of the demo's 300 x 16 x 128: the figure is about where the
optimum sits, not about the final loss.

    python benchmarks/width_transfer.py                       # the full grid, ~1 h on 1 thread
    python benchmarks/width_transfer.py --widths 128,256 --recipes unit
    python benchmarks/width_transfer.py --widths 32,64 --head-dim 16 --layers 2 --steps 5 \\
        --batch-size 2 --seq-len 32 --out /tmp/wt          # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, machine  # noqa: E402

import lowprec  # noqa: E402
from lowprec import runs  # noqa: E402
from lowprec.data import stdlib_corpus  # noqa: E402
from lowprec.models import DEMO_LLAMA, DEMO_SEQ_LEN, demo_llama  # noqa: E402
from lowprec.recipes import resolve, with_overrides  # noqa: E402
from lowprec.sweep import PointLog, SweepResult, log_grid, lr_sweep  # noqa: E402
from lowprec.training import TrainConfig, train  # noqa: E402

NAME = "width_transfer"
WIDTHS = (128, 256, 512)
RECIPES = ("fp32", "unit")
HEAD_DIM = 64  # fixed while the width grows: heads = hidden / 64 (the demo: 256 / 4)
MLP_RATIO = DEMO_LLAMA["intermediate_size"] / DEMO_LLAMA["hidden_size"]  # 688 / 256, the demo's
MLP_MULTIPLE = 16  # intermediate sizes rounded to a multiple of 16 (FP8 GEMM dimensions, design.md)
LAYERS = 4
GRID_FACTOR = 2.0
# Grid centres: powers of 2, so both recipes' grids are lattices of factor 2 and the 5-point grid
# spans 16x. fp32: 2**-10 = 9.8e-4, grid 2.4e-4 to 3.9e-3, which holds torch AdamW's best on the
# demo Llama at 300 x 16 (5e-4, benchmarks/train_optim.py) and recipes/fp32.toml's earlier 3e-3;
# unit: 2**-2 = 0.25, grid 0.0625 to 1, around the u-muP base rate 0.3 (recipes/unit.toml).
GRID_CENTER = {"fp32": 2.0 ** -10, "unit": 2.0 ** -2}


def width_overrides(hidden: int, *, layers: int = LAYERS, head_dim: int = HEAD_DIM) -> dict[str, int]:
    """``demo_llama`` config overrides for the demo Llama at width ``hidden``: ``hidden / head_dim``
    heads and an MLP of ``MLP_RATIO * hidden`` rounded to a multiple of ``MLP_MULTIPLE``."""
    if hidden <= 0 or hidden % head_dim:
        raise ValueError(f"width_transfer: hidden size {hidden} must be a positive multiple of the head dim {head_dim}")
    heads = hidden // head_dim
    intermediate = max(MLP_MULTIPLE, int(round(MLP_RATIO * hidden / MLP_MULTIPLE)) * MLP_MULTIPLE)
    return dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=intermediate, num_hidden_layers=layers)


def run_point(recipe_name: str, overrides: dict[str, int], lr: float, seed: int, config: TrainConfig,
              corpus: Any, progress: bool = False) -> float:
    """Final validation loss of one run: the model at ``overrides``, ``recipe_name`` (``fp32``: no
    conversion) with its optimizer at base rate ``lr``."""
    recipe = resolve(recipe_name)
    if recipe.unit_scaling.enabled:
        # u-muP's own rules, norm gains included, as the README's width figures were measured: the
        # recipe's norm_lr_mult is an O(1) multiplier tuned at one width, not part of the transfer rule
        recipe = with_overrides(recipe, {"unit_scaling.norm_lr_mult": 1.0})
    model = demo_llama(seed=seed, **overrides)
    if recipe.unit_scaling.enabled or recipe.cast.format != "none":
        model = lowprec.convert(model, recipe)
    opt = runs.build_optimizer(model, recipe, name="AdamW", lr=lr)
    cfg = TrainConfig(**{**vars(config), "seed": seed})
    res = train(model, opt, corpus, cfg, progress=progress,
                desc=f"{recipe_name} h{overrides['hidden_size']} lr {lr:.3g}")
    return res.final_val_loss if res.diverged_at is None else math.inf


def grid_steps(lr_from: float, lr_to: float, factor: float = GRID_FACTOR) -> int:
    """How many grid steps (of ``factor``) separate two rates of the same lattice (signed)."""
    return int(round(math.log(lr_to / lr_from) / math.log(factor)))


def _parse_list(text: str, what: str, cast=str) -> list:
    try:
        items = [cast(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"width_transfer: --{what} must be a comma-separated list; got {text!r}") from None
    if not items:
        raise SystemExit(f"width_transfer: --{what} is empty")
    return items


def _centers(items: Sequence[str]) -> dict[str, float]:
    out = dict(GRID_CENTER)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in GRID_CENTER:
            raise SystemExit(f"width_transfer: --center expects RECIPE=LR with RECIPE one of {', '.join(GRID_CENTER)};"
                             f" got {item!r}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="hidden sizes (default %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="recipes to sweep (default %(default)s)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(20, steps // 5)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--center", action="append", default=[], metavar="RECIPE=LR",
                   help=f"grid centre of a recipe (default {GRID_CENTER})")
    p.add_argument("--grid-points", type=int, default=5, help="points of each initial grid (at least 5)")
    p.add_argument("--max-points", type=int, default=9, help="points a sweep may extend to (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="stdlib text to read (smoke runs: less)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default %(default)s)")
    p.add_argument("--progress", action="store_true", help="a progress bar per run")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    widths = _parse_list(args.widths, "widths", int)
    recipes = _parse_list(args.recipes, "recipes")
    for r in recipes:
        if r not in GRID_CENTER:
            raise SystemExit(f"width_transfer: unknown recipe {r!r}; expected some of {', '.join(GRID_CENTER)}")
    centers = _centers(args.center)
    torch.set_num_threads(args.threads)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(20, max(1, args.steps // 5))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                         warmup_steps=warmup, eval_every=args.steps, eval_batches=args.eval_batches)
    corpus = stdlib_corpus(max_bytes=args.max_bytes)
    out = Path(args.out)
    log_path = out / NAME / "points.jsonl"
    new_points = 0
    results: dict[str, dict[int, SweepResult]] = {r: {} for r in recipes}
    t0 = time.time()
    for width in widths:
        overrides = width_overrides(width, layers=args.layers, head_dim=args.head_dim)
        for recipe_name in recipes:
            opt_cfg = resolve(recipe_name).optimizer
            # everything that changes a point's loss, so a cached point is reused only for the same run
            setup = {"benchmark": NAME, **overrides, "steps": args.steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "warmup_steps": warmup, "eval_batches": args.eval_batches,
                     "data": corpus.source, "weight_decay": opt_cfg.weight_decay, "betas": list(opt_cfg.betas),
                     "eps": opt_cfg.eps}
            log = PointLog(log_path, setup)

            def run(lr: float, seed: int, recipe_name=recipe_name, overrides=overrides, log=log, width=width) -> float:
                nonlocal new_points
                hit = log.get(recipe_name, lr, seed)
                if hit is not None:
                    return hit
                loss = run_point(recipe_name, overrides, lr, seed, config, corpus, progress=args.progress)
                log.add(recipe_name, lr, seed, loss)
                new_points += 1
                print(f"  {recipe_name:<5} hidden {width:<4} lr {lr:<9.3g} val loss {loss:.4f}", flush=True)
                return loss

            results[recipe_name][width] = lr_sweep(
                f"{recipe_name} h{width}", run,
                log_grid(centers[recipe_name], args.grid_points, GRID_FACTOR),
                seeds=(args.seed,), max_points=args.max_points)
    payload = summarize(results, widths)
    payload.update(config={**vars(args), "out": str(args.out), "widths": widths, "recipes": recipes,
                           "centers": centers, "warmup_steps": warmup, "model": {w: width_overrides(
                               w, layers=args.layers, head_dim=args.head_dim) for w in widths}},
                   seconds=time.time() - t0, new_points=new_points, machine=machine(), data=corpus.source)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path} ({new_points} new points; the rest from {log_path})")
    png = None if args.no_plot else plot(results, out / f"{NAME}.png",
                                         f"demo Llama, {args.layers} layers, {args.steps} x {args.batch_size} x {args.seq_len}")
    if png is not None:
        print(f"wrote {png}")
    return 0


def summarize(results: dict[str, dict[int, SweepResult]], widths: Sequence[int]) -> dict[str, Any]:
    """Print and return, per recipe, the best rate per width and its shift in grid steps from the
    narrowest width to the widest (u-muP's claim: at most one step)."""
    payload: dict[str, Any] = {"recipes": {}}
    rows = []
    for recipe_name, per_width in results.items():
        best = {w: r.best_lr for w, r in per_width.items()}
        shift = grid_steps(best[widths[0]], best[widths[-1]]) if len(widths) > 1 else 0
        payload["recipes"][recipe_name] = {
            "best_lr": {str(w): best[w] for w in widths},
            "bracketed": {str(w): per_width[w].bracketed for w in widths},
            "best_loss": {str(w): per_width[w].points[best[w]] for w in widths},
            "shift_grid_steps": shift,
            "sweeps": {str(w): per_width[w].to_dict() for w in widths},
        }
        for w in widths:
            r = per_width[w]
            rows.append({"recipe": recipe_name, "hidden": w, "best lr": r.best_lr,
                         "val loss": r.points[r.best_lr], "bracketed": r.bracketed,
                         "points": len(r.points)})
    print(format_table(rows))
    for recipe_name, d in payload["recipes"].items():
        shift = d["shift_grid_steps"]
        note = "" if all(d["bracketed"].values()) else " (not every optimum is bracketed: raise --max-points)"
        print(f"{recipe_name}: best lr moves {shift:+d} grid steps (x{GRID_FACTOR:g} each) from hidden "
              f"{widths[0]} to {widths[-1]}{note}")
    return payload


def plot(results: dict[str, dict[int, SweepResult]], path: Path, title: str) -> Path | None:
    """Validation loss against learning rate: one panel per recipe, one curve per width, each
    width's best point starred (matplotlib, when installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, (recipe_name, per_width) in zip(axes[0], results.items()):
        for w, r in per_width.items():
            lrs = sorted(lr for lr in r.points if math.isfinite(r.points[lr]))
            line, = ax.plot(lrs, [r.points[lr] for lr in lrs], marker="o", label=f"hidden {w}")
            if math.isfinite(r.points.get(r.best_lr, math.inf)):
                ax.plot([r.best_lr], [r.points[r.best_lr]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("base learning rate" + (" (u-muP)" if recipe_name != "fp32" else ""))
        ax.set_ylabel("final validation loss (nats/byte)")
        ax.set_title(f"{recipe_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
