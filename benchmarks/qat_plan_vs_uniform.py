"""QAT with a sensitivity plan vs uniform bits, at the same average bit width.

Default (``--model llama``): the demo Llama on the stdlib text corpus, where quantization error,
not overfitting, moves the validation loss (3.4 MB of training text, a few hundred thousand tokens
seen). The protocol:

* the last ``--calib-bytes`` (200 kB) of the training text are held out as a *calibration* split:
  never trained on (neither pretraining nor QAT), disjoint from the validation files;
* pretrain the fp32 model ``--pretrain-steps`` (1000) AdamW steps at batch 16 x 128 on the rest
  (lr 3e-3, wd 0.1, cosine; cached under bench_results/);
* score the 28 decoder linears (q/k/v/o, gate/up/down; embedding and lm_head stay fp32, as the
  recipes exclude them; ``--include-head`` adds lm_head) with PQI (2-point Gauss-Legendre) at
  INT2/3/4 on ``--calib-batches`` x 8 x 128 calibration tokens, MSE-clipped per-channel scale
  (``--scale``, the same rule for scoring and every QAT arm);
* the PQI plan is ``select_bits(..., avg_bits=3.0, exact=True)``: the parameter-weighted average
  is exactly 3.0 (attention projections have 65,536 weights, MLP projections 176,128, so the
  budget is met exactly by equal-size swaps);
* from the same pretrained weights, each arm runs ``--qat-steps`` (150) AdamW steps at batch 8,
  lr 1e-3 (10 warm-up, cosine), with the same data order for every arm of a seed (``--seeds``
  0,1,2 vary that order: paired runs). Arms: ``pqi``; ``uniform3``; ``shuffled`` (the PQI plan's
  widths permuted at random among same-size layers, a new permutation per seed: same bits, same
  width histogram, placement without sensitivity); ``anti`` (the plan that *maximises* the PQI
  score at exactly 3.0 bits); ``uniform2`` and ``uniform4`` reference points; ``fp32`` (the same
  continued training with no fake-quant, the floor);
* validation loss (nats per byte) on 16 x 16 x 128 fixed validation tokens, before QAT (PTQ,
  the plan's rounding applied to the pretrained weights) and after QAT. Writes
  ``bench_results/qat_plan_vs_uniform_llama<tag>.json``.

What was found (one CPU thread; loaded 2-core machine; ~70 s per QAT run, ~35 min in all):

    .venv/bin/python benchmarks/qat_plan_vs_uniform.py --pretrain-steps 1000 --calib-batches 8 --tag _p1000
    (= the defaults; fp32 pretrained val loss 1.4249; PQI plan 7 x INT2, 14 x INT3, 7 x INT4, 3.000 bits)

    seed   pqi     uniform3  shuffled  anti    uniform2  uniform4  fp32    pqi-uniform3
    0      1.4249  1.4267    1.4294    1.4339  1.4343    1.4243    1.4241  -0.0019
    1      1.4283  1.4309    1.4330    1.4356  1.4410    1.4275    1.4275  -0.0025
    2      1.4238  1.4264    1.4259    1.4355  1.4352    1.4236    1.4228  -0.0026
    mean   1.4257  1.4280    1.4295    1.4350  1.4368    1.4251    1.4248  -0.0023
    PTQ    1.4543  1.4426    1.5007    1.5396  1.5836    1.4284    1.4249
    bits   3.000   3.000     3.000     3.000   2.000     4.000     32

The PQI plan ends QAT below uniform INT3 in 3/3 pairs (mean -0.0023, pairs -0.0019/-0.0025/
-0.0026: the paired spread, 0.0004, is far below the difference), below the shuffled plan in 3/3
(mean -0.0038) and the anti-PQI plan in 3/3 (-0.0093). So at the same 3.0 bits the win comes from
*where* the bits go: the same widths placed at random lose to uniform INT3 in 2 of 3 pairs, and
placed against the scores lose to it by 0.005 to 0.009. The plan recovers about 70% of uniform INT3's
gap to the fp32 floor (0.0032 -> 0.0009) and ends within 0.0006 of uniform INT4 (4.0 bits).
The effect is small in absolute terms (0.16% of the loss), but consistent.

Caveats. The PQI plan does *not* win before QAT: its PTQ loss (1.4543) is above uniform INT3's
(1.4426). Summed single-layer scores predicted the opposite (plan +0.019, uniform INT3 +0.039,
on the calibration split) and overstate joint rounding in general (uniform INT2: +0.374 predicted,
+0.159 measured before QAT), so PQI ranks plans by what QAT can recover rather than by their PTQ
loss; the plan's advantage appears only once QAT lets its INT2 layers adapt. One plan, from
one pretrained model and one calibration set, was tested; the seeds vary the QAT data order only.

A first run with a less trained model (``--pretrain-steps 300 --calib-batches 4``, fp32 val 2.0357,
JSON ``_p300``) was not decisive: PQI 1.9402 vs uniform INT3 1.9416 (mean -0.0014, lower in 2/3
pairs, pairs -0.0026/+0.0006/-0.0021), shuffled 1.9464, anti 1.9472, uniform INT2 1.9433, INT4
1.9413. There, 150 more steps of training dominated (every arm fell ~0.1 from 2.036) and INT2 vs
INT4 after QAT differed by only 0.002, so no placement of bits could matter much; its PTQ PQI plan
(2.0613) was also worse than uniform INT3 (2.0398), with several near-zero or negative held-out
INT2/INT3 scores (4096 calibration tokens) that the integer program exploited. The defaults
(1000 pretraining steps, 8192 calibration tokens) were fixed before the second run's outcome.

``--model digits``: the earlier comparison on sklearn's digits MLP (pretrain in fp32, score on a
held-out split ``--calib N``, plan at ``--avg-bits``, ``--repeats`` paired QAT runs). Not a
fair test of bit placement: on 1.4k examples validation loss is governed by overfitting. The plan
won there (22 of 25 pairs on the 64-256-256-256-10 MLP) but at or *below* the budget (about 2.1 to
2.7 bits, since the select_bits call there allows undershooting), and uniform INT2 did as well
(0.1352 vs plan 0.1342 vs INT3 0.1451) or better (``--pretrain-steps 400 --qat-lr 1e-4``: INT2
0.1187, plan 0.1446, INT3 0.1498): fewer bits regularise that model.

    .venv/bin/python benchmarks/qat_plan_vs_uniform.py --model digits
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, write_json  # noqa: E402

import lowprec.sensitivity as S  # noqa: E402
from lowprec.models import mlp  # noqa: E402
from lowprec.qat import apply_plan, scale_method  # noqa: E402


def digits(seed: int, calib: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if calib <= 0:
        tr, ca, va = perm[:1400], perm[:1400], perm[1400:]
    else:  # a held-out calibration split for scoring, disjoint from train and validation
        tr, ca, va = perm[:1400 - calib], perm[1400 - calib:1400], perm[1400:]
    return (X[tr], y[tr]), (X[ca], y[ca]), (X[va], y[va])


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    out = ce(model, val).item()
    model.train()
    return out


def fit(model, train, val, steps: int, lr: float, batch: int, seed: int, eval_every: int) -> list[tuple[int, float]]:
    """Adam on minibatches whose order depends only on ``seed`` (identical across runs)."""
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    X, y = train
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = ce(model, (X[idx], y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, val_loss(model, val)))
    return curve


LLAMA_ARMS = ("pqi", "uniform3", "shuffled", "anti", "uniform2", "uniform4", "fp32")


def decoder_linears(model: nn.Module, include_head: bool) -> list[str]:
    """The Llama's quantized layers: every decoder nn.Linear (q/k/v/o, gate/up/down), plus
    ``lm_head`` when ``include_head``. The embedding is never quantized (as the recipes exclude it)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_head or n != "lm_head")]


