"""Block-scaled casts side by side: lowprec's MXFP8, MXFP4 and NVFP4 against torchao's, on the same tensors.

Quality: SQNR (dB) of the quantize-dequantize round trip, higher is better, on

* ``gaussian``: ``torch.randn(256, 256)`` in bf16, seed 0 (the anchor's own tensor in
  ``shared/papers.md``) and a larger ``randn(1024, 1024)``;
* ``student-t3``: heavy-tailed, Student's t with 3 degrees of freedom (a few huge values per block);
* real tensors from the demo Llama after a short fp32 training run: the input of an attention
  projection, the input of an MLP down-projection (the SwiGLU output, the most outlier-heavy
  activation), a weight, and the output gradient of a down-projection.

Each tensor is cast along its last dimension (the GEMM reduction dimension) by both libraries:
MXFP8 (E4M3 elements, E8M0 scales per 32), MXFP4 (E2M1 per 32), NVFP4 (E2M1 per 16 with E4M3
scales) with torchao's per-tensor scale as in the NVIDIA recipe, and without it (torchao's
default: the anchor's 20.40 dB). Speed: median time of each cast of a 4096 x 4096 bf16 tensor on
the CPU, 1 thread, interleaved rounds; ratios against torchao. lowprec's casts on the CPU are its
PyTorch references (the Triton kernels run on CUDA), and the training path's compiled
quantize-dequantize (``lowprec.matmul.block_fake_quant``: no packing, one Inductor loop; float32 in).

    python benchmarks/bench_block_scaled.py            # ~1 min
    python benchmarks/bench_block_scaled.py --no-speed

Writes ``bench_results/bench_block_scaled.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine, write_json  # noqa: E402

from lowprec.formats import mx_quantize, nvfp4_quantize, sqnr_db  # noqa: E402

SCHEMES = ("MXFP8", "MXFP4", "NVFP4 (tensor scale)", "NVFP4 (no tensor scale)")


def ours(x: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "MXFP8":
        return mx_quantize(x, "e4m3").dequantize()
    if scheme == "MXFP4":
        return mx_quantize(x, "e2m1").dequantize()
    if scheme == "NVFP4 (tensor scale)":
        return nvfp4_quantize(x).dequantize()
    if scheme == "NVFP4 (no tensor scale)":
        # one level only: the tensor "amax" that makes the encode scale 1, so block scales are
        # amax/6 cast to E4M3 directly (torchao's default)
        return nvfp4_quantize(x, tensor_amax=torch.tensor(448.0 * 6.0)).dequantize()
    raise ValueError(scheme)


def theirs(x: torch.Tensor, scheme: str) -> torch.Tensor | None:
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception:  # torchao is an optional baseline (the `bench` extra)
        return None
    xb = x.to(torch.bfloat16)
    if scheme == "MXFP8":
        return MXTensor.to_mx(xb, torch.float8_e4m3fn, 32).dequantize(torch.float32)
    if scheme == "MXFP4":
        return MXTensor.to_mx(xb, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)
    if scheme == "NVFP4 (tensor scale)":
        scale = per_tensor_amax_to_scale(xb.abs().amax().float())
        return NVFP4Tensor.to_nvfp4(xb, 16, per_tensor_scale=scale).dequantize(torch.float32)
    if scheme == "NVFP4 (no tensor scale)":
        return NVFP4Tensor.to_nvfp4(xb, 16).dequantize(torch.float32)
    raise ValueError(scheme)


def demo_tensors(steps: int) -> dict[str, torch.Tensor]:
    """Activations, a weight and a gradient of the demo Llama after ``steps`` fp32 training steps."""
    from lowprec.data import eval_batches, stdlib_corpus
    from lowprec.models import DEMO_SEQ_LEN, demo_llama
    from lowprec.training import TrainConfig, lm_loss, train

    model = demo_llama(seed=0)
    corpus = stdlib_corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    train(model, opt, corpus, TrainConfig(steps=steps, batch_size=8, eval_every=steps, eval_batches=1),
          progress=False)
    layer = model.model.layers[len(model.model.layers) // 2]
    got: dict[str, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("attn input", i[0].detach())),
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o: got.__setitem__("down_proj input", i[0].detach())),
        layer.mlp.down_proj.register_full_backward_hook(
            lambda m, gi, go: got.__setitem__("down_proj output grad", go[0].detach())),
    ]
    (x, y), = eval_batches(corpus.val, 1, 8, DEMO_SEQ_LEN)
    lm_loss(model, x, y).backward()
    for h in hooks:
        h.remove()
    got["down_proj weight"] = layer.mlp.down_proj.weight.detach()
    # torchao's casts need the blocked dimension to be a multiple of the block (the down projection's
    # input is 688 wide: torchao refuses it, lowprec pads the ragged block); compare on the first 672
    return {f"demo Llama: {k}": v.reshape(-1, v.shape[-1])[:, : v.shape[-1] // 32 * 32].float()
            for k, v in got.items()}


def tensors(demo_steps: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = {
        "gaussian 256x256 (anchor)": torch.randn(256, 256, dtype=torch.bfloat16).float(),
        "gaussian 1024x1024": torch.randn(1024, 1024, generator=g),
        "student-t3 1024x1024": torch.distributions.StudentT(3.0).sample((1024, 1024)),
    }
    if demo_steps > 0:
        out.update(demo_tensors(demo_steps))
    # every library casts the same bf16 values (torchao's casts take bf16)
    return {k: v.to(torch.bfloat16).float() for k, v in out.items()}


def quality(ts: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for name, x in ts.items():
        for scheme in SCHEMES:
            a = sqnr_db(x, ours(x, scheme))
            t = theirs(x, scheme)
            b = sqnr_db(x, t) if t is not None else float("nan")
            rows.append({"tensor": name, "scheme": scheme, "lowprec dB": round(a, 2), "torchao dB": round(b, 2),
                         "difference dB": round(a - b, 2) + 0.0})
    return rows


def compiled(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """The training path's quantize-dequantize (no packing; compiled by Inductor on the CPU, float32 in)."""
    from lowprec.matmul.block_fake_quant import mx_fake_quantize, nvfp4_fake_quantize

    if scheme == "MXFP8":
        return mx_fake_quantize(x, "e4m3")
    if scheme == "MXFP4":
        return mx_fake_quantize(x, "e2m1")
    return nvfp4_fake_quantize(x)


