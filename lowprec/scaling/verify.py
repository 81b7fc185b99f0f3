"""The conversion checks itself: under ``init="keep"`` the model must compute the same function.

:func:`record` runs a small probe batch through the model and keeps every module's output
(forward hooks); after conversion :func:`check_same_function` runs it again. The model's output
must match to float32 rounding (:data:`RTOL`, relative to its largest value); if it does not,
:class:`UnitScalingMismatch` names the largest deviation and the first module, in execution
order, whose output is no longer a constant multiple of the original's: under ``init="keep"``
intermediate outputs legitimately differ by a scale factor (that is the point of unit
scaling), so each module is compared after the best-fitting scalar is divided out.

The probe is two sequences of :data:`PROBE_TOKENS` token ids (a Hugging Face model with a
``vocab_size``) or two feature rows (a model that starts with a linear layer): two extra
forward passes, cheap at demo sizes. Models with neither are not probed (the report says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lowprec.errors import RecipeError

RTOL = 1e-4  # float32 rounding over a few layers stays near 1e-6; a wrong rule moves outputs by >1e-2
PROBE_TOKENS = 16
PROBE_ROWS = 2
PROBE_SEED = 20231  # the probe draws from its own generator: the global RNG is not touched

# Converted modules that replace a module of another meaning under the same name (a GLU replaces
# the activation of a gated MLP and returns act(gate) * up): not comparable to the original.
_NOT_COMPARABLE = ("UnitGLU",)


class UnitScalingMismatch(RecipeError):
    """Conversion under ``init="keep"`` changed the model's function beyond float32 rounding."""

    def __init__(self, message: str, module: str, deviation: float) -> None:
        super().__init__(message)
        self.module, self.deviation = module, deviation

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.module, self.deviation)


def probe_inputs(model: nn.Module) -> tuple[Tensor, ...] | None:
    """A small deterministic input batch for ``model``, or None when its input is unknown."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(PROBE_SEED)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        length = min(PROBE_TOKENS, limit) if isinstance(limit, int) and limit > 0 else PROBE_TOKENS
        return (torch.randint(0, vocab, (PROBE_ROWS, length), generator=g).to(device),)
    leaf = next((m for m in model.modules() if not list(m.children())), None)
    if isinstance(model, nn.Sequential) and isinstance(leaf, nn.Linear):
        return (torch.randn(PROBE_ROWS, leaf.in_features, generator=g).to(device, param.dtype),)
    return None


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((t for v in values if (t := _first_tensor(v)) is not None), None)


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def record(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[tuple[str, str, Tensor]]:
    """``(module name, class name, first output tensor)`` of every module, in the order their
    forwards finish (the model itself, named ``""``, last), in eval mode."""
    outs: list[tuple[str, str, Tensor]] = []
    seen: set[str] = set()

    def hook(name: str):
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out)
            if name not in seen and t is not None and t.is_floating_point():
                seen.add(name)
                outs.append((name, type(module).__name__, t.detach().float().clone()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with _eval(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return outs


def _deviation(got: Tensor, ref: Tensor, scale_free: bool) -> float:
    if scale_free:
        denom = float((ref * ref).sum())
        ref = ref * (float((got * ref).sum()) / denom if denom > 0 else 1.0)
    peak = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    return diff / peak if peak > 0 else diff


def check_same_function(reference: list[tuple[str, str, Tensor]], model: nn.Module,
                        inputs: tuple[Tensor, ...], rtol: float = RTOL) -> float:
    """Raise :class:`UnitScalingMismatch` unless ``model`` reproduces ``reference``'s output to
    ``rtol``; returns the output's relative deviation."""
    ref = {name: t for name, _, t in reference}
    got = record(model, inputs)
    final = next((t for name, _, t in got if name == ""), None)
    if final is None or ref.get("") is None or final.shape != ref[""].shape:
        raise UnitScalingMismatch(f"unit-scaling conversion changed the shape of {type(model).__name__}'s output",
                                  "", float("inf"))
    dev = _deviation(final, ref[""], scale_free=False)
    if dev <= rtol:
        return dev
    per_module = [(name, _deviation(t, ref[name], scale_free=True)) for name, cls, t in got
                  if name and name in ref and cls not in _NOT_COMPARABLE and t.shape == ref[name].shape]
    where = next((n for n, d in per_module if d > rtol), "")
    worst = max(per_module, key=lambda nd: nd[1], default=("", dev))
    where_text = (f"it first appears at {where!r} ({dict(per_module)[where]:.3g} relative, after dividing out the "
                  f"expected scale factor)" if where else "no single module's output shows it")
    raise UnitScalingMismatch(
        f"unit scaling under init='keep' changed {type(model).__name__}'s function: its output differs by "
        f"{dev:.3g} relative (allowed: {rtol:g}, float32 rounding); {where_text}; the largest module deviation is "
        f"{worst[1]:.3g} at {worst[0]!r}. The model was left unconverted. This is a conversion rule that does not "
        f"fit this model: please report it; set unit_scaling.verify = false to convert anyway",
        where, dev)
