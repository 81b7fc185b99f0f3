"""The numerics table behind ``lowprec inspect``: how every matmul operand fits a number format.

For each linear-like layer (an ``nn.Linear`` or a module with a ``.gemm`` backend) one batch
forward and backward gives the three tensors an FP8 GEMM casts: the input X and the weight W
(forward format, E4M3 by default) and the output gradient dY (backward format, E5M2). For
each: std, amax, and the fractions that would *saturate* (|x * scale| beyond the format's max
and its rounding interval: clipped) or *underflow* (a nonzero x with |x * scale| at most half the smallest subnormal:
rounded to zero) under the scaling strategy. The scales follow ``lowprec.formats``
(TransformerEngine's convention ``q = cast(x * scale)``, ``scale = max / amax``).

Under per-tensor current scaling nothing saturates by construction; the underflow column is
then the one to read. With no scaling (``"none"``) both show how well the raw tensors fit,
which is what unit scaling is for.

Two block-scaled strategies show the operands as the block-scaled recipes cast them, with the
scales taken from the quantizers themselves (so the table and training cannot disagree):

* ``"mx"`` (recipe ``mxfp8``): OCP MX v1.0, 1x32 blocks with power-of-two E8M0 scales
  (:func:`lowprec.formats.mx_quantize`), elements E4M3, E5M2 or E2M1. A block's amax lands in
  the top binade of the element format, so a block *saturates* when its amax's mantissa is
  beyond the format's largest one and its rounding interval (E4M3: scaled amax above 464);
  *underflow* counts elements 2**18 to 2**19 times (E4M3) below their block's amax.
* ``"nvfp4"`` (recipe ``nvfp4``): E2M1 elements in 1x16 blocks, an E4M3 scale per block and a
  float32 scale per tensor (:func:`lowprec.formats.nvfp4_quantize`). With E2M1's range of 12
  (0.5 to 6) *underflow* is the column to read: elements below about a 24th of their block's
  amax round to zero (about: the E4M3 block scale is rounded). Saturation only happens where
  that block scale is an E4M3 subnormal (a block far below the tensor's amax).

Blocks run along the last dimension of each tensor: for the input and the weight that is the
forward GEMM's reduction dimension K; for grad_output it is N, the reduction dimension of the
input-gradient (dgrad) GEMM. Not modelled: NVFP4's 16x16 weight blocks and the random Hadamard
transform on the weight-gradient GEMM's inputs; the table shows every operand in 1x16 blocks.
Elements of a block holding NaN or Inf decode to NaN: they count as neither saturated nor
underflowed (the non-finite inputs themselves are counted under ``nonfinite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowprec.formats import (
    MX_ELEMENTS,
    NVFP4_BLOCK,
    FloatFormat,
    amax,
    from_e8m0,
    get_format,
    mx_quantize,
    nvfp4_quantize,
    scale_from_amax,
)

SCALINGS = ("none", "current", "rowwise", "blockwise", "mx", "nvfp4")
BLOCK = 128  # DeepSeek-V3 / TransformerEngine block-wise: 1 x 128 activation tiles
# The block-scaled strategies and the element formats each quantizer takes.
BLOCK_SCALINGS: dict[str, tuple[str, ...]] = {"mx": tuple(MX_ELEMENTS), "nvfp4": ("e2m1",)}


def formats_for(recipe, forward: str | None = None, backward: str | None = None,
                scaling: str | None = None) -> tuple[str, str, str]:
    """(forward format, backward format, scaling) for a recipe, with user overrides.

    A recipe with FP8 casts gives its own formats and scaling (delayed scaling is shown as
    current: one batch has no history); an MXFP8 recipe gives its element formats under ``"mx"``;
    an NVFP4 recipe gives E2M1 under ``"nvfp4"``; a 16-bit recipe gives that format unscaled; a
    recipe without casts (or none) is shown against E4M3/E5M2 with no scaling.
    """
    cast = getattr(recipe, "cast", None)
    fmt_name = getattr(cast, "format", None)
    if fmt_name == "fp8":
        f, b, s = cast.forward, cast.backward, cast.scaling
        s = "current" if s == "delayed" else s
    elif fmt_name == "mxfp8":
        f, b, s = cast.forward, cast.backward, "mx"
    elif fmt_name == "nvfp4":
        f, b, s = "e2m1", "e2m1", "nvfp4"
    elif fmt_name in ("fp16", "bf16"):
        f, b, s = fmt_name, fmt_name, "none"
    else:
        f, b, s = "e4m3", "e5m2", "none"
    f, b, s = forward or f, backward or b, scaling or s
    for name in (f, b):
        fmt = get_format(name)
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"inspect shows floating-point formats (e4m3, e5m2, e2m1, fp16, bf16); got {name!r}")
    if s not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {s!r}")
    for name in (f, b):
        _check_scaling(name, s)
    return f, b, s


def _check_scaling(fmt: str | FloatFormat, scaling: str) -> None:
    """Refuse a block-scaled strategy with an element format its quantizer does not take."""
    name = str(getattr(fmt, "name", fmt)).lower()
    allowed = BLOCK_SCALINGS.get(scaling)
    if allowed is not None and name not in allowed:
        raise ValueError(f"format {name!r} cannot be used with scaling {scaling!r}: "
                         f"{scaling!r} takes element formats {', '.join(allowed)}")


def _block_decode(x: torch.Tensor, fmt: FloatFormat, scaling: str) -> torch.Tensor:
    """Per element of ``x`` (2-D, float32): the decode scale ``d`` of its block, as the quantizer
    computes it (it stores ``x / d`` rounded; 0 where NVFP4's block scale rounds to 0, NaN in a
    block holding NaN or Inf). Blocks run along the last dim; a ragged tail is padded by the
    quantizer and cropped here, so only the real elements are returned."""
    cols = x.shape[-1]
    if scaling == "mx":
        q = mx_quantize(x, fmt.name)
        d, block = from_e8m0(q.scale), q.block_size
    else:
        q = nvfp4_quantize(x)
        d, block = q.block_scale.float() / q.tensor_scale, NVFP4_BLOCK  # 1x16: block_2d is not modelled
    return d.repeat_interleave(block, dim=-1)[:, :cols]


def _scale(x: torch.Tensor, fmt: FloatFormat, scaling: str) -> torch.Tensor:
    """The scale each element of ``x`` (2-D, float32) is multiplied by, broadcastable to it, under
    the per-tensor, per-row and 1x128 scalings (the block-scaled ones divide by
    :func:`_block_decode` instead, see :func:`_scaled_abs`)."""
    if scaling == "none":
        return torch.ones((), dtype=torch.float32)
    if scaling == "current":
        return scale_from_amax(amax(x, "tensor"), fmt)
    if scaling == "rowwise":
        return scale_from_amax(amax(x, "row"), fmt)
    # blockwise: 1 x 128 tiles along the last dim, power-of-two scales; a ragged tail is padded
    cols = x.shape[-1]
    pad = (-cols) % BLOCK
    xp = torch.nn.functional.pad(x, (0, pad))
    s = scale_from_amax(amax(xp, "block", BLOCK), fmt, power_of_two=True)
    return s.reshape(x.shape[0], -1, 1).expand(-1, -1, BLOCK).reshape(x.shape[0], -1)[:, :cols]


def _scaled_abs(x: torch.Tensor, fmt: FloatFormat, scaling: str) -> torch.Tensor:
    """``|x * scale|`` per element, as the cast computes it: block-scaled quantizers divide by the
    decode scale (``x / d``; exactly their float32 arithmetic), the others multiply by the scale."""
    if scaling in BLOCK_SCALINGS:
        d = _block_decode(x, fmt, scaling)
        return torch.where(d == 0, 0.0, x.abs() / d)
    return x.abs() * _scale(x, fmt, scaling)


def tensor_stats(x: torch.Tensor, fmt: str | FloatFormat, scaling: str = "none") -> dict[str, float]:
    """std, amax, and saturated / underflowed fractions of ``x`` cast to ``fmt`` under ``scaling``.

    Elements in a block that holds NaN or Inf ("mx", "nvfp4") decode to NaN: neither saturated
    nor underflowed."""
    fmt = get_format(fmt)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    _check_scaling(fmt, scaling)
    x = x.detach().float().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.detach().float().reshape(1, -1)
    finite = torch.isfinite(x)
    xs = _scaled_abs(x, fmt, scaling)  # NaN where the cast gives NaN: compares false below
    # Clipped: beyond the rounding interval of the largest finite value (max + half its ULP);
    # a value just above max (e.g. amax * (max / amax) rounding up by one fp32 ULP) rounds to max.
    limit = fmt.max + 0.5 * fmt.step_at(torch.tensor(fmt.max)).item()
    n = x.numel()
    return {
        "std": x.std().item() if n > 1 else 0.0,
        "amax": x.abs().max().item() if n else 0.0,
        "saturated": ((xs > limit) & finite).sum().item() / n,
        "underflowed": ((x != 0) & (xs <= fmt.min_subnormal / 2)).sum().item() / n,
        "nonfinite": (~finite).sum().item() / n,
    }


def _matmul_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.dim() == 2 and (isinstance(m, nn.Linear) or hasattr(m, "gemm")):
            out.append((name, m))
    return out


def numerics_table(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], *, forward_format: str = "e4m3",
                   backward_format: str = "e5m2", scaling: str = "none") -> list[dict[str, Any]]:
    """One forward/backward of ``lowprec.training.lm_loss`` on ``batch``; a row per (layer, tensor).

    The model's weights and gradients are left as they were (gradients are restored).
    """
    from lowprec.training import lm_loss

    layers = _matmul_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers to inspect")
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def fwd_hook(name):
        def hook(module, args, output):
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    saved_grads = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    try:
        for name, m in layers:
            handles.append(m.register_forward_hook(fwd_hook(name)))
        x, y = batch
        lm_loss(model, x, y).backward()
    finally:
        for h in handles:
            h.remove()
        for p, g in saved_grads.items():
            p.grad = g
    rows = []
    for name, m in layers:
        # cast: the layer's matmul really runs through a low-precision backend (else: a what-if)
        cast = getattr(m, "gemm", None) is not None
        for tensor, what, fmt in (("input", inputs.get(name), forward_format), ("weight", m.weight, forward_format),
                                  ("grad_output", grads.get(name), backward_format)):
            if what is None:
                continue
            rows.append({"layer": name, "tensor": tensor, "format": fmt, "cast": cast,
                         **tensor_stats(what, fmt, scaling)})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The table as text: one line per (layer, tensor), fractions in percent."""
    head = (f"{'layer':<36} {'tensor':<12} {'format':<6} {'cast':<4} {'std':>9} {'amax':>9} {'saturated':>10} "
            f"{'underflow':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:<36} {r['tensor']:<12} {r['format']:<6} {'yes' if r.get('cast') else 'no':<4} "
                     f"{r['std']:>9.3g} {r['amax']:>9.3g} {100 * r['saturated']:>9.2f}% {100 * r['underflowed']:>9.2f}%")
    lines.append("cast: whether the layer's matmul runs in low precision under this recipe (no: a what-if)")
    worst_sat = max(rows, key=lambda r: r["saturated"])
    worst_und = max(rows, key=lambda r: r["underflowed"])
    lines.append(f"most saturated: {worst_sat['layer']} {worst_sat['tensor']} ({100 * worst_sat['saturated']:.2f}%); "
                 f"most underflowed: {worst_und['layer']} {worst_und['tensor']} ({100 * worst_und['underflowed']:.2f}%)")
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "numerics") -> Path | None:
    """std per tensor (log scale) and saturated / underflowed percentages, one PNG."""
    from lowprec.runs import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    labels = [f"{r['layer']}:{r['tensor']}" for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(7, 0.12 * len(rows) + 3), 7), sharex=True)
    xs = range(len(rows))
    a.bar(xs, [max(r["std"], 1e-30) for r in rows])
    a.set_yscale("log")
    a.axhline(1.0, color="k", lw=0.8)
    a.set(ylabel="std", title=title)
    b.bar(xs, [100 * r["saturated"] for r in rows], label="saturated")
    b.bar(xs, [100 * r["underflowed"] for r in rows], bottom=[100 * r["saturated"] for r in rows], label="underflowed")
    b.set(ylabel="% of elements")
    b.legend()
    b.set_xticks(list(xs))
    b.set_xticklabels(labels, rotation=90, fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

