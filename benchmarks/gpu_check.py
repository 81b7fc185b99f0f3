"""The one prepared script for the day a GPU is lent (device time is scarce: it must finish in
under 8 minutes on one GPU).

    python benchmarks/gpu_check.py                 # on a CUDA machine: tests, then timings
    python benchmarks/gpu_check.py --dry-run       # anywhere: compile for the local GPU or sm_90,
    python benchmarks/gpu_check.py --dry-run --target sm_80   # print what would be timed

On a GPU it runs, in order:
1. the CUDA-capable kernel tests (the bit-exact ones run compiled on the device too);
2. the device's copy bandwidth (a large device-to-device copy: bytes read + written / time);
3. each streaming kernel at a bandwidth-bound size, as achieved bytes / s over that copy
   bandwidth (1.0 = as fast as a copy of the same bytes);
4. the fused quantized AdamW step (4-bit, 8-bit, FP8 states) against ``torch.optim.AdamW(fused=True)``;
5. the FP8 linear (forward + backward) against bf16 ``nn.Linear`` and, when installed,
   torchao's float8 linear, at 4096 and 8192 square;
and prints one table and writes JSON (``--out``, default ``gpu_check.json``).

``--dry-run`` compiles every kernel's covering set of launches for the target ahead of time
(:mod:`lowprec.kernels.aot_check`: registers, spills, vector vs scalar bytes per element) and
prints the timing plan, so the script itself is tested on machines without a GPU
(``tests/test_kernels_compile.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIZES = (4096, 8192)
KERNEL_N = 1 << 26  # elements per streaming-kernel call: 256 MB of fp32, far past L2
TIME_BUDGET_S = 420


def _optimizer_pairs() -> list[tuple[Any, Any]]:
    from lowprec.optim.adamw import AdamW4bit, AdamW8bit, AdamWFp8

    return [(c.M_FORMAT, c.V_FORMAT) for c in (AdamW4bit, AdamW8bit, AdamWFp8)]


# ----------------------------------------------------------------------------------------------
# The plan: (name, bytes moved per call, make(device) -> callable)
# ----------------------------------------------------------------------------------------------


def kernel_plan(n: int = KERNEL_N) -> list[tuple[str, float, Callable[[str], Callable[[], Any]]]]:
    """Each streaming kernel at ``n`` elements, with the bytes a perfect kernel moves."""
    from lowprec.kernels.codebook import codebook_dequantize, codebook_quantize
    from lowprec.kernels.fp8_cast import scaled_fp8_cast
    from lowprec.kernels.fp8_cast_transpose import cast_transpose

    def fp8_cast(dev):
        x = torch.randn(n, device=dev)
        s = torch.ones((), device=dev)
        return lambda: scaled_fp8_cast(x, "e4m3", s, backend="triton")

    def fp8_cast_rows(dev):
        x = torch.randn(n // 4096, 4096, device=dev, dtype=torch.bfloat16)
        return lambda: scaled_fp8_cast(x, "e4m3", None, "row", backend="triton")

    def ct(dev):
        x = torch.randn(n // 8192, 8192, device=dev, dtype=torch.bfloat16)
        s = torch.ones((), device=dev)
        return lambda: cast_transpose(x, s, "e4m3", True)

    def cq(dev):
        x = torch.randn(n, device=dev, dtype=torch.bfloat16)
        return lambda: codebook_quantize(x, "nf4", 64, backend="triton")

    def cdq(dev):
        q = codebook_quantize(torch.randn(n, device=dev, dtype=torch.bfloat16), "nf4", 64)
        return lambda: codebook_dequantize(q, torch.bfloat16, backend="triton")

    plan = [("_fp8_cast_tensor_kernel e4m3 fp32 (given scale)", n * (4 + 1), fp8_cast),
            ("_fp8_cast_rows_kernel e4m3 bf16 (row amax, two reads)", n * (2 + 1) + n * 2, fp8_cast_rows),
            ("_cast_transpose_kernel e4m3 bf16", n * (2 + 1 + 1), ct),
            ("_codebook_quant_kernel nf4 B64 bf16", n * (2 + 0.5) + n / 64 * 4, cq),
            ("_codebook_dequant_kernel nf4 B64 -> bf16", n * (0.5 + 2) + n / 64 * 4, cdq)]
    for mf, vf in _optimizer_pairs():
        per = 4 * 2 + 4 + 2 * mf.codes_per_block / mf.block_size + 2 * vf.codes_per_block / vf.block_size \
            + 16 / mf.block_size

        def step(dev, mf=mf, vf=vf):
            from lowprec.kernels.adamw_step import adamw_blocks_triton_
            from lowprec.optim import functional as F
            from lowprec.optim.state_quant import zero_state

            nb = n // mf.block_size
            p = torch.randn(nb, mf.block_size, device=dev)
            g = torch.randn_like(p)
            mc, ma = zero_state(n, mf, dev)
            vc, va = zero_state(n, vf, dev)
            hp = F.hyperparams(1e-3, 0.9, 0.999, 1e-8, 0.01, 1).to(dev)
            return lambda: adamw_blocks_triton_(p, g, mc, ma, vc, va, hp, mf, vf)

        plan.append((f"_adamw_blocks_kernel {mf.name}/{vf.name} fp32", n * per, step))
    return plan


def optimizer_plan(n: int = KERNEL_N) -> list[tuple[str, Callable[[str], Callable[[], Any]]]]:
    import lowprec

    def make(cls):
        def build(dev):
            w = torch.nn.Parameter(torch.randn(n // 4096, 4096, device=dev))
            w.grad = torch.randn_like(w)
            opt = cls([w], lr=1e-3, weight_decay=0.01)
            return opt.step
        return build

    def fused(dev):
        w = torch.nn.Parameter(torch.randn(n // 4096, 4096, device=dev))
        w.grad = torch.randn_like(w)
        return torch.optim.AdamW([w], lr=1e-3, weight_decay=0.01, fused=True).step

    return [("torch fused AdamW (fp32 states)", fused), ("lowprec AdamW4bit", make(lowprec.optim.AdamW4bit)),
            ("lowprec AdamW8bit", make(lowprec.optim.AdamW8bit)), ("lowprec AdamWFp8", make(lowprec.optim.AdamWFp8))]


def linear_plan() -> list[tuple[str, int, Callable[[str], Callable[[], Any]]]]:
    def build(kind: str, d: int):
        def make(dev):
            import lowprec

            lin = torch.nn.Linear(d, d, bias=False, device=dev, dtype=torch.bfloat16)
            if kind == "fp8 linear":
                model = lowprec.convert(torch.nn.Sequential(lin), "fp8")
            elif kind == "torchao float8 linear":
                from torchao.float8 import convert_to_float8_training

                model = convert_to_float8_training(torch.nn.Sequential(lin))
            else:
                model = torch.nn.Sequential(lin)
            x = torch.randn(d, d, device=dev, dtype=torch.bfloat16, requires_grad=True)

            def run():
                model(x).float().sum().backward()
            return run
        return make

    return [(f"{kind} {d}x{d}x{d} fwd+bwd", d, build(kind, d))
            for d in SIZES for kind in ("bf16 linear", "fp8 linear", "torchao float8 linear")]


# ----------------------------------------------------------------------------------------------
# Timing on a GPU
# ----------------------------------------------------------------------------------------------


def time_cuda(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> float:
    """Median seconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(dev: str) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = time_cuda(lambda: y.copy_(x))
    return 2 * x.numel() / t


