"""Learning-rate sweeps at the demo's settings: the rate every shipped recipe carries comes from here.

Each arm (a recipe and an optimizer) trains the demo Llama exactly as ``lowprec demo`` does
(300 steps x 16 sequences of 128 bytes of standard-library text, cosine schedule, 20 warm-up
steps, seed 0) at log-spaced learning rates by factors of 2 (:func:`lowprec.sweep.lr_sweep`: at
least 5 points, extended until the best point has a neighbour on each side), then runs seeds 1
and 2 at the best rate. Unit-scaled recipes sweep the u-muP *base* rate (each parameter's rate is
derived from it by ``lowprec.scaling.param_groups``), so their numbers are not comparable to
fp32's: compare losses at each arm's own optimum, never rates.

    python benchmarks/sweep_demo.py                          # the demo's two arms, ~35 min on 2 cores
    python benchmarks/sweep_demo.py --arms fp8:AdamW --center fp8=5e-4
    python benchmarks/sweep_demo.py --steps 20 --arms fp32:AdamW --seeds 0   # a smoke run

Every point is appended to ``bench_results/sweep_demo/points.jsonl`` (:class:`lowprec.sweep.PointLog`),
so an interrupted sweep resumes and a wider one reruns nothing. Writes
``bench_results/sweep_demo.json`` and ``sweep_demo.png`` (loss against learning rate).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, write_json  # noqa: E402

from lowprec import runs  # noqa: E402
from lowprec.data import stdlib_corpus  # noqa: E402
from lowprec.models import DEMO_SEQ_LEN, demo_llama  # noqa: E402
from lowprec.recipes import convert, resolve, with_overrides  # noqa: E402
from lowprec.sweep import PointLog, SweepResult, log_grid, lr_sweep, plot_sweeps  # noqa: E402
from lowprec.training import TrainConfig, train  # noqa: E402

DEFAULT_ARMS = ("fp32:AdamW", "unit-fp8:AdamW4bit")  # the demo's two sides
# Centres of the first 5-point grid (the sweep extends past an end that wins): fp32's from
# benchmarks/train_optim.py's earlier sweep (best 5e-4); unit recipes around the u-muP base rate
# (0.6 for those whose norm gains train at 1/16 of u-muP's rate, where the best moved up to 1.2).
DEFAULT_CENTERS = {"fp32": 5e-4, "fp8": 5e-4, "unit": 0.6, "unit-fp8": 0.6, "unit-fp16": 0.3}


def demo_config(steps: int = 300, batch_size: int = 16, seed: int = 0) -> TrainConfig:
    """The training settings of ``lowprec demo`` (``lowprec.demo.run_demo``) for ``steps``."""
    return TrainConfig(steps=steps, batch_size=batch_size, seq_len=DEMO_SEQ_LEN, seed=seed,
                       warmup_steps=min(20, max(1, steps // 5)), schedule="cosine",
                       eval_every=max(1, steps // 6))


def train_arm(recipe_name: str, optimizer: str, lr: float, seed: int, steps: int, batch_size: int, corpus,
              model_overrides: dict | None = None, recipe_overrides: dict | None = None) -> float:
    """Final validation loss of one demo run of ``recipe_name`` (with ``recipe_overrides`` by dotted
    name, e.g. ``{"cast.rht": False}``) and ``optimizer`` at base rate ``lr``."""
    recipe = with_overrides(resolve(recipe_name), recipe_overrides)
    model = demo_llama(seed=seed, **(model_overrides or {}))
    if recipe_name != "fp32":
        model = convert(model, recipe)
    opt = runs.build_optimizer(model, recipe, name=optimizer, lr=lr)
    res = train(model, opt, corpus, demo_config(steps, batch_size, seed), progress=False)
    return res.final_val_loss if res.diverged_at is None else float("inf")


def point_log(log_path: Path, steps: int, batch_size: int, model_overrides: dict | None = None) -> PointLog:
    """The point cache of demo runs of this size (shared by every benchmark that sweeps at it)."""
    return PointLog(log_path, {"steps": steps, "batch_size": batch_size, "seq_len": DEMO_SEQ_LEN,
                               "model": model_overrides or {}})


def sweep_arms(arms: list[str], *, steps: int, batch_size: int, seeds: tuple[int, ...], centers: dict[str, float],
               max_points: int, log_path: Path, model_overrides: dict | None = None,
               recipe_overrides: dict[str, dict] | None = None) -> dict[str, SweepResult]:
    """Run the sweep protocol for each ``recipe:optimizer`` arm (``recipe_overrides[arm]``: dotted
    recipe fields changed for that arm, whose name then says so); points come from / go to ``log_path``."""
    corpus = stdlib_corpus()
    log = point_log(log_path, steps, batch_size, model_overrides)
    results: dict[str, SweepResult] = {}
    for arm in arms:
        recipe_name, _, optimizer = arm.partition(":")
        optimizer = optimizer.split(" ")[0]  # "nvfp4:AdamW no-rht": the optimizer, then the variant
        center = centers.get(arm, centers.get(recipe_name, DEFAULT_CENTERS.get(recipe_name, 1e-3)))
        changes = (recipe_overrides or {}).get(arm)

        def run(lr: float, seed: int, recipe_name=recipe_name, optimizer=optimizer, changes=changes) -> float:
            t0 = time.perf_counter()
            loss = train_arm(recipe_name, optimizer, lr, seed, steps, batch_size, corpus, model_overrides, changes)
            print(f"  {recipe_name} + {optimizer} lr {lr:.4g} seed {seed}: {loss:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            return loss

        results[arm] = lr_sweep(arm, log.cached(arm, run), log_grid(center), seeds=seeds, max_points=max_points)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated recipe:optimizer arms")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2", help="seeds at each arm's best rate (the first runs the sweep)")
    p.add_argument("--center", action="append", default=[], metavar="ARM=LR",
                   help="centre of an arm's first 5-point grid (recipe or recipe:optimizer)")
    p.add_argument("--max-points", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tag", default="sweep_demo", help="name of the JSON and PNG written")
    p.add_argument("--log", type=Path, default=RESULTS_DIR / "sweep_demo" / "points.jsonl",
                   help="the point log shared by every sweep at these settings (default %(default)s); two "
                        "processes sweeping different arms may share it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    centers = {}
    for item in args.center:
        k, _, v = item.partition("=")
        centers[k] = float(v)
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if ":" not in a:
            p.error(f"arm {a!r} must be recipe:optimizer, e.g. fp32:AdamW")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.time()
    results = sweep_arms(arms, steps=args.steps, batch_size=args.batch_size, seeds=seeds, centers=centers,
                         max_points=args.max_points, log_path=args.log)
    rows = []
    for arm, r in results.items():
        rows.append({"arm": arm, "swept": " ".join(f"{lr:.3g}:{r.points[lr]:.4f}" for lr in sorted(r.points)),
                     "best lr": f"{r.best_lr:.3g}", "bracketed": r.bracketed, "mean": f"{r.mean:.4f}",
                     "spread": f"{r.spread:.4f}", "seeds": " / ".join(f"{v:.4f}" for v in r.seed_losses.values())})
    print(format_table(rows))
    payload = {"config": {**vars(args), "seeds": list(seeds)}, "seconds": time.time() - t0,
               "arms": {a: r.to_dict() for a, r in results.items()}}
    base = next((r for a, r in results.items() if a.startswith("fp32:")), None)
    if base is not None:
        for a, r in results.items():
            if r is not base:
                gap = r.mean / base.mean - 1
                payload.setdefault("gaps_vs_tuned_fp32", {})[a] = gap
                print(f"{a} vs tuned fp32: {gap:+.2%} (means over seeds {list(seeds)})")
    print(f"wrote {write_json(args.tag, payload)}")
    plot = plot_sweeps(results, RESULTS_DIR / f"{args.tag}.png",
                       f"demo Llama, {args.steps} x {args.batch_size} x {DEMO_SEQ_LEN}: each arm's lr sweep")
    if plot is not None:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
