"""Quantization-aware training (QAT): apply a per-layer bit plan as fake-quantized weights.

A *plan* maps a module's qualified name to a bit width (``{"layers.0.mlp.down_proj": 3, ...}``),
as :func:`lowprec.sensitivity.select_bits` returns it and :func:`lowprec.recipes.load_plan`
reads it. :func:`apply_plan` registers a :class:`IntWeightFakeQuant` parametrization on each
planned module's ``weight`` (``torch.nn.utils.parametrize``), so every read of ``module.weight``
returns the weight rounded to symmetric per-output-channel INT-k, and the gradient passes
straight through to the full-precision weight (the straight-through estimator, STE).

Because it acts on the ``weight`` attribute and not on the module's forward, it composes with
any linear-like layer that reads ``self.weight``: ``nn.Linear``, :class:`~lowprec.matmul.linear.LowPrecisionLinear`
(whose GEMM backend then casts the already-rounded weight to FP8/BF16), unit-scaled linears and
convolutions alike.

The weight quantizer, :func:`fake_quant_weight`, is the one the sensitivity scorers use, so a
layer is trained with exactly the rounding it was scored with.

Per-channel scale: ``"absmax"`` (the default) maps each row's largest magnitude to ``qmax``;
``"mse"`` clips: it picks, per row, the clipping ratio on a fixed grid that minimises the
squared rounding error (the grid includes 1.0, so it is never worse than absmax). At 2 and 3
bits this matters: symmetric INT2 has only the codes {-1, 0, 1}, and with an absmax scale
almost every weight of a bell-shaped row rounds to 0. Clipping to an MSE-optimal range is the
standard remedy (e.g. the clipping search of AWQ / OmniQuant, Banner et al. 2019's ACIQ).
:func:`scale_method` sets the default for a block of code (so scoring can use the same rule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowprec.formats import fake_quantize, int_format


def bits_problem(bits: Any) -> str | None:
    """Why ``bits`` is not a bit width the format layer supports (``lowprec.formats.int_format``:
    2..16), or None when it is."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        return f"a bit width must be an integer, got {type(bits).__name__} {bits!r}"
    try:
        int_format(bits)
    except ValueError as e:
        return f"bit width {bits} is not supported by lowprec.formats ({e})"
    return None


def check_bits(bits: Any, where: str = "bits") -> int:
    """A bit width the format layer supports (see :func:`bits_problem`), else a ValueError."""
    problem = bits_problem(bits)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    return bits


SCALE_METHODS = ("absmax", "mse")
# Clipping ratios searched by the "mse" scale: 1.0 down to 0.2 in steps of 0.02 (41 candidates).
MSE_CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(41))
_default_scale_method = "absmax"


def _check_scale_method(method: Any) -> str:
    if method not in SCALE_METHODS:
        raise ValueError(f"per-channel scale method must be one of {SCALE_METHODS}; got {method!r}")
    return method


def _resolve_scale_method(method: str | None) -> str:
    """``method``, or the :func:`scale_method` default when None; checked."""
    return _check_scale_method(_default_scale_method if method is None else method)


@contextlib.contextmanager
def scale_method(method: str) -> Iterator[None]:
    """Within the block, :func:`fake_quant_weight` (and so the sensitivity scorers and
    :func:`apply_plan`) default to ``method`` ("absmax" or "mse")."""
    global _default_scale_method
    prev, _default_scale_method = _default_scale_method, _check_scale_method(method)
    try:
        yield
    finally:
        _default_scale_method = prev


