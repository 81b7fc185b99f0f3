"""Quantize / dequantize throughput of every lowprec format beside torch's eager casts, torchao's
primitives and bitsandbytes' block-wise quantizers, in one process.

    .venv/bin/python benchmarks/bench_formats.py            # about a minute on a 2-core CPU
    .venv/bin/python benchmarks/bench_formats.py --rows 4096 --cols 4096 --repeat 10

Every contender quantizes the same float32 tensor at the same granularity; the table gives the
median time, the throughput in input elements per second, the time relative to the first row of
its group (the baseline named in ``vs``), and the round-trip error ``rel_rmse = rms(x - x') /
rms(x)`` so equal work is visible. On a CUDA machine the Triton kernels are timed as well
(``lowprec.kernels[triton]``); on a CPU the kernels' dispatch runs their PyTorch reference.
Writes ``bench_results/formats.json``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine, time_fn, write_json  # noqa: E402

from lowprec import formats as F  # noqa: E402
from lowprec.kernels.codebook import codebook_dequantize, codebook_quantize  # noqa: E402
from lowprec.kernels.fp8_cast import scaled_fp8_cast  # noqa: E402

warnings.filterwarnings("ignore")

Contender = tuple[str, Callable[[], object], Callable[[object], torch.Tensor]]  # name, quantize, dequantize


def _rel_rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).pow(2).mean().sqrt() / x.float().pow(2).mean().sqrt())


def _torchao():
    try:
        import torchao  # noqa: F401
    except Exception:
        return None
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig
    from torchao.optim import quant_utils
    from torchao.optim.subclass_4bit import get_qmap_signed as qmap4_signed
    from torchao.optim.subclass_4bit import get_qmap_unsigned as qmap4_unsigned
    from torchao.optim.subclass_8bit import get_qmap_signed as qmap8_signed
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return dict(fp8=hp_tensor_to_float8_dynamic, mm=LinearMMConfig, gran=ScalingGranularity, qu=quant_utils,
                qmap4_signed=qmap4_signed, qmap4_unsigned=qmap4_unsigned, qmap8_signed=qmap8_signed,
                mapping=MappingType, choose=choose_qparams_affine, quant=quantize_affine, dequant=dequantize_affine,
                to_nf4=to_nf4)


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return None
    return bnbf


def contenders(x: torch.Tensor, ao, bnbf, gpu: bool) -> dict[str, list[Contender]]:
    """Per format group, a list of contenders; the first is the baseline of the group."""
    rows, cols = x.shape
    out: dict[str, list[Contender]] = {}

    def lp(fmt, gran, block=None):
        return ("lowprec.formats", lambda: F.quantize(x, fmt, None, gran, block), lambda q: q.dequantize())

    for fmt, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        for gran in ("tensor", "row"):
            if gran == "tensor":
                base = ("torch .to(fp8), no scale", lambda dt=dt: x.to(dt), lambda q: q.float())
            else:
                fmax = F.get_format(fmt).max

                def eager(dt=dt, fmax=fmax):
                    s = fmax / x.abs().amax(-1, keepdim=True)
                    return (x * s).clamp(-fmax, fmax).to(dt), s

                base = ("torch amax+scale+cast (eager)", eager, lambda r: r[0].float() / r[1])
            group = [base,
                     lp(fmt, gran)]
            group.append(("lowprec.kernels[torch]", lambda f=fmt, g=gran: scaled_fp8_cast(x, f, None, g, backend="torch"),
                          lambda r: r.data.float() / r.scale))
            if gpu:
                group.append(("lowprec.kernels[triton]",
                              lambda f=fmt, g=gran: scaled_fp8_cast(x, f, None, g, backend="triton"),
                              lambda r: r.data.float() / r.scale))
            if ao is not None:
                kw = {} if gran == "tensor" else dict(scaling_granularity=ao["gran"].AXISWISE, axiswise_dim=-1)
                group.append(("torchao hp_tensor_to_float8_dynamic",
                              lambda dt=dt, kw=kw: ao["fp8"](x, dt, ao["mm"](), **kw),
                              lambda t: t.to_original_precision()))
            out[f"{fmt} {gran}"] = group

    for fmt, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out[f"{fmt} cast"] = [
            (f"torch .to({fmt})", lambda dt=dt: x.to(dt), lambda q: q.float()),
            ("lowprec.formats (scale 1, saturating)", lambda fmt=fmt: F.quantize(x, fmt, 1.0),
             lambda q: q.dequantize()),
        ]

    for bits in (8, 4):
        name = f"int{bits}"
        group = [lp(name, "row")]
        if ao is not None:
            qmax = 2 ** (bits - 1) - 1

            def ao_q(qmax=qmax):
                s, z = ao["choose"](x, ao["mapping"].SYMMETRIC, (1, cols), torch.int8, quant_min=-qmax, quant_max=qmax)
                return ao["quant"](x, (1, cols), s, z, torch.int8, -qmax, qmax), s, z

            group.append(("torchao choose_qparams+quantize_affine", ao_q,
                          lambda r, qmax=qmax: ao["dequant"](r[0], (1, cols), r[1], r[2], torch.int8, -qmax, qmax)))
        out[f"{name} row"] = group

    def cb(fmt, block):
        group = [lp(fmt, "block", block),
                 ("lowprec.kernels[torch]", lambda: codebook_quantize(x, fmt, block, backend="torch"),
                  lambda q: codebook_dequantize(q, backend="torch"))]
        if gpu:
            group.append(("lowprec.kernels[triton]", lambda: codebook_quantize(x, fmt, block, backend="triton"),
                          lambda q: codebook_dequantize(q, backend="triton")))
        return group

    nf4 = cb("nf4", 64)
    if ao is not None:
        nf4.append(("torchao to_nf4 (scales double-quantized)", lambda: ao["to_nf4"](x, 64, 256),
                    lambda t: t.get_original_weight()))
    if bnbf is not None:
        nf4.append(("bitsandbytes quantize_4bit nf4", lambda: bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4"),
                    lambda r: bnbf.dequantize_4bit(r[0], r[1])))
    out["nf4 block64"] = nf4

    def ao_qmap(bits: int, qmap: tuple, block: int):
        table = torch.tensor(qmap, device=x.device)
        quant = ao["qu"].quantize_4bit_with_qmap if bits == 4 else ao["qu"].quantize_8bit_with_qmap

        def q():
            xs, scale = ao["qu"].scale_tensor(x, block)
            codes = quant(xs, table)
            if bits == 4:  # torchao's 4-bit optimizer state packs two codes per byte like this
                codes = (codes[..., ::2] << 4) | codes[..., 1::2]
            return codes, scale

        def dq(r):
            codes, scale = r
            if bits == 4:
                codes = torch.stack([codes >> 4, codes & 0xF], dim=-1).reshape(x.shape)
            return ao["qu"].dequant_with_qmap(codes, table, scale)

        return q, dq

    de8 = cb("de8", 256)
    if ao is not None:
        q, dq = ao_qmap(8, ao["qmap8_signed"](), 256)
        de8.append(("torchao optim quantize_8bit_with_qmap", q, dq))
    if bnbf is not None:
        de8.append(("bitsandbytes quantize_blockwise", lambda: bnbf.quantize_blockwise(x, blocksize=256),
                    lambda r: bnbf.dequantize_blockwise(r[0], r[1])))
    out["de8 block256"] = de8

    de4 = cb("de4", 128)
    if ao is not None:
        q, dq = ao_qmap(4, ao["qmap4_signed"](), 128)
        de4.append(("torchao optim quantize_4bit_with_qmap", q, dq))
    out["de4 block128"] = de4

    xpos = x.abs()  # the linear map without zero is for Adam's second moment: non-negative values
    lin = [("lowprec.formats", lambda: F.quantize(xpos, "linear4", None, "block", 128), lambda q: q.dequantize()),
           ("lowprec.kernels[torch]", lambda: codebook_quantize(xpos, "linear4", 128, backend="torch"),
            lambda q: codebook_dequantize(q, backend="torch"))]
    if gpu:
        lin.append(("lowprec.kernels[triton]", lambda: codebook_quantize(xpos, "linear4", 128, backend="triton"),
                    lambda q: codebook_dequantize(q, backend="triton")))
    if ao is not None:
        table = torch.tensor(ao["qmap4_unsigned"](), device=x.device)

        def ao_lin_q():
            xs, scale = ao["qu"].scale_tensor(xpos, 128)
            return ao["qu"].quantize_4bit_with_qmap(xs, table), scale

        lin.append(("torchao optim quantize_4bit_with_qmap (unsigned)", ao_lin_q,
                    lambda r: ao["qu"].dequant_with_qmap(r[0], table, r[1])))
    out["linear4 block128 (|x|)"] = lin
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--stat", choices=["min_s", "median_s"], default="min_s",
                   help="min over the repeats by default: the least disturbed run on a busy machine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 by default: on a shared machine a second intra-op thread "
                        "that gets descheduled stalls every op by a scheduler time slice)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols, device=args.device)
    n = x.numel()
    gpu = x.device.type == "cuda"
    ao, bnbf = _torchao(), _bnb()
    rows_out = []
    for group, items in contenders(x, ao, bnbf, gpu).items():
        base = {}
        for name, quant, dequant in items:
            try:
                q = quant()
                y = dequant(q)
                err = _rel_rmse(x if not group.startswith("linear4") else x.abs(), y)
                tq = time_fn(quant, warmup=1, repeat=args.repeat)[args.stat]
                tdq = time_fn(lambda q=q, dequant=dequant: dequant(q), warmup=1, repeat=args.repeat)[args.stat]
            except Exception as exc:  # a contender missing on this platform is reported, not fatal
                rows_out.append(dict(format=group, contender=name, note=f"failed: {type(exc).__name__}: {exc}"[:80]))
                continue
            base.setdefault("q", tq)
            base.setdefault("dq", tdq)
            rows_out.append(dict(format=group, contender=name, quant_ms=tq * 1e3, quant_Melem_s=n / tq / 1e6,
                                 quant_vs=tq / base["q"], dequant_ms=tdq * 1e3, dequant_Melem_s=n / tdq / 1e6,
                                 dequant_vs=tdq / base["dq"], rel_rmse=err))
    cols = ["format", "contender", "quant_ms", "quant_Melem_s", "quant_vs", "dequant_ms", "dequant_Melem_s",
            "dequant_vs", "rel_rmse", "note"]
    print(f"{args.rows}x{args.cols} float32 on {x.device} ({machine()['threads']} threads); times are the "
          f"{args.stat[:-2]} of {args.repeat} runs; 'vs' = time / the first row of the format")
    print(format_table(rows_out, cols))
    payload = dict(shape=[args.rows, args.cols], device=str(x.device), repeat=args.repeat, stat=args.stat,
                   threads=args.threads, rows=rows_out)
    path = write_json("formats", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
