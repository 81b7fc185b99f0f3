"""Sensitivity to *training* formats: how much the loss rises when one linear layer's forward GEMM
runs in a block-scaled format (NVFP4, MXFP8, ...) or in BF16, everything else exact.

This is what decides which linear layers a block-scaled training recipe keeps in high precision
(issue 15). NVIDIA's NVFP4 recipe (Pretraining LLMs with NVFP4, 2025, arXiv 2509.25149) keeps a
few layers in BF16 chosen by position (mostly the last blocks); lowprec measures instead.

What is perturbed, per layer ``i`` and format ``f``: the GEMM ``y = x W^T + b`` becomes
``y = Q_f^act(x) Q_f^w(W)^T + b``, with the operand layouts the training recipes use in the
forward pass (round-to-nearest-even; stochastic rounding and the random Hadamard transform only
touch the gradient GEMMs, so they do not enter a forward score):

* ``nvfp4``: activations in 1x16 blocks along the reduction dimension, weights in 2-D 16x16
  blocks (so the forward and the backward pass see the same quantized weight), E4M3 block scales
  under one float32 tensor scale;
* ``mxfp8`` / ``mxfp8_e5m2`` / ``mxfp4``: 1x32 blocks along the reduction dimension (the last
  dimension of both ``x`` and ``W``), E8M0 power-of-two scales (OCP MX v1.0);
* ``bf16``: both operands rounded to bfloat16 (the "high precision" reference a recipe falls back to).

Two scorers:

* ``"measured"``: ``L(layer i in f) - L(exact)``, one forward per layer, format and batch: exact.
  The weight is substituted through ``torch.func.functional_call`` and the input quantized by a
  forward pre-hook that is removed in a ``finally``; the model's parameters are never written.
* ``"pqi"``: the same change as a path integral. Along ``W_t = W + t (Q(W) - W)`` *and*
  ``x_t = x + t (Q(x) - x)`` (the layer's input ``x`` does not depend on ``t``, since every other
  layer is exact), ``dL = integral_0^1 dL/dt dt``; ``dL/dt`` is one backward pass to a scalar ``t``,
  integrated by Gauss-Legendre (``points`` nodes). The weight and the activation perturbation
  both enter, so PQI estimates the same quantity the measured scorer computes.

Per-layer FLOPs are recorded as ``2 * in_features * out_features`` per token: every linear layer of
a transformer sees the same tokens, so per-token FLOPs give each layer's share of linear FLOPs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowprec.formats import BLOCK_SCHEMES, fake_quantize_block
from lowprec.sensitivity.common import (
    LossEvaluator,
    LossFn,
    as_batch_list,
    check_loss,
    find_layers,
    grads_or_zeros,
    progress_bar,
    scoring_mode,
)
from lowprec.sensitivity.pqi import quadrature
from lowprec.text_table import aligned_table

#: Block-scaled training formats: the schemes of ``lowprec.formats.fake_quantize_block``.
BLOCK_FORMATS: tuple[str, ...] = ("nvfp4", *(s for s in BLOCK_SCHEMES if s != "nvfp4"))
#: High-precision formats a layer can be kept in.
HIGH_FORMATS = ("bf16",)
#: Every format ``score(..., formats=...)`` accepts.
TRAINING_FORMATS = BLOCK_FORMATS + HIGH_FORMATS
#: Default formats scored: the two recipes of issue 15 and their BF16 fallback.
DEFAULT_FORMATS = ("nvfp4", "mxfp8", "bf16")
#: Scorers that support training formats (HAWQ's trace x ||dW||^2 has no activation term).
FORMAT_METHODS = ("measured", "pqi")

# Weight layouts: NVFP4 (arXiv 2509.25149) uses 16x16 2-D blocks for weights; MX (OCP MX v1.0)
# uses 1x32 blocks along the reduction dimension for every operand.
_WEIGHT_BLOCK_2D = {s: s == "nvfp4" for s in BLOCK_FORMATS}


def check_format(fmt: Any, where: str = "format") -> str:
    """``fmt`` if it is one of :data:`TRAINING_FORMATS`, else a ValueError naming ``where``."""
    if not isinstance(fmt, str) or fmt not in TRAINING_FORMATS:
        raise ValueError(f"{where} must be one of {', '.join(TRAINING_FORMATS)}; got {fmt!r}")
    return fmt


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """De-duplicated formats in the given order, each known; an empty list is an error."""
    if isinstance(formats, str):
        formats = (formats,)
    try:
        items = list(formats)
    except TypeError:
        raise TypeError(f"formats must be a format name or a sequence of them; got {formats!r}") from None
    if not items:
        raise ValueError(f"formats is empty: give at least one of {', '.join(TRAINING_FORMATS)}")
    return tuple(dict.fromkeys(check_format(f, "each of formats") for f in items))


def quantize_operand(x: torch.Tensor, fmt: str, role: str, *, where: str = "tensor") -> torch.Tensor:
    """``x`` rounded to ``fmt`` as a forward GEMM operand (fake-quantized: same dtype and shape).

    ``role`` is ``"weight"`` (an ``(out, in)`` weight: NVFP4 in 16x16 2-D blocks, MX formats in 1x32
    blocks along ``in``) or ``"activation"`` (``(..., in)``: blocks along the last dimension, 1x16 for
    NVFP4, 1x32 for MX). ``bf16`` rounds to bfloat16 and back. Round-to-nearest-even throughout,
    as the recipes do for weights and activations. A dimension that is not a multiple of the
    block is padded by ``fake_quantize_block`` (and cropped back), as the training GEMMs do; any
    error it raises is re-raised naming ``where`` (the layer).
    """
    check_format(fmt)
    if role not in ("weight", "activation"):
        raise ValueError(f"role must be 'weight' or 'activation'; got {role!r}")
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    block_2d = role == "weight" and _WEIGHT_BLOCK_2D[fmt]
    try:
        return fake_quantize_block(x, fmt, dim=-1, rounding="nearest", block_2d=block_2d)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: cannot quantize the {role} of shape {tuple(x.shape)} to {fmt}"
                         f"{' (16x16 blocks)' if block_2d else ''}: {e}") from None


def linear_flops(module: nn.Module) -> int:
    """Forward FLOPs per token of a linear layer: ``2 * in_features * out_features``."""
    out_f, in_f = module.weight.shape[0], module.weight.shape[1]
    return 2 * int(in_f) * int(out_f)


def training_layers(model: nn.Module, layers: Sequence[str] | None = None, *,
                    include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The linear layers to score for training formats (qualified name -> module, model order).

    By default every ``nn.Linear`` except the LM head (``model.get_output_embeddings()``), which the
    training recipes keep in high precision anyway (``cast.keep_high_precision`` lists ``"lm_head"``
    by default), so spending the budget on it would be wasted. ``layers`` names them explicitly
    (the LM head included, if named); each must be an ``nn.Linear`` with a 2-D weight.
    """
    found = find_layers(model, layers)
    bad = [f"{n} ({type(m).__name__})" for n, m in found.items() if not isinstance(m, nn.Linear)]
    if layers is not None and bad:
        raise ValueError(f"training-format scoring needs nn.Linear layers; not linear: {', '.join(bad)}")
    out = {n: m for n, m in found.items() if isinstance(m, nn.Linear)}
    if layers is None and not include_lm_head:
        get = getattr(model, "get_output_embeddings", None)
        head = None
        with contextlib.suppress(Exception):
            head = get() if get is not None else None
        out = {n: m for n, m in out.items() if m is not head}
    if not out:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to score for training formats")
    return out


