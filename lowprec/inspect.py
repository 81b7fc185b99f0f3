"""``inspect(model, batch)``: the numerics report behind ``lowprec inspect``.

One forward and backward pass on a batch, with hooks on every op, then a table of:

* every op's output (std, amax) and the gradient each of its tensor inputs receives from it;
* every weight (std, amax) and its gradient;
* for each requested format (e.g. ``e4m3``, ``e5m2``, ``fp16``), the fraction of each tensor
  that would saturate (``|x| > max``) or underflow to zero (``0 < |x| < min_subnormal / 2``)
  if cast with scale 1, which is how an unscaled cast (or unit scaling) meets the format.

"Ops" are lowprec's unit-scaled modules (:class:`lowprec.scaling.modules.UnitOp`) plus every
leaf module of an unconverted model (linear, embedding, norm, activation...), so a model can
be inspected before and after conversion and the two tables compared. Gradient backends held
as ``.gemm`` are not separate ops. The input gradient recorded for an op is the part of the
gradient that flows from that op into its input (each input is aliased per op), not the total
gradient of a tensor shared by several ops.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowprec.formats import FloatFormat, get_format
from lowprec.text_table import aligned_table

KINDS = ("output", "input_grad", "weight", "weight_grad")
_SKIP_LEAVES = (nn.Dropout, nn.Identity)


@dataclass
class InspectReport:
    """Rows of tensor statistics; prints as a table, saves as JSON.

    Each row: ``name`` (module or parameter), ``op`` (module class), ``tensor`` (one of
    ``KINDS``; input gradients carry the input's position, e.g. ``input_grad[1]``), ``kind``,
    ``std``, ``amax``, ``numel``, and per format ``<fmt>_saturated`` / ``<fmt>_underflow``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    formats: tuple[str, ...] = ()
    loss: float = float("nan")

    def where(self, kind: str) -> list[dict[str, Any]]:
        """Rows of one kind: ``output``, ``input_grad``, ``weight`` or ``weight_grad``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        return [r for r in self.rows if r["kind"] == kind]

    def stds(self, kind: str) -> list[float]:
        return [r["std"] for r in self.where(kind)]

    def fraction_within(self, kind: str, lo: float, hi: float) -> float:
        """Fraction of the rows of ``kind`` whose std lies in ``[lo, hi]``."""
        s = self.stds(kind)
        return sum(lo <= v <= hi for v in s) / max(len(s), 1)

    def outside(self, kind: str, lo: float, hi: float) -> list[dict[str, Any]]:
        return [r for r in self.where(kind) if not (lo <= r["std"] <= hi)]

    def to_dict(self) -> dict[str, Any]:
        return dict(loss=self.loss, formats=list(self.formats), rows=self.rows)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def summary(self) -> str:
        lines = [f"loss {self.loss:.4f}"]
        for kind in KINDS:
            s = self.stds(kind)
            if s:
                lines.append(f"{kind:11s} {len(s):4d} tensors, std in [{min(s):.3g}, {max(s):.3g}], "
                             f"{100 * self.fraction_within(kind, 0.5, 2.0):.0f}% in [0.5, 2]")
        return "\n".join(lines)

    def __str__(self) -> str:
        cols = ["name", "op", "tensor", "std", "amax"]
        for f in self.formats:
            cols += [f"{f} sat%", f"{f} uf%"]
        cells = []
        for r in self.rows:
            row = [r["name"], r["op"], r["tensor"], f"{r['std']:.3g}", f"{r['amax']:.3g}"]
            for f in self.formats:
                row += [_pct(r[f"{f}_saturated"]), _pct(r[f"{f}_underflow"])]
            cells.append(row)
        return "\n".join([*aligned_table(cols, cells, strip=True), "", self.summary()])


def _pct(v: float) -> str:
    return "0" if v == 0 else f"{100 * v:.2g}"


def _stats(t: Tensor, fmts: Sequence[FloatFormat]) -> dict[str, Any]:
    x = t.detach().float()
    a = x.abs()
    n = x.numel()
    out: dict[str, Any] = dict(std=float(x.std()) if n > 1 else float(a.mean()) if n else 0.0,
                               amax=float(a.max()) if n else 0.0, numel=n)
    for f in fmts:
        out[f"{f.name}_saturated"] = float((a > f.max).sum()) / max(n, 1)
        out[f"{f.name}_underflow"] = float(((a > 0) & (a < f.min_subnormal / 2)).sum()) / max(n, 1)
    return out


def _is_op(name: str, m: nn.Module, model: nn.Module) -> bool:
    if getattr(m, "lowprec_op", False):
        return True
    if name.endswith(".gemm") or name == "gemm":
        return False
    if isinstance(m, _SKIP_LEAVES) or next(m.children(), None) is not None:
        return False
    return not _inside_unit_op(name, model)


def _inside_unit_op(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if getattr(parent, "lowprec_op", False):
            return True
    return False


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    from lowprec.training import lm_loss

    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return lm_loss(model, batch[0], batch[1])
    if isinstance(batch, Tensor) and batch.dim() == 2 and not batch.is_floating_point():
        return lm_loss(model, batch[:, :-1], batch[:, 1:])
    raise TypeError("inspect: pass loss_fn(model, batch) -> scalar unless batch is (inputs, targets) token "
                    f"tensors or one (batch, seq) token tensor; got {type(batch).__name__}")


def inspect(model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
            formats: Sequence[str] = ("e4m3", "e5m2", "fp16")) -> InspectReport:
    """Run one forward/backward of ``loss_fn(model, batch)`` and tabulate every op and weight.

    ``loss_fn`` defaults to next-token cross-entropy (:func:`lowprec.training.lm_loss`, the
    unit-scaled loss on a unit-scaled model) for ``(inputs, targets)`` token batches. The
    model's parameters are not changed; their ``.grad`` is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect expects a torch.nn.Module, got {type(model).__name__}")
    fmts = []
    for f in formats:
        fmt = get_format(f)
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"inspect: format {f!r} is not a floating-point format (saturation/underflow need one)")
        fmts.append(fmt)
    loss_fn = loss_fn or _default_loss

    op_rows: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    handles = []

    def record(name: str, op: str, tensor: str, kind: str, t: Tensor) -> None:
        if name not in op_rows:
            op_rows[name] = []
            order.append(name)
        op_rows[name].append(dict(name=name, op=op, tensor=tensor, kind=kind, **_stats(t, fmts)))

    def make_hooks(name: str, m: nn.Module):
        op = type(m).__name__
        calls = {"n": 0}

        def pre(mod, args, kwargs):
            calls["n"] += 1
            tag = name if calls["n"] == 1 else f"{name}#{calls['n']}"
            new_args = list(args)
            for i, a in enumerate(args):
                if isinstance(a, Tensor) and a.is_floating_point() and a.requires_grad:
                    alias = a.view_as(a)
                    alias.register_hook(lambda g, i=i, tag=tag: record(tag, op, f"input_grad[{i}]", "input_grad", g))
                    new_args[i] = alias
            return tuple(new_args), kwargs

        def post(mod, args, kwargs, out):
            tag = name if calls["n"] == 1 else f"{name}#{calls['n']}"
            t = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor) else out
            if isinstance(t, Tensor) and t.is_floating_point():
                record(tag, op, "output", "output", t)

        return pre, post

    for name, m in model.named_modules():
        if name and _is_op(name, m, model):
            pre, post = make_hooks(name, m)
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))

    saved = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    was_training = model.training
    try:
        model.train()
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"inspect: loss_fn must return a scalar tensor, got {type(loss).__name__}")
        loss.backward()
        rows: list[dict[str, Any]] = []
        for name in order:
            rows += sorted(op_rows[name], key=lambda r: (r["kind"] != "output", r["tensor"]))
        seen: set[int] = set()
        for pname, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            rows.append(dict(name=pname, op="parameter", tensor="weight", kind="weight", **_stats(p, fmts)))
            if p.grad is not None:
                rows.append(dict(name=pname, op="parameter", tensor="weight_grad", kind="weight_grad",
                                 **_stats(p.grad, fmts)))
        value = float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = saved.get(id(p))
        model.train(was_training)
    return InspectReport(rows=rows, formats=tuple(f.name for f in fmts), loss=value if math.isfinite(value) else value)