def mse_row_scale(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row INT-``bits`` scale (``qmax / clip``) whose clip, a ratio from :data:`MSE_CLIP_RATIOS`
    of the row's amax, gives the least squared rounding error. Shape ``(rows, 1)``, float32."""
    fmt = int_format(bits)
    x = flat.float()
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = fmt.qmax / amax
    for r in MSE_CLIP_RATIOS:
        s = fmt.qmax / (amax * r)
        q = (x * s).round_().clamp_(fmt.qmin, fmt.qmax).div_(s)
        err = (q - x).square_().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def fake_quant_weight(weight: torch.Tensor, bits: int, method: str | None = None) -> torch.Tensor:
    """``weight`` rounded to symmetric per-output-channel INT-``bits`` and back (no gradient).

    Output channels are dim 0 (``nn.Linear``'s ``(out, in)``, a convolution's ``(out, in, *k)``);
    each gets its own scale over the rest of the tensor, round half to even: ``qmax / amax``
    (``method="absmax"``) or the MSE-optimal clipped scale (``"mse"``, :func:`mse_row_scale`).
    ``method=None`` takes the default that :func:`scale_method` sets ("absmax" outside it).
    """
    if weight.dim() < 2:
        raise ValueError(f"per-output-channel quantization needs a weight with 2 or more dims; got shape {tuple(weight.shape)}")
    method = _resolve_scale_method(method)
    w = weight.detach()
    flat = w.reshape(w.shape[0], -1)
    scale = None if method == "absmax" else mse_row_scale(flat, bits)
    return fake_quantize(flat, int_format(bits), scale, "row").reshape(w.shape)


class IntWeightFakeQuant(nn.Module):
    """Parametrization: ``W -> W + (Q_b(W) - W).detach()`` (value Q_b(W), gradient identity)."""

    def __init__(self, bits: int, method: str | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.method = _resolve_scale_method(method)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = fake_quant_weight(weight, self.bits, self.method).to(weight.dtype)
        return weight + (q - weight).detach()

    def extra_repr(self) -> str:
        return f"int{self.bits}, per-output-channel {self.method} scale, straight-through"


def _existing(module: nn.Module) -> IntWeightFakeQuant | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, IntWeightFakeQuant):
            return p
    return None


def planned_bits(module: nn.Module) -> int | None:
    """The QAT bit width applied to ``module``'s weight, or None."""
    p = _existing(module)
    return None if p is None else p.bits


def unknown_plan_names(model: nn.Module, plan: Mapping[str, Any]) -> list[str]:
    """The names in ``plan`` that are not qualified module names of ``model`` (the model itself,
    ``""``, is not a plannable layer), in plan order."""
    modules = dict(model.named_modules())
    return [n for n in plan if n == "" or n not in modules]


def plan_problems(model: nn.Module, plan: Mapping[str, Any]) -> dict[str, str]:
    """What keeps each known entry of ``plan`` from applying (module name -> why): a bit width
    :func:`bits_problem` rejects, or a module without a weight of 2 or more dims. Unknown names
    are :func:`unknown_plan_names`' business. Checks only: changes nothing."""
    modules = dict(model.named_modules())
    problems = {}
    for name, bits in plan.items():
        if name not in modules or name == "":
            continue
        problem = bits_problem(bits)
        w = getattr(modules[name], "weight", None)
        if problem is None and (not isinstance(w, torch.Tensor) or w.dim() < 2):
            shape = None if not isinstance(w, torch.Tensor) else tuple(w.shape)
            problem = f"{type(modules[name]).__name__} has no weight with 2+ dims (weight shape {shape})"
        if problem is not None:
            problems[name] = problem
    return problems


def apply_plan(
    model: nn.Module, plan: Mapping[str, int], recipe: Any = None, report: Any = None, *, method: str | None = None
) -> nn.Module:
    """Fake-quantize each planned module's weight at its planned bits (in place; returns ``model``).

    ``plan``: qualified module name -> bits. Every name must exist in ``model`` and name a module
    with a weight of 2 or more dimensions; all problems are reported together before anything
    is changed. A module planned twice gets the new bit width (no stacked rounding). Modules the
    recipe excludes (``[exclude] patterns``) are left alone and reported as skipped.
    ``report`` is a :class:`lowprec.recipes.ConversionReport` (``add``/``skip``), or None.
    ``method``: the per-channel scale rule, "absmax" or "mse" (None: the :func:`scale_method` default).
    """
    method = _resolve_scale_method(method)
    if not isinstance(plan, Mapping):
        raise TypeError(f"a plan maps qualified module names to bit widths; got {type(plan).__name__}")
    qformat = getattr(getattr(recipe, "qat", None), "format", "int")
    if qformat != "int":
        raise ValueError(f"recipe qat.format {qformat!r} is not supported; only 'int' (symmetric per-output-channel INT-k)")
    unknown = unknown_plan_names(model, plan)
    if unknown:
        raise KeyError(f"plan names modules that the model does not have: {', '.join(map(repr, unknown))}")
    problems = plan_problems(model, plan)
    if problems:
        raise ValueError("cannot apply the plan: " + "; ".join(f"plan[{n!r}]: {p}" for n, p in problems.items()))
    modules = dict(model.named_modules())
    for name, bits in plan.items():
        module = modules[name]
        if recipe is not None and hasattr(recipe, "excluded") and recipe.excluded(name):
            if report is not None:
                report.skip(name, "excluded by the recipe's [exclude] patterns (QAT plan not applied)")
            continue
        existing = _existing(module)
        if existing is not None:
            existing.bits, existing.method = bits, method
        else:
            parametrize.register_parametrization(module, "weight", IntWeightFakeQuant(bits, method))
        if report is not None:
            prev = getattr(report, "converted", {}).get(name)
            what = f"QAT fake-quant int{bits} per-output-channel {method} scale (STE)"
            report.add(name, f"{prev} + {what}" if prev and "QAT" not in prev else what)
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_plan`: bake nothing, restore the full-precision weights as plain parameters."""
    for _, module in model.named_modules():
        if _existing(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model
