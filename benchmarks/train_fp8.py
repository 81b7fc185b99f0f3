"""FP8 training quality: the demo Llama on stdlib text under fp32, ``fp8``, ``unit-fp8`` and a
naive FP8 cast (``fp8`` with ``cast.scaling = "none"``: scale 1), same seed, data and steps.

Prints the final validation losses and their gaps to fp32 (goal: within 1.5% for ``fp8`` and
``unit-fp8``), writes ``bench_results/train_fp8.json`` and ``bench_results/train_fp8.png``.

    .venv/bin/python benchmarks/train_fp8.py                      # 300 steps, batch 16
    .venv/bin/python benchmarks/train_fp8.py --steps 50 --runs fp32,fp8   # a quick look
    .venv/bin/python benchmarks/train_fp8.py --jobs 4                    # the runs in 4 processes

Each run uses ``--threads`` torch threads (default 1: on a machine shared by many processes,
more threads than free cores makes every step several times slower). ``--jobs`` runs the runs
in parallel processes; the numbers do not depend on it (same seed, same batches).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, write_json  # noqa: E402

import lowprec  # noqa: E402
from lowprec import runs  # noqa: E402
from lowprec.data import stdlib_corpus  # noqa: E402
from lowprec.models import demo_llama  # noqa: E402
from lowprec.recipes import Recipe  # noqa: E402
from lowprec.training import TrainConfig, train  # noqa: E402

GOAL_GAP = 0.015  # the issue's goal: FP8 runs at most 1.5% above fp32's validation loss (lower is better)


def recipe_for(run: str, gemm: str | None) -> Recipe:
    """The recipe of one run. ``naive`` is ``fp8`` with no scaling (every scale is 1)."""
    base = "fp8" if run == "naive" else run
    r = Recipe.from_name(base)
    if run == "naive":
        r = r.replace(name="fp8-naive", cast=r.cast.__class__(**{**r.cast.__dict__, "scaling": "none"}))
    if gemm and r.cast.format == "fp8":
        r = r.replace(cast=r.cast.__class__(**{**r.cast.__dict__, "gemm": gemm}))
    return r


def fp8_counters(model: torch.nn.Module) -> dict[str, int]:
    """Sum of the FP8 GEMMs' event counters (non-finite operands, kept scales)."""
    out = {"nonfinite_inputs": 0, "kept_scale_events": 0}
    for m in model.modules():
        if isinstance(m, lowprec.matmul.Fp8Gemm):
            out["nonfinite_inputs"] += int(m.nonfinite_inputs.sum())
            out["kept_scale_events"] += int(m.kept_scale_events.sum())
    return out


def run_one(run: str, args: argparse.Namespace) -> dict:
    """Train one run and return its results (a picklable dict)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = stdlib_corpus()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      warmup_steps=min(20, max(1, args.steps // 5)), eval_every=max(1, args.steps // 10))
    recipe = recipe_for(run, args.gemm)
    model = demo_llama(seed=args.seed)
    if recipe.name != "fp32":
        lowprec.convert(model, recipe)
    opt = runs.build_optimizer(model, recipe)
    t0 = time.perf_counter()
    res = train(model, opt, corpus, cfg, desc=run)
    wall = time.perf_counter() - t0
    out = dict(recipe=recipe.to_dict(), wall_s=wall, **res.to_dict(), **fp8_counters(model))
    print(f"{run:>10}: final val loss {res.final_val_loss:.4f}  (diverged at {res.diverged_at})  "
          f"median step {res.median_step_time_s:.3f} s  wall {wall:.0f} s", flush=True)
    write_json(f"{args.out}_{run}", dict(config=vars(args), run=run, result=out))  # survives a later crash
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="fp32,fp8,unit-fp8,naive",
                    help="comma-separated: fp32, fp8, fp8-delayed, fp8-rowwise, unit, unit-fp8, naive")
    ap.add_argument("--gemm", choices=("scaled_mm", "emulated"), default=None,
                    help="override the recipes' cast.gemm (same numbers up to float32 rounding; emulated is "
                         "faster on a CPU)")
    ap.add_argument("--out", default="train_fp8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    args = ap.parse_args()

    names = args.runs.split(",")
    for n in names:
        recipe_for(n, args.gemm)  # a bad run name fails before any training
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.jobs, len(names))) as pool:
            outs = pool.starmap(run_one, [(n, args) for n in names])
    else:
        outs = [run_one(n, args) for n in names]
    results, rows = dict(zip(names, outs)), []
    corpus = stdlib_corpus()
    base = results.get("fp32", {}).get("final_val_loss")
    for run, r in results.items():
        gap = (r["final_val_loss"] - base) / base if base else float("nan")
        r["gap_vs_fp32"] = gap
        rows.append(dict(run=run, final_val_loss=r["final_val_loss"], gap_vs_fp32_pct=100 * gap,
                         within_goal=("yes" if gap <= GOAL_GAP else "no") if run != "fp32" else "",
                         median_step_s=r["median_step_time_s"], nonfinite=r["nonfinite_inputs"],
                         kept_scales=r["kept_scale_events"]))
    print(f"\ndemo Llama, {args.steps} steps x batch {args.batch_size} x seq {args.seq_len}, seed {args.seed}, "
          f"stdlib text ({corpus})")
    print(format_table(rows))
    payload = dict(config=vars(args), goal_gap=GOAL_GAP, table=rows, runs=results)
    path = write_json(args.out, payload)
    png = plot(results, RESULTS_DIR / f"{args.out}.png", args)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


def plot(results: dict, path: Path, args) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run, r in results.items():
        tl = torch.tensor(r["train_loss"], dtype=torch.float64)
        k = 10
        smooth = tl.unfold(0, k, 1).mean(1) if tl.numel() >= k else tl
        a.plot(range(k - 1, k - 1 + smooth.numel()) if tl.numel() >= k else range(tl.numel()), smooth, label=run)
        if r["val_loss"]:
            s, v = zip(*r["val_loss"])
            b.plot(s, v, marker="o", label=run)
    a.set(title="train loss (10-step mean)", xlabel="step", ylabel="nats/byte")
    b.set(title="validation loss", xlabel="step", ylabel="nats/byte")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"demo Llama, FP8 recipes vs fp32 ({args.steps} steps, batch {args.batch_size})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
