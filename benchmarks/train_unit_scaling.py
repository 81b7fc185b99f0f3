"""Quality figure for unit scaling: the demo Llama trained under ``unit-fp16`` vs the same model in fp32.

Both sides: ``lowprec.models.demo_llama(seed)``, the stdlib text corpus, the same seed, the same
batches (``lowprec.data.batch_at``), the same step count, AdamW with the same betas, weight
decay, warm-up, cosine schedule and gradient clipping. The unit side is
``lowprec.convert(model, "unit-fp16")`` (every matmul operand, result and gradient rounded to
FP16, no loss scaling) with u-muP learning rates from ``lowprec.scaling.param_groups``; the
baseline is the untouched Hugging Face model in fp32 with one learning rate.

Learning rates are tuned with the same effort on both sides: ``--tune-steps`` short runs over
each side's candidate list, then the best of each is trained for ``--steps``. Everything
(tuning runs included) is printed and written to ``bench_results/train_unit_scaling.json``,
with the curves in ``bench_results/train_unit_scaling.png``.

    .venv/bin/python benchmarks/train_unit_scaling.py --steps 300 --batch 16 --seq 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, format_table, write_json  # noqa: E402

import lowprec  # noqa: E402
from lowprec.data import stdlib_corpus  # noqa: E402
from lowprec.models import demo_llama  # noqa: E402
from lowprec.scaling import param_groups  # noqa: E402
from lowprec.training import TrainConfig, train  # noqa: E402

BETAS = (0.9, 0.95)


def run(side: str, lr: float, cfg: TrainConfig, args: argparse.Namespace) -> dict:
    model = demo_llama(seed=args.seed)
    if side == "unit":
        model = lowprec.convert(model, args.recipe)
        # param_groups decays every parameter by lr * wd per step at the BASE rate (u-muP's
        # LR-independent decay), so the recipe's own weight decay applies here, not the fp32 one.
        wd = args.unit_weight_decay
        if wd is None:
            wd = lowprec.recipes.resolve(args.recipe).optimizer.weight_decay
        opt = torch.optim.AdamW(param_groups(model, lr, weight_decay=wd), lr=lr, betas=BETAS)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, betas=BETAS)
    t0 = time.perf_counter()
    res = train(model, opt, stdlib_corpus(), cfg)
    out = dict(side=side, lr=lr, steps=cfg.steps, final_val_loss=res.final_val_loss, diverged_at=res.diverged_at,
               wall_s=time.perf_counter() - t0, median_step_s=res.median_step_time_s,
               val_loss=res.val_loss, train_loss=res.train_loss)
    div = f", diverged at {res.diverged_at}" if res.diverged_at is not None else ""
    print(f"  {side:5s} lr={lr:<8g} steps={cfg.steps:4d} final val={res.final_val_loss:.4f} "
          f"({out['wall_s']:.0f} s{div})", flush=True)
    return out


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="unit-fp16")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="fp32 side's AdamW weight decay")
    ap.add_argument("--unit-weight-decay", type=float, default=None,
                    help="unit side's (u-muP, per step at the base rate); default: the recipe's")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--tune-steps", type=int, default=100, help="0: no tuning, use the first lr of each list")
    ap.add_argument("--fp32-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--unit-lrs", default="0.2,0.3,0.5")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="train_unit_scaling", help="JSON/PNG file name under bench_results/")
    ap.add_argument("--side", choices=("both", "fp32", "unit"), default="both",
                    help="run one side only (writes <name>_<side>.json); --merge then joins the two files")
    ap.add_argument("--merge", action="store_true", help="join <name>_fp32.json and <name>_unit.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        parts = {side: json.loads((RESULTS_DIR / f"{args.name}_{side}.json").read_text()) for side in ("fp32", "unit")}
        final = {side: parts[side]["final"][side] for side in parts}
        best = {side: final[side]["lr"] for side in final}
        tuning = parts["fp32"]["tuning"] + parts["unit"]["tuning"]
        report(args, final, best, tuning, commands=[parts[s]["command"] for s in ("fp32", "unit")])
        return

    lrs = {"fp32": _floats(args.fp32_lrs), "unit": _floats(args.unit_lrs)}
    tuning: list[dict] = []
    best = {side: v[0] for side, v in lrs.items()}
    if args.tune_steps and any(len(v) > 1 for v in lrs.values()):
        tcfg = TrainConfig(steps=args.tune_steps, batch_size=args.batch, seq_len=args.seq, seed=args.seed,
                           eval_every=args.tune_steps)
        print(f"tuning: {args.tune_steps} steps per candidate")
        for side, cands in lrs.items():
            if args.side not in ("both", side):
                continue
            runs = [run(side, lr, tcfg, args) for lr in cands]
            tuning += [{k: v for k, v in r.items() if k != "train_loss"} for r in runs]
            ok = [r for r in runs if r["diverged_at"] is None]
            best[side] = min(ok, key=lambda r: r["final_val_loss"])["lr"] if ok else cands[0]
        print(f"chosen: fp32 lr={best['fp32']:g}, unit lr={best['unit']:g}")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, seed=args.seed,
                      eval_every=args.eval_every)
    print(f"final runs: {args.steps} steps, batch {args.batch}, seq {args.seq}, seed {args.seed}")
    sides = ("fp32", "unit") if args.side == "both" else (args.side,)
    final = {side: run(side, best[side], cfg, args) for side in sides}
    if args.side != "both":
        path = write_json(f"{args.name}_{args.side}", dict(command=" ".join(sys.argv), config=vars(args),
                                                          tuning=tuning, final=final))
        print(f"wrote {path}")
        return
    report(args, final, best, tuning, commands=[" ".join(sys.argv)])


def report(args: argparse.Namespace, final: dict, best: dict, tuning: list, commands: list[str]) -> None:
    f32, unit = final["fp32"]["final_val_loss"], final["unit"]["final_val_loss"]
    gap = (unit - f32) / f32

    rows = []
    for (step, v32), (_, vu) in zip(final["fp32"]["val_loss"], final["unit"]["val_loss"]):
        rows.append({"step": step, "val fp32": v32, f"val {args.recipe}": vu,
                     "train fp32 (10-step mean)": _smooth(final["fp32"]["train_loss"])[step - 1],
                     f"train {args.recipe} (10-step mean)": _smooth(final["unit"]["train_loss"])[step - 1]})
    print(format_table(rows))
    print(f"final validation loss: fp32 {f32:.4f}, {args.recipe} {unit:.4f}, relative gap {100 * gap:+.2f}% "
          f"(goal: within 1.5%)")
    print(f"median step time: fp32 {final['fp32']['median_step_s']:.3f} s, {args.recipe} "
          f"{final['unit']['median_step_s']:.3f} s (this machine is shared; not a speed claim)")

    payload = dict(commands=commands, config=vars(args), chosen_lr=best, tuning=tuning,
                   final=final, final_val_loss={"fp32": f32, args.recipe: unit}, relative_gap=gap)
    path = write_json(args.name, payload)
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for side, label in (("fp32", f"fp32, lr {best['fp32']:g}"), ("unit", f"{args.recipe}, u-muP lr {best['unit']:g}")):
            tl = final[side]["train_loss"]
            line, = ax.plot(range(1, len(tl) + 1), _smooth(tl), alpha=0.6, label=f"train {label}")
            vs, vl = zip(*final[side]["val_loss"])
            ax.plot(vs, vl, "o-", color=line.get_color(), label=f"val {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.set_title(f"demo Llama on stdlib text: val gap {100 * gap:+.2f}%")
        ax.legend()
        fig.tight_layout()
        png = RESULTS_DIR / f"{args.name}.png"
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    except ImportError:
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()
