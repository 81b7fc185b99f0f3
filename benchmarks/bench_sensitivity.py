"""Sensitivity scoring on the demo Llama: each method's table, JSON, PNG and wall time.

The demo-size Llama (lowprec.models.demo_llama) is first trained briefly on the stdlib text corpus
(``--pretrain-steps``; cached under bench_results/ so reruns skip it), since the sensitivities of
a random init say little. Then ``lowprec.sensitivity.score`` runs with each method on the same
``--score-batches`` training batches, and the script prints:

* each report's table, and writes ``bench_results/sensitivity_<method>.json`` and ``.png``;
* the time of each method on this CPU (goal: PQI and measured under 2 minutes) and the number of
  Hessian-vector products Hutchinson needed (per layer and in all);
* agreement with the measured baseline (median relative error, rank correlation per bit width);
* the plan each method picks at ``--avg-bits`` and its true joint loss (all planned layers quantised).

    .venv/bin/python benchmarks/bench_sensitivity.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, write_json  # noqa: E402

import lowprec.sensitivity as S  # noqa: E402
from lowprec.data import batch_at, stdlib_corpus  # noqa: E402
from lowprec.models import demo_llama  # noqa: E402
from lowprec.training import TrainConfig, lm_loss, train  # noqa: E402


def pretrained_llama(steps: int, seed: int = 0, batch_size: int = 16, seq_len: int = 128):
    """The demo Llama after ``steps`` AdamW steps on stdlib text (cached state dict, weights_only load)."""
    model = demo_llama(seed=seed)
    if steps <= 0:
        return model, None
    path = RESULTS_DIR / f"demo_llama_pretrained_{steps}steps_seed{seed}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, {"cached": str(path)}
    corpus = stdlib_corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    t = time.perf_counter()
    res = train(model, opt, corpus, TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                                eval_every=max(steps // 4, 1)), progress=True, desc="pretrain")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, {"val_loss": res.val_loss, "time_s": time.perf_counter() - t}


def loss_fn(model, batch):
    return lm_loss(model, *batch)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--score-batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--methods", default="measured,pqi,hawq")
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--rel-tol", type=float, default=0.1)
    ap.add_argument("--abs-tol", type=float, default=1.0,
                    help="Hutchinson also stops a layer at SEM <= this (traces near 0, e.g. q/k projections)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on this shared 2-core machine more threads only spin)")
    ap.add_argument("--min-probes", type=int, default=10)
    ap.add_argument("--max-probes", type=int, default=100)
    ap.add_argument("--avg-bits", type=float, default=4.0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bits = tuple(int(b) for b in args.bits.split(","))
    methods = args.methods.split(",")

    model, pre = pretrained_llama(args.pretrain_steps)
    corpus = stdlib_corpus()
    batches = [batch_at(corpus.train, 1_000_000 + i, args.batch_size, args.seq_len, seed=0) for i in range(args.score_batches)]
    print(f"demo Llama, {args.pretrain_steps} pretraining steps {pre or ''}; scoring on {len(batches)} batches of "
          f"{args.batch_size}x{args.seq_len} tokens, bits {bits}, torch threads {torch.get_num_threads()}")

    reports, timing = {}, []
    for m in methods:
        t = time.perf_counter()
        rep = S.score(model, loss_fn, batches, method=m, bits=bits, points=args.points, rel_tol=args.rel_tol,
                      abs_tol=args.abs_tol, min_probes=args.min_probes, max_probes=args.max_probes, progress=not args.no_progress)
        wall = time.perf_counter() - t
        reports[m] = rep
        print(rep)
        rep.to_json(RESULTS_DIR / f"sensitivity_{m}.json")
        rep.plot(RESULTS_DIR / f"sensitivity_{m}.png")
        row = {"method": m, "time_s": wall, "layers": len(rep.layers),
               "work": {"measured": f"{rep.meta.get('forward_passes')} forwards",
                        "pqi": f"{rep.meta.get('gradients')} gradients ({args.points}-pt Gauss-Legendre)",
                        "hawq": f"{rep.meta.get('hvps')} HVPs"}[m]}
        timing.append(row)
        print(f"[{m}] {wall:.1f} s\n")

    summary: dict = {}
    if "hawq" in reports:
        probes = reports["hawq"].meta["hvps_per_layer"]
        conv = sum(1 for n in reports["hawq"].layers if reports["hawq"].extra[n]["probes"] < args.max_probes)
        summary["hutchinson"] = {"hvps": reports["hawq"].meta["hvps"], "per_layer": probes,
                                 "min": min(probes.values()), "max": max(probes.values()),
                                 "layers_converged": conv, "rel_tol": args.rel_tol}
        print(f"Hutchinson: {reports['hawq'].meta['hvps']} layer-local HVPs in all, {min(probes.values())} to "
              f"{max(probes.values())} per layer (stop at SEM <= max({args.rel_tol} x trace, {args.abs_tol}); {conv}/{len(probes)} layers "
              f"converged before {args.max_probes} probes)")
    agree = []
    if "measured" in reports:
        true = reports["measured"]
        for m in (x for x in methods if x != "measured"):
            for b in bits:
                t = [true.scores[n][b] for n in true.layers]
                p = [reports[m].scores[n][b] for n in true.layers]
                rel = [abs(pi - ti) / abs(ti) for pi, ti in zip(p, t) if ti != 0]
                agree.append({"method": m, "bits": b, "spearman_vs_measured": spearman(p, t),
                              "median_rel_err": statistics.median(rel) if rel else float("nan")})
        print(format_table(agree))
    plans = []
    for m, rep in reports.items():
        plan = S.select_bits(rep, avg_bits=args.avg_bits)
        plans.append({"method": m, "avg_bits": S.plan_size(rep, plan)["avg_bits"],
                      "true_loss": S.plan_loss(model, loss_fn, batches, plan),
                      "bits_used": " ".join(f"{b}:{sum(1 for v in plan.values() if v == b)}" for b in bits)})
        S.save_plan(plan, RESULTS_DIR / f"plan_{m}_avg{args.avg_bits}.json")
    if plans:
        base = next(iter(reports.values())).base_loss
        print(f"\nplans at avg {args.avg_bits} bits (base loss {base:.4f}); true loss with all planned layers quantised:")
        print(format_table(plans))
    print("\n" + format_table(timing))
    path = write_json("bench_sensitivity", {"args": vars(args), "pretrain": pre, "timing": timing, "agreement": agree,
                                            "plans": plans, **summary,
                                            "reports": {m: r.to_dict() for m, r in reports.items()}})
    print(f"wrote {path} and bench_results/sensitivity_<method>.json/.png")


if __name__ == "__main__":
    main()
