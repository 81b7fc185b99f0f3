"""Step time of the demo Llama under each FP8 recipe against fp32 and against torchao's
``convert_to_float8_training`` (tensorwise, dynamic), side by side in one process.

Every contender gets the same model, batch and torch AdamW; steps are interleaved round-robin
(one step of each contender per round), so machine noise hits all of them alike; the medians
and the ratio to fp32 are printed and written to ``bench_results/bench_fp8.json``. The goal on a
CPU is at most 1.5x the fp32 step; the CPU has no FP8 units, so FP8 here is casting overhead on
top of float32 GEMMs. The recipes' ``cast.gemm = "auto"`` runs the emulated GEMM on a CPU (one
fused cast-and-widen pass per operand, the output scale applied inside the float32 GEMM);
``fp8:scaled_mm`` shows ``torch._scaled_mm``, which on the CPU widens its operands itself.

    .venv/bin/python benchmarks/bench_fp8.py                       # batch 16 x 128, 5 rounds
    .venv/bin/python benchmarks/bench_fp8.py --batch-size 4 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, write_json  # noqa: E402

import lowprec  # noqa: E402
from lowprec.models import demo_llama  # noqa: E402
from lowprec.recipes import Recipe  # noqa: E402
from lowprec.training import lm_loss  # noqa: E402


def _with_gemm(recipe: Recipe, gemm: str) -> Recipe:
    cast = recipe.cast.__class__(**{**recipe.cast.__dict__, "gemm": gemm})
    return recipe.replace(name=f"{recipe.name} ({gemm})", cast=cast)


def contenders(names: list[str]) -> dict[str, callable]:
    """name -> a function building (model, optimizer) for that contender."""
    out = {}

    def build(recipe=None, torchao=False):
        def make():
            model = demo_llama(seed=0)
            if recipe is not None:
                lowprec.convert(model, recipe)
            if torchao:
                from torchao.float8 import convert_to_float8_training

                # the same layers lowprec converts: every linear but the LM head
                convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "lm_head")
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
        return make

    for n in names:
        if n == "fp32":
            out[n] = build()
        elif n == "torchao":
            out["torchao tensorwise"] = build(torchao=True)
        elif ":" in n:  # recipe:gemm, e.g. fp8:scaled_mm (the recipes' "auto" is emulated on a CPU)
            recipe_name, gemm = n.split(":", 1)
            out[n] = build(_with_gemm(Recipe.from_name(recipe_name), gemm))
        else:
            out[n] = build(Recipe.from_name(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine extra threads oversubscribe the cores)")
    ap.add_argument("--contenders", default="fp32,fp8,fp8:scaled_mm,fp8-delayed,fp8-rowwise,unit-fp8,torchao")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g)
    y = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=g)
    runs = {}
    for name, make in contenders(args.contenders.split(",")).items():
        model, opt = make()
        runs[name] = (model, opt)

    def step(model, opt) -> float:
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for model, opt in runs.values():  # warm-up: first-call costs (allocator, torchao setup)
        step(model, opt)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            times[name].append(step(model, opt))
    base = statistics.median(times["fp32"]) if "fp32" in times else float("nan")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(contender=name, median_step_s=med, min_step_s=min(ts), ratio_vs_fp32=med / base,
                         within_1_5x=("yes" if med / base <= 1.5 else "no") if name != "fp32" else ""))
    print(f"demo Llama step (forward + backward + AdamW), batch {args.batch_size} x {args.seq_len}, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads, device cpu")
    print(format_table(rows))
    path = write_json("bench_fp8", dict(config=vars(args), table=rows, times=times))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
