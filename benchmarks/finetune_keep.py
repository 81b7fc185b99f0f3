"""Fine-tuning a pretrained Hugging Face model under ``unit-fp8`` in keep mode, against fp32.

The most common thing people do with a pretrained model is fine-tune it. This benchmark:

1. pretrains the demo Llama for ``--pretrain-steps`` (300) on the even half of the standard
   library's files (fp32, torch AdamW at lr 5e-4, its tuned rate in ``train_optim.py``) and saves
   it with ``save_pretrained`` (reused when it exists);
2. fine-tunes that checkpoint on the odd half for ``--steps`` (150) in two arms, each at its own
   best learning rate (:func:`lowprec.sweep.lr_sweep`: 5 log-spaced rates, extended until the best
   is not at an end, then ``--seeds`` at the best):

   * ``fp32`` + torch AdamW (no conversion);
   * ``unit-fp8`` with ``init="keep"`` (the pretrained weights kept, their scale absorbed) + AdamW4bit;

3. prints the sweep and the gap of the tuned means, and writes
   ``bench_results/finetune_keep.json`` and ``finetune_keep.png`` (loss against learning rate).

    python benchmarks/finetune_keep.py                    # about 40 min on a 2-core CPU
    python benchmarks/finetune_keep.py --steps 20 --pretrain-steps 20 --seeds 0   # a smoke run
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
from lowprec import runs  # noqa: E402
from lowprec.data import stdlib_corpus  # noqa: E402
from lowprec.models import demo_llama  # noqa: E402
from lowprec.recipes import resolve  # noqa: E402
from lowprec.sweep import log_grid, lr_sweep  # noqa: E402
from lowprec.training import TrainConfig, train  # noqa: E402

PRETRAIN_LR = 5e-4  # torch AdamW's best on the demo Llama at 300 x 16 (benchmarks/train_optim.py)
ARMS = {  # arm -> (recipe, convert kwargs, optimizer)
    "fp32 + AdamW": ("fp32", None, "AdamW"),
    # norm gains at u-muP's own rate, as this fine-tune was swept (README); the recipe's 1/16 was
    # tuned for training from scratch and is not swept for fine-tuning yet
    "unit-fp8 keep + AdamW4bit": ("unit-fp8", {"init": "keep", "overrides": {"unit_scaling.norm_lr_mult": 1.0}},
                                  "AdamW4bit"),
}


def pretrained(path: Path, steps: int, batch: int, seq: int) -> Path:
    """The demo Llama pretrained on the even half of the stdlib files, saved with save_pretrained."""
    if (path / "config.json").is_file():
        print(f"reusing the pretrained model in {path}")
        return path
    torch.manual_seed(0)
    model = demo_llama(seed=0)
    opt = runs.build_optimizer(model, resolve("fp32"), name="AdamW", lr=PRETRAIN_LR)
    res = train(model, opt, stdlib_corpus(half=0), TrainConfig(steps=steps, batch_size=batch, seq_len=seq,
                                                                 warmup_steps=20, eval_every=steps),
                progress=True, desc="pretrain")
    print(f"pretrained {steps} steps: validation loss {res.final_val_loss:.4f} (even half)")
    model.save_pretrained(path)
    return path


def fine_tune(ckpt: Path, arm: str, lr: float, seed: int, cfg: TrainConfig, corpus) -> float:
    from transformers import AutoModelForCausalLM

    recipe_name, convert_kwargs, opt_name = ARMS[arm]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    recipe = resolve(recipe_name)
    if convert_kwargs is not None:
        lowprec.convert(model, recipe, **convert_kwargs)
        recipe = model.lowprec_recipe
    opt = runs.build_optimizer(model, recipe, name=opt_name, lr=lr)
    cfg = TrainConfig(**{**vars(cfg), "seed": seed})
    return train(model, opt, corpus, cfg, progress=True, desc=f"{arm} lr {lr:.3g} seed {seed}").final_val_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--center-lr", type=float, default=2.5e-4, help="middle of the 5-point grid (factor 2)")
    p.add_argument("--max-points", type=int, default=9, help="grid points a sweep may extend to (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="seeds at each arm's best rate (the first runs the sweep)")
    p.add_argument("--only", help="comma-separated arms to run")
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    out_dir = RESULTS_DIR / "finetune_keep"
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = pretrained(out_dir / f"pretrained-{args.pretrain_steps}", args.pretrain_steps, args.batch_size,
                      args.seq_len)
    corpus = stdlib_corpus(half=1)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=10,
                      eval_every=args.steps, eval_batches=8)
    log = out_dir / "points.jsonl"
    setup = {"pretrain_steps": args.pretrain_steps, "steps": args.steps, "batch_size": args.batch_size,
             "seq_len": args.seq_len}
    done = _points_done(log, setup)  # a rerun (e.g. with another --center-lr) reuses every point already run

    def on_point(arm: str, lr: float, seed: int, loss: float) -> None:
        print(f"  {arm:<28} lr {lr:.3g} seed {seed}: {loss:.4f}", flush=True)
        if (arm, _key(lr), seed) not in done:
            with log.open("a") as f:
                f.write(json.dumps({"arm": arm, "lr": lr, "seed": seed, "loss": loss, **setup}) + "\n")

    def run_point(arm: str, lr: float, seed: int) -> float:
        cached = done.get((arm, _key(lr), seed))
        return cached if cached is not None else fine_tune(ckpt, arm, lr, seed, cfg, corpus)

    arms = [a for a in ARMS if args.only is None or a in args.only.split(",")]
    results, t0 = {}, time.time()
    for arm in arms:
        results[arm] = lr_sweep(arm, lambda lr, seed, arm=arm: run_point(arm, lr, seed),
                                log_grid(args.center_lr), seeds=seeds, on_point=on_point,
                                max_points=args.max_points)
    rows = [{"arm": a, "best lr": r.best_lr, "bracketed": r.bracketed, "mean": r.mean, "spread": r.spread,
             **{f"seed {s}": v for s, v in r.seed_losses.items()}} for a, r in results.items()]
    print(format_table(rows))
    base = results.get("fp32 + AdamW")
    payload = {"config": {**vars(args), "pretrain_lr": PRETRAIN_LR}, "seconds": time.time() - t0,
               "arms": {a: r.to_dict() for a, r in results.items()}}
    if base is not None:
        for a, r in results.items():
            if r is not base:
                gap = (r.mean - base.mean) / base.mean
                payload[f"gap {a} vs fp32"] = gap
                print(f"{a} vs tuned fp32 + AdamW: {gap:+.2%} (means over seeds {list(seeds)})")
    print(f"wrote {write_json('finetune_keep', payload)}")
    _plot(results, RESULTS_DIR / "finetune_keep.png")
    return 0


def _key(lr: float) -> str:
    return f"{lr:.6g}"


def _points_done(log: Path, setup: dict) -> dict[tuple[str, str, int], float]:
    """(arm, lr, seed) -> loss of the points ``log`` holds for this setup (lines written before the
    setup was recorded are the default setup's: 300 pretraining steps, 150 x 16 x 128)."""
    default = {"pretrain_steps": 300, "steps": 150, "batch_size": 16, "seq_len": 128}
    out: dict[tuple[str, str, int], float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if all(row.get(k, default[k]) == v for k, v in setup.items()):
                out[(row["arm"], _key(row["lr"]), row["seed"])] = row["loss"]
    return out


def _plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in results.items():
        lrs = sorted(r.points)
        ax.plot(lrs, [r.points[lr] for lr in lrs], marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title("fine-tuning the pretrained demo Llama")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