def run_tests() -> dict:
    tests = ["tests/test_fp8_kernels.py", "tests/test_kernels_formats.py", "tests/test_optim_kernels.py",
             "tests/test_kernels_compile.py"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests, "-k", "not dry_run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"returncode": proc.returncode, "summary": tail, "seconds": round(time.perf_counter() - t0, 1)}


def run_gpu(out: Path) -> int:
    dev = "cuda"
    t_start = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
    result["tests"] = run_tests()
    bw = copy_bandwidth(dev)
    result["copy_bandwidth_GBps"] = bw / 1e9
    rows = [("copy bandwidth", f"{bw / 1e9:.0f} GB/s", "", "")]
    result["kernels"] = []
    for name, nbytes, make in kernel_plan():
        if time.perf_counter() - t_start > TIME_BUDGET_S:
            break
        try:
            t = time_cuda(make(dev))
            frac = nbytes / t / bw
            result["kernels"].append({"name": name, "seconds": t, "bytes": nbytes, "fraction_of_copy": frac})
            rows.append((name, f"{t * 1e3:.3f} ms", f"{nbytes / t / 1e9:.0f} GB/s", f"{frac:.2f} of copy"))
        except Exception as exc:  # noqa: BLE001 - report and go on: device time is scarce
            rows.append((name, "failed", type(exc).__name__, str(exc)[:60]))
    result["optimizer"] = []
    base = None
    for name, make in optimizer_plan():
        try:
            t = time_cuda(make(dev))
            base = base or t
            result["optimizer"].append({"name": name, "seconds": t, "vs_torch_fused": t / base})
            rows.append((name, f"{t * 1e3:.3f} ms", f"{t / base:.2f}x torch fused", ""))
        except Exception as exc:  # noqa: BLE001
            rows.append((name, "failed", type(exc).__name__, str(exc)[:60]))
    result["linear"] = []
    for name, d, make in linear_plan():
        if time.perf_counter() - t_start > TIME_BUDGET_S + 40:
            break
        try:
            t = time_cuda(make(dev))
            tflops = 3 * 2 * d**3 / t / 1e12
            result["linear"].append({"name": name, "seconds": t, "tflops": tflops})
            rows.append((name, f"{t * 1e3:.3f} ms", f"{tflops:.0f} TFLOP/s", ""))
        except Exception as exc:  # noqa: BLE001 - torchao may be missing
            rows.append((name, "skipped", type(exc).__name__, str(exc)[:60]))
    _print_table(("what", "time", "rate", "relative"), rows)
    result["seconds"] = time.perf_counter() - t_start
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0 if result["tests"]["returncode"] == 0 else 1


# ----------------------------------------------------------------------------------------------
# Dry run: compile for a target, print the plan
# ----------------------------------------------------------------------------------------------


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def static_rows(target: str) -> list[dict]:
    """Per kernel launch (covering set) compiled for ``target``: regs, spills, and the static
    bytes per element moved by vector and by scalar global instructions."""
    from lowprec.kernels import aot_cases, aot_check

    launches = aot_cases.covering_subset(aot_cases.all_launches(_optimizer_pairs()))
    reports = aot_check.compile_many([(launch, target) for launch in launches])
    rows = []
    for launch, rep in zip(launches, reports):
        row = {"kernel": launch.kernel, "config": launch.note, "target": target, "ok": rep.ok, "regs": rep.regs,
               "spills": rep.spills, "warps": rep.num_warps, "error": rep.error,
               "ld": f"{rep.loads.vector}v/{rep.loads.scalar}s", "st": f"{rep.stores.vector}v/{rep.stores.scalar}s"}
        if rep.ok and launch.kernel in aot_cases.STREAMING:
            elems = aot_cases.STREAMING[launch.kernel][2](rep.constexprs)
            vec, sca = aot_check.static_bytes_per_element(rep, elems)
            row.update(vector_B_per_elem=round(vec, 2), scalar_B_per_elem=round(sca, 2))
        rows.append(row)
    return rows


def dry_run(target: str, out: Path | None) -> int:
    from lowprec.kernels import aot_check

    if not aot_check.available():
        print("ptxas / cuobjdump not found: cannot compile ahead of time")
        return 1
    t0 = time.perf_counter()
    rows = static_rows(target)
    print(f"compiled {len(rows)} launches for {target} in {time.perf_counter() - t0:.1f} s")
    _print_table(("kernel", "config", "ok", "regs", "spills", "ld", "st", "vec B/el", "scalar B/el"),
                 [(r["kernel"], r["config"][:48], r["ok"], r["regs"], r["spills"], r["ld"], r["st"],
                   r.get("vector_B_per_elem", ""), r.get("scalar_B_per_elem", "")) for r in rows])
    print("\nwould time (on the GPU):")
    print("  tests: tests/test_fp8_kernels.py tests/test_kernels_formats.py tests/test_optim_kernels.py "
          "tests/test_kernels_compile.py")
    print("  copy bandwidth: 256 MiB device-to-device copy")
    for name, nbytes, _ in kernel_plan():
        print(f"  {name}: {nbytes / KERNEL_N:.2f} B/element ideal, as a fraction of copy bandwidth")
    for name, _ in optimizer_plan():
        print(f"  {name}: one step on {KERNEL_N} parameters, vs torch fused AdamW")
    for name, _, _ in linear_plan():
        print(f"  {name}")
    if out:
        out.write_text(json.dumps({"target": target, "static": rows}, indent=1))
    failed = [r for r in rows if not r["ok"] and "not supported in this architecture" not in r["error"]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="compile ahead of time and print the plan; no GPU needed")
    ap.add_argument("--target", default=None, help="sm_80, sm_89, sm_90 or sm_100 (default: the local GPU, else sm_90)")
    ap.add_argument("--out", default=None, help="JSON output (default gpu_check.json on a GPU, none for --dry-run)")
    args = ap.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        target = args.target
        if target is None:
            target = "sm_90"
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                target = f"sm_{major}{minor}"
        if not args.dry_run:
            print("no CUDA device: running --dry-run")
        return dry_run(target, Path(args.out) if args.out else None)
    return run_gpu(Path(args.out or "gpu_check.json"))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    raise SystemExit(main())