def speed(rounds: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x32 = x.float()
    times: dict[tuple[str, str], list[float]] = {}
    for scheme in SCHEMES[:3]:
        compiled(x32[:64, :64], scheme)  # compile outside the timing
    for _ in range(rounds):
        for scheme in SCHEMES[:3]:
            for who, fn in (("lowprec", lambda s=scheme: ours(x, s)), ("torchao", lambda s=scheme: theirs(x, s)),
                            ("lowprec compiled", lambda s=scheme: compiled(x32, s))):
                t0 = time.perf_counter()
                r = fn()
                dt = time.perf_counter() - t0
                if r is not None:
                    times.setdefault((scheme, who), []).append(dt)
    rows = []
    for scheme in SCHEMES[:3]:
        ours_t = statistics.median(times[(scheme, "lowprec")])
        th = times.get((scheme, "torchao"))
        their_t = statistics.median(th) if th else float("nan")
        comp_t = statistics.median(times[(scheme, "lowprec compiled")])
        rows.append({"cast + dequantize, 4096x4096 bf16": scheme, "lowprec reference ms": round(ours_t * 1e3, 1),
                     "lowprec compiled ms": round(comp_t * 1e3, 1), "torchao ms": round(their_t * 1e3, 1),
                     "reference / torchao": round(ours_t / their_t, 2),
                     "compiled / torchao": round(comp_t / their_t, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-steps", type=int, default=100, help="fp32 steps before capturing real tensors (0: none)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args(argv)
    q = quality(tensors(args.demo_steps))
    print(format_table(q))
    worse = [r for r in q if r["difference dB"] < -0.01]
    print(f"\nlowprec at least as accurate as torchao on {len(q) - len(worse)} of {len(q)} (tensor, scheme) pairs"
          + ("" if not worse else ": worse on " + "; ".join(f"{r['tensor']} {r['scheme']}" for r in worse)))
    s = [] if args.no_speed else speed(args.rounds)
    if s:
        print()
        print(format_table(s))
    print(f"wrote {write_json('bench_block_scaled', {'quality': q, 'speed': s, 'machine': machine(), 'config': vars(args)})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