def shuffled_plan(plan: dict[str, int], n_params: dict[str, int], seed: int) -> dict[str, int]:
    """The plan's bit widths permuted at random among layers of the same size: the same average
    bits and the same multiset of widths per layer shape, placed without regard to sensitivity."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(plan)
    for size in sorted(set(n_params.values())):
        names = [n for n in plan if n_params[n] == size]
        perm = torch.randperm(len(names), generator=gen).tolist()
        for n, j in zip(names, perm):
            out[n] = plan[names[j]]
    return out


def negated(report: S.SensitivityReport) -> S.SensitivityReport:
    return S.SensitivityReport(report.method, report.bits, {n: {b: -v for b, v in d.items()} for n, d in report.scores.items()},
                               report.n_params, report.rows, report.base_loss)


def llama_pretrained(corpus, steps: int, batch: int, seed: int, tag: str) -> tuple[nn.Module, dict]:
    """The demo Llama after ``steps`` AdamW steps (lr 3e-3, wd 0.1, batch ``batch`` x 128) on the
    QAT training split only (the calibration split is never trained on). Cached state dict."""
    from common import RESULTS_DIR

    from lowprec.models import demo_llama
    from lowprec.training import TrainConfig, train

    model = demo_llama(seed=seed)
    path = RESULTS_DIR / f"qat_llama_pretrained_{steps}x{batch}_seed{seed}_{tag}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, {"cached": str(path)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    t = time.perf_counter()
    res = train(model, opt, corpus, TrainConfig(steps=steps, batch_size=batch, seq_len=128, seed=seed,
                                                eval_every=max(steps // 3, 1)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, {"val_loss": res.val_loss, "time_s": time.perf_counter() - t, "saved": str(path)}


def llama_main(args) -> None:
    """Paired QAT seeds on the demo Llama: PQI plan at exactly ``--avg-bits`` vs uniform and controls."""
    from bench_sensitivity import loss_fn

    from lowprec.data import TextCorpus, batch_at, eval_batches, stdlib_corpus
    from lowprec.training import TrainConfig, evaluate, train

    torch.set_num_threads(args.threads)
    bits = tuple(int(b) for b in args.bits.split(","))
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = args.arms.split(",")
    bad = [a for a in arms if a not in LLAMA_ARMS and not (a.startswith("uniform") and a[7:].isdigit())]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; choose from {LLAMA_ARMS} (or uniformK)")
    full = stdlib_corpus()
    # Calibration split: the last --calib-bytes of the training text, held out from pretraining
    # and QAT alike (and disjoint from the validation files).
    qat_corpus = TextCorpus(full.train[:-args.calib_bytes], full.val, full.source + " (train minus calibration tail)")
    calib_tokens = full.train[-args.calib_bytes:]
    val = eval_batches(full.val, args.val_batches, 16, 128)
    t0 = time.perf_counter()
    base, pre = llama_pretrained(qat_corpus, args.pretrain_steps, 16, 0, f"calib{args.calib_bytes}")
    fp32_val = evaluate(base, val)
    print(f"demo Llama pretrained {args.pretrain_steps}x16 on {qat_corpus.train.numel():,} training bytes "
          f"({time.perf_counter() - t0:.0f} s): fp32 val loss {fp32_val:.4f} on {args.val_batches}x16x128 validation tokens")

    layers = decoder_linears(base, args.include_head)
    calib = [batch_at(calib_tokens, i, args.calib_batch, 128, seed=12345) for i in range(args.calib_batches)]
    t = time.perf_counter()
    with scale_method(args.scale):
        report = S.score(base, loss_fn, calib, method="pqi", bits=bits, layers=layers, points=2, progress=False)
    score_s = time.perf_counter() - t
    print(report)
    print(f"PQI on {args.calib_batches}x{args.calib_batch}x128 held-out calibration tokens, {args.scale} scale: {score_s:.0f} s")

    plan = S.select_bits(report, avg_bits=args.avg_bits, bits=bits, exact=True)
    anti = S.select_bits(negated(report), avg_bits=args.avg_bits, bits=bits, exact=True)

    def plan_for(arm: str, seed: int) -> dict[str, int]:
        if arm == "pqi":
            return plan
        if arm == "anti":
            return anti
        if arm == "shuffled":
            return shuffled_plan(plan, report.n_params, 1000 + seed)
        if arm == "fp32":  # no fake-quant: the same continued training, the floor every arm is measured against
            return {}
        return {n: int(arm[7:]) for n in layers}

    def describe(p: dict[str, int]) -> str:
        return " ".join(f"int{b}:{sum(1 for v in p.values() if v == b)}" for b in bits)

    for name, p in (("PQI", plan), ("anti-PQI", anti)):
        size = S.plan_size(report, p)
        print(f"{name} plan: avg {size['avg_bits']:.4f} bits, predicted loss increase {size['score']:.4f}, {describe(p)}")
        print("   " + " ".join(f"{n.replace('model.layers.', 'L').replace('.self_attn', '').replace('.mlp', '')}:{b}"
                             for n, b in p.items()))

    runs: dict[str, dict] = {}
    ptq_cache: dict[tuple, float] = {}
    out_path = None
    for seed in seeds:
        for arm in arms:
            p = plan_for(arm, seed)
            model = copy.deepcopy(base)
            apply_plan(model, p, method=args.scale)
            key = tuple(sorted(p.items()))
            if key not in ptq_cache:
                ptq_cache[key] = evaluate(model, val)
            opt = torch.optim.AdamW(model.parameters(), lr=args.qat_lr, weight_decay=0.0, betas=(0.9, 0.95))
            t = time.perf_counter()
            res = train(model, opt, qat_corpus, TrainConfig(steps=args.qat_steps, batch_size=args.batch, seq_len=128,
                                                            seed=100 + seed, warmup_steps=10, eval_every=args.qat_steps))
            after = evaluate(model, val)
            size = S.plan_size(report, p) if p else {"avg_bits": 32.0, "score": 0.0}
            runs.setdefault(arm, {})[str(seed)] = {
                "plan": p, "avg_bits": size["avg_bits"], "predicted_increase": size["score"],
                "val_loss_before_qat": ptq_cache[key], "val_loss_after_qat": after,
                "train_loss_last10": statistics.mean(res.train_loss[-10:]), "time_s": time.perf_counter() - t}
            print(f"seed {seed} {arm:>9}: avg {size['avg_bits']:.4f} bits  val {ptq_cache[key]:.4f} (PTQ) -> "
                  f"{after:.4f} after {args.qat_steps} QAT steps  ({time.perf_counter() - t:.0f} s)", flush=True)
            out_path = write_json("qat_plan_vs_uniform_llama" + args.tag, {
                "args": vars(args), "fp32_val_loss": fp32_val, "pretrain": pre, "layers": layers,
                "report": report.to_dict(), "score_time_s": score_s, "pqi_plan": plan, "anti_plan": anti,
                "runs": runs, "complete": False})

    done = [s for s in seeds if all(str(s) in runs.get(a, {}) for a in arms)]
    rows = []
    for s in done:
        row = {"seed": s}
        for a in arms:
            row[a] = runs[a][str(s)]["val_loss_after_qat"]
        if "pqi" in arms and "uniform3" in arms:
            row["pqi-uniform3"] = row["pqi"] - row["uniform3"]
        rows.append(row)
    mean = {"seed": "mean"}
    for k in rows[0]:
        if k != "seed":
            mean[k] = statistics.mean(r[k] for r in rows)
    sd = {"seed": "std"}
    for k in rows[0]:
        if k != "seed" and len(rows) > 1:
            sd[k] = statistics.stdev(r[k] for r in rows)
    ptq = {"seed": "PTQ (before QAT)"}
    bits_row = {"seed": "avg bits"}
    for a in arms:
        ptq[a] = statistics.mean(runs[a][str(s)]["val_loss_before_qat"] for s in done)
        bits_row[a] = runs[a][str(done[0])]["avg_bits"]
    print(f"\nvalidation loss after {args.qat_steps} QAT steps (batch {args.batch}, lr {args.qat_lr}) per paired seed; "
          f"fp32 model {fp32_val:.4f}")
    table = [{k: (f"{v:+.4f}" if k == "pqi-uniform3" else f"{v:.4f}") if isinstance(v, float) else v for k, v in r.items()}
             for r in (*rows, mean, sd, ptq, bits_row)]
    print(format_table(table))
    summary = {}
    if "pqi" in arms:
        for other in arms:
            if other == "pqi":
                continue
            diffs = [runs["pqi"][str(s)]["val_loss_after_qat"] - runs[other][str(s)]["val_loss_after_qat"] for s in done]
            summary[f"pqi_minus_{other}"] = {"each": diffs, "mean": statistics.mean(diffs),
                                             "pqi_lower_in": sum(d < 0 for d in diffs), "pairs": len(diffs)}
            print(f"PQI plan minus {other:>9}: mean {statistics.mean(diffs):+.4f}, PQI lower in "
                  f"{sum(d < 0 for d in diffs)}/{len(diffs)} pairs  ({' '.join(f'{d:+.4f}' for d in diffs)})")
    out_path = write_json("qat_plan_vs_uniform_llama" + args.tag, {
        "args": vars(args), "fp32_val_loss": fp32_val, "pretrain": pre, "layers": layers,
        "report": report.to_dict(), "score_time_s": score_s, "pqi_plan": plan, "anti_plan": anti,
        "runs": runs, "summary": summary, "complete": len(done) == len(seeds)})
    print(f"wrote {out_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "llama"), default="llama")
    ap.add_argument("--seeds", default="0,1,2", help="llama: paired QAT data-order seeds (every arm runs each)")
    ap.add_argument("--arms", default=",".join(LLAMA_ARMS),
                    help="llama: pqi (PQI plan at exactly --avg-bits), uniformK, shuffled (the PQI plan's widths "
                         "permuted among same-size layers), anti (the plan that maximises the PQI score at the budget), "
                         "fp32 (the same continued training without fake-quant)")
    ap.add_argument("--calib-bytes", type=int, default=200_000,
                    help="llama: the tail of the training text held out (never trained on) for PQI scoring")
    ap.add_argument("--calib-batches", type=int, default=8, help="llama: PQI calibration batches of --calib-batch x 128")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--val-batches", type=int, default=16, help="llama: validation batches of 16x128 tokens")
    ap.add_argument("--include-head", action="store_true", help="llama: quantize lm_head too (default: decoder linears only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="64,256,256,256,10",
                    help="digits MLP widths: two equal, wide hidden layers and small first/last layers")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="digits (default 100): 100 leaves the fp32 MLP short of memorising its training split (at 400 "
                         "it has, and QAT raises every arm's validation loss); llama (default 1000): AdamW steps at batch "
                         "16 on the training text minus the calibration tail (cached under bench_results/)")
    ap.add_argument("--qat-steps", type=int, default=None, help="default: digits 300, llama 150")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=None, help="default: digits 128, llama 8 (sequences of 128 bytes)")
    ap.add_argument("--avg-bits", type=float, default=3.0)
    ap.add_argument("--uniform-bits", type=int, default=3)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--tag", default="", help="suffix for the JSON file name (runs side by side)")
    ap.add_argument("--scale", choices=("absmax", "mse"), default="mse",
                    help="per-channel INT-k scale for scoring and QAT, the same for every arm: absmax, or the "
                         "MSE-optimal clipped scale (lowprec.qat.mse_row_scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--calib", type=int, default=200,
                    help="digits: score on this many held-out training examples (not trained on) instead of the "
                         "training split; the fp32 model memorises its training split, so its train-loss sensitivities "
                         "say little about validation loss")
    ap.add_argument("--repeats", type=int, default=5, help="digits: QAT runs per plan (minibatch seeds), paired")
    args = ap.parse_args()
    for key, digits_default, llama_default in (("pretrain_steps", 100, 1000), ("qat_steps", 300, 150), ("batch", 128, 8)):
        if getattr(args, key) is None:
            setattr(args, key, llama_default if args.model == "llama" else digits_default)
    if args.model == "llama":
        return llama_main(args)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    bits = tuple(int(b) for b in args.bits.split(","))

    train, calib, val = digits(args.seed, args.calib)
    base = mlp(tuple(sizes), args.seed)
    t0 = time.perf_counter()
    fit(base, train, val, args.pretrain_steps, args.lr, args.batch, args.seed, args.pretrain_steps)
    print(f"pretrained fp32 MLP {sizes}: val loss {val_loss(base, val):.4f} ({time.perf_counter() - t0:.1f} s)")

    with scale_method(args.scale):
        reports = {m: S.score(base, ce, [calib], method=m, bits=bits, progress=False) for m in ("pqi", "measured", "hawq")}
    print(reports["pqi"])
    plans = {m: S.select_bits(r, avg_bits=args.avg_bits) for m, r in reports.items()}
    uniform = {n: args.uniform_bits for n in reports["pqi"].layers}
    for m, p in plans.items():
        print(f"{m:>8} plan at avg {args.avg_bits} bits: {p}  (avg {S.plan_size(reports['pqi'], p)['avg_bits']:.3f})")

    runs = {"pqi_plan": plans["pqi"], "uniform": uniform}
    if plans["hawq"] != plans["pqi"]:
        runs["hawq_plan"] = plans["hawq"]
    results, rows = {}, []
    for label, plan in runs.items():
        finals, befores, curves, t = [], [], [], time.perf_counter()
        for r in range(args.repeats):  # QAT minibatch order seed+1+r: the same for every plan
            model = copy.deepcopy(base)
            apply_plan(model, plan, method=args.scale)
            befores.append(val_loss(model, val))
            curve = fit(model, train, val, args.qat_steps, args.qat_lr, args.batch, args.seed + 1 + r, args.eval_every)
            finals.append(curve[-1][1])
            curves.append(curve)
        mean = statistics.mean(finals)
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        results[label] = {"plan": plan, "avg_bits": S.plan_size(reports["pqi"], plan)["avg_bits"],
                          "val_loss_before_qat": befores[0], "val_loss_after_qat": mean, "val_loss_after_qat_std": sd,
                          "val_loss_after_qat_each": finals, "curves": curves, "time_s": time.perf_counter() - t}
        rows.append({"run": label, "avg_bits": results[label]["avg_bits"], "val_before_qat": befores[0],
                     "val_after_qat_mean": mean, "std": sd, "each": " ".join(f"{f:.4f}" for f in finals),
                     "plan": " ".join(f"{n}:{b}" for n, b in plan.items())})
    print(format_table(rows))
    win = results["pqi_plan"]["val_loss_after_qat"] < results["uniform"]["val_loss_after_qat"]
    wins = sum(a < b for a, b in zip(results["pqi_plan"]["val_loss_after_qat_each"], results["uniform"]["val_loss_after_qat_each"]))
    print(f"PQI plan {'beats' if win else 'does NOT beat'} uniform int{args.uniform_bits} after {args.qat_steps} QAT steps "
          f"(mean of {args.repeats} QAT seeds): {results['pqi_plan']['val_loss_after_qat']:.4f} vs "
          f"{results['uniform']['val_loss_after_qat']:.4f} (plan avg {results['pqi_plan']['avg_bits']:.3f} bits vs "
          f"{results['uniform']['avg_bits']:.3f}); lower in {wins}/{args.repeats} paired runs")
    path = write_json("qat_plan_vs_uniform" + args.tag, {"args": vars(args), "fp32_val_loss": val_loss(base, val),
                                              "reports": {m: r.to_dict() for m, r in reports.items()},
                                              "runs": results, "pqi_plan_wins": win})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