@torch.no_grad()
def _mean_loss(ev: LossEvaluator, batches: Sequence[Any], overrides: Mapping[str, torch.Tensor] | None = None,
               check: bool = False) -> float:
    """Mean of ``loss_fn`` over ``batches`` as a Python float, read in the loss's own precision (a
    float64 loss keeps changes far below float32's resolution of the loss, ~5e-7 at 5.5: BF16
    scores are that small)."""
    total = 0.0
    for batch in batches:
        loss = ev(batch, overrides)
        if check:
            check_loss(loss)
        total += float(loss.detach().reshape(()).double())
    return total / len(batches)


@contextlib.contextmanager
def _input_perturbed(module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, ``module``'s input tensor (first positional argument, or ``input=``) is
    replaced by ``transform(input)``. The hook is removed even when the body raises."""

    def hook(mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (transform(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("input"), torch.Tensor):
            return args, {**kwargs, "input": transform(kwargs["input"])}
        raise TypeError(f"{type(mod).__name__} was called without a tensor input; cannot quantize its activation")

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class TrainingSensitivityReport:
    """Scores of one method under training formats: ``scores[layer][fmt]`` is the measured (or PQI)
    loss increase when that linear layer's forward GEMM takes its weight and input in ``fmt``,
    every other layer exact.

    ``flops[layer]`` is the layer's forward FLOPs per token (``2 * in * out``), what a FLOP budget
    is shared by; ``n_params[layer]`` its weight size; ``meta`` the run's settings and counts.
    """

    method: str
    formats: tuple[str, ...]
    scores: dict[str, dict[str, float]]
    flops: dict[str, int]
    n_params: dict[str, int]
    base_loss: float = math.nan
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.formats = check_formats(self.formats)
        missing = [n for n in self.scores if set(self.scores[n]) != set(self.formats)]
        if missing:
            raise ValueError(f"report layers {missing} do not have a score for every format {self.formats}")
        for d, what in ((self.flops, "flops"), (self.n_params, "n_params")):
            absent = [n for n in self.scores if n not in d]
            if absent:
                raise ValueError(f"report {what} is missing layers {absent}")
        bad = [n for n in self.scores if not (isinstance(self.flops[n], int) and self.flops[n] > 0)]
        if bad:
            raise ValueError(f"report flops must be positive integers; not for layers {bad}")

    @property
    def layers(self) -> list[str]:
        return list(self.scores)

    def score(self, layer: str, fmt: str) -> float:
        return self.scores[layer][fmt]

    def gain(self, layer: str, fmt: str, high: str = "bf16") -> float:
        """The score removed by keeping ``layer`` in ``high`` instead of ``fmt``."""
        return self.scores[layer][fmt] - self.scores[layer][high]

    def flops_fraction(self, keep: Iterable[str]) -> float:
        """Share of the report's linear FLOPs in the layers ``keep``."""
        keep = list(dict.fromkeys(keep))
        unknown = [n for n in keep if n not in self.flops]
        if unknown:
            raise KeyError(f"layers not in the report: {unknown}")
        return sum(self.flops[n] for n in keep) / sum(self.flops.values())

    def table(self) -> str:
        total = sum(self.flops.values())
        cols = ["layer", "flops %", *self.formats]
        cells = [[n, f"{100 * self.flops[n] / total:.2f}", *(f"{self.scores[n][f]:.4g}" for f in self.formats)]
                 for n in self.layers]
        head = (f"training-format sensitivity ({self.method}): loss increase with one layer's weight and input "
                f"in each format; base loss {self.base_loss:.6g}")
        return "\n".join([head, *aligned_table(cols, cells)])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "training_formats",
            "method": self.method,
            "formats": list(self.formats),
            "base_loss": self.base_loss,
            "layers": [{"name": n, "flops_per_token": self.flops[n], "n_params": self.n_params[n],
                        "scores": dict(self.scores[n]), "extra": self.extra.get(n, {})} for n in self.layers],
            "meta": self.meta,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingSensitivityReport:
        try:
            layers = d["layers"]
            return cls(
                method=str(d["method"]), formats=tuple(d["formats"]),
                scores={ly["name"]: {str(f): float(s) for f, s in ly["scores"].items()} for ly in layers},
                flops={ly["name"]: int(ly["flops_per_token"]) for ly in layers},
                n_params={ly["name"]: int(ly["n_params"]) for ly in layers},
                base_loss=float(d.get("base_loss", math.nan)),
                extra={ly["name"]: dict(ly.get("extra", {})) for ly in layers},
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a training-format sensitivity report: {type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, source: str | Path) -> TrainingSensitivityReport:
        """From JSON text or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"training-format sensitivity report {str(path)!r} does not exist")
            text = path.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"training-format sensitivity report is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def plot(self, path: str | Path, keep: Iterable[str] = ()) -> Path:
        """Per-layer scores per format (log scale; hatched: negative), layers in ``keep`` marked
        with a star, as PNG. matplotlib is imported here only."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = set(keep)
        n, k = len(self.layers), len(self.formats)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.14 * n * k + 2)), 5.0))
        width = 0.8 / k
        for j, f in enumerate(self.formats):
            raw = [self.scores[ly][f] for ly in self.layers]
            bars = ax.bar([i + (j - (k - 1) / 2) * width for i in range(n)], [max(abs(v), 1e-12) for v in raw],
                          width, label=f)
            for bar, v in zip(bars, raw):
                if v < 0:
                    bar.set_hatch("///")
        ax.set_yscale("log")
        nonzero = [abs(v) for s in self.scores.values() for v in s.values() if v != 0]
        if nonzero:  # an exact zero (bf16 left the layer's output unchanged) sits at the bottom edge
            ax.set_ylim(bottom=min(nonzero) / 3)
        ax.set_xticks(range(n))
        labels = [("* " if ly in keep else "") + ly.removeprefix("model.").replace("layers.", "L")
                  .replace("self_attn.", "").replace("mlp.", "") for ly in self.layers]
        ax.set_xticklabels(labels, rotation=90, fontsize=6 if n > 12 else 8)
        ax.set_ylabel("|loss increase| (hatched: negative)")
        ax.set_title(f"training-format sensitivity ({self.method})" + ("; * kept in high precision" if keep else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def score_formats(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    method: str = "measured",
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    layers: Sequence[str] | None = None,
    include_lm_head: bool = False,
    points: int = 2,
    rule: str = "gauss-legendre",
    progress: bool = True,
) -> TrainingSensitivityReport:
    """Score each linear layer of ``model`` (see :func:`training_layers`) under each training format.

    ``method="measured"``: the exact loss change; ``"pqi"``: its path integral with ``points``
    nodes of ``rule`` (weight and activation perturbed together; see the module docstring). Eval
    mode, parameters never written; every hook is removed and every flag restored, on error too.
    """
    if method not in FORMAT_METHODS:
        raise ValueError(f"method must be one of {', '.join(FORMAT_METHODS)} for training formats; got {method!r}")
    fmts = check_formats(formats)
    batch_list = as_batch_list(batches)
    found = training_layers(model, layers, include_lm_head=include_lm_head)
    ev = LossEvaluator(model, loss_fn)
    scores: dict[str, dict[str, float]] = {n: {} for n in found}
    meta: dict[str, Any] = {"formats": list(fmts), "batches": len(batch_list), "layers": len(found),
                            "quantizer": "forward GEMM operands, round-to-nearest-even: nvfp4 1x16 activations / "
                                         "16x16 weights; MX 1x32 along the reduction dim; bf16 cast"}
    t0 = time.perf_counter()
    work = progress_bar(total=len(found) * len(fmts), desc=f"{method} (formats)", enabled=progress)
    with scoring_mode(model):
        base = _mean_loss(ev, batch_list, check=True)
        grads = 0
        for n, m in found.items():
            w = m.weight.detach()
            for f in fmts:
                qw = quantize_operand(w, f, "weight", where=f"layer {n!r}")

                def qx(x: torch.Tensor, f: str = f, n: str = n) -> torch.Tensor:
                    return quantize_operand(x.detach(), f, "activation", where=f"layer {n!r}")

                if method == "measured":
                    with _input_perturbed(m, qx):
                        scores[n][f] = _mean_loss(ev, batch_list, {f"{n}.weight": qw}) - base
                else:
                    scores[n][f], used = _pqi_formats(ev, batch_list, m, f"{n}.weight", w, qw, qx, points, rule)
                    grads += used
                work.update(1)
    work.close()
    if method == "measured":
        meta["forward_passes"] = (len(found) * len(fmts) + 1) * len(batch_list)
    else:
        meta.update(points=points, rule=rule, gradients=grads)
    meta["time_s"] = time.perf_counter() - t0
    return TrainingSensitivityReport(
        method=method, formats=fmts, scores=scores, flops={n: linear_flops(m) for n, m in found.items()},
        n_params={n: m.weight.numel() for n, m in found.items()}, base_loss=base, meta=meta,
    )


def _pqi_formats(ev: LossEvaluator, batches: Sequence[Any], module: nn.Module, param: str, w: torch.Tensor,
                 qw: torch.Tensor, qx: Callable[[torch.Tensor], torch.Tensor], points: int,
                 rule: str) -> tuple[float, int]:
    """``integral_0^1 dL/dt dt`` along ``W + t (Q(W) - W)``, ``x + t (Q(x) - x)`` (mean over
    ``batches``), and the number of backward passes it took."""
    nodes, weights = quadrature(points, rule)
    acc_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    dw = qw - w
    total, n = 0.0, 0
    for node, wt in zip(nodes, weights):
        for batch in batches:
            t = torch.tensor(node, dtype=acc_dtype, requires_grad=True)

            def along(x: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
                x = x.detach()
                return x + (t * (qx(x) - x)).to(x.dtype)

            with torch.enable_grad(), _input_perturbed(module, along):
                loss = ev(batch, {param: w + (t * dw).to(w.dtype)})
                (g,) = grads_or_zeros(loss, [t])
            total += wt / len(batches) * float(g)
            n += 1
    return total, n
