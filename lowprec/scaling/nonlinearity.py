"""Scales of elementwise nonlinearities, computed from the op itself under N(0, 1) input.

Unit scaling divides a nonlinearity's output by its standard deviation when the input is
N(0, 1), so a unit input gives a unit output (Blake et al. 2023). Graphcore's library fits
closed-form curves for these; here they are computed by Gauss-Hermite quadrature on the very
function the model runs (``torch.nn.functional.gelu`` etc., in float64), so a new activation
only needs its callable.

For each op we return ``(output_scale, grad_scale)``: ``1 / std(f(X))`` and
``1 / rms(f'(X))``. Unit-scaled modules apply the output scale in forward and, where the edge
is not cut (design.md), the same scale to the gradient, which keeps the op a true scaled
function; the gradient figure is reported for inspection.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Probabilists' Gauss-Hermite nodes: exact for polynomials of degree < 2 * N_NODES; 160 nodes
# give ~1e-12 relative accuracy on the smooth activations below.
N_NODES = 160


@functools.lru_cache(maxsize=1)
def _nodes() -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.hermite_e.hermegauss(N_NODES)
    w = w / math.sqrt(2 * math.pi)  # weights of the standard normal density
    return torch.from_numpy(x).double(), torch.from_numpy(w).double()


def gaussian_moments(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``(E[f(X)], E[f(X)^2])`` for X ~ N(0, 1), by quadrature."""
    x, w = _nodes()
    y = fn(x)
    return float((w * y).sum()), float((w * y * y).sum())


def _grad_rms(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    x, w = _nodes()
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return math.sqrt(float((w * g.detach() ** 2).sum()))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


@functools.cache
def activation_scales(kind: str) -> tuple[float, float]:
    """``(1/std(f(X)), 1/rms(f'(X)))`` for an elementwise activation ``kind`` (see ``ACTIVATIONS``)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    fn = ACTIVATIONS[kind]
    mean, sq = gaussian_moments(fn)
    return 1.0 / math.sqrt(sq - mean * mean), 1.0 / _grad_rms(fn)


@functools.cache
def glu_scales(kind: str = "silu") -> tuple[float, float]:
    """Scales of a gated unit ``act(g) * u`` with independent g, u ~ N(0, 1) (SwiGLU for silu).

    The output has mean 0 and variance ``E[act(g)^2]``; the gradient to ``u`` has rms
    ``sqrt(E[act(g)^2])`` and to ``g`` ``sqrt(E[act'(g)^2])``: the grad scale returned is the
    one over the root-mean-square of both input gradients together.
    """
    fn = ACTIVATIONS[kind]
    _, sq = gaussian_moments(fn)
    g_rms = 1.0 / activation_scales(kind)[1]
    return 1.0 / math.sqrt(sq), 1.0 / math.sqrt(0.5 * (sq + g_rms * g_rms))


# Probe grid for recognising an activation module by what it computes (not by its class name):
# wide enough to separate GELU from its tanh approximation (they differ by up to ~5e-4 near |x| = 2).
_PROBE_X = torch.linspace(-6.0, 6.0, 241)
_PROBE_ATOL = 1e-5


def activation_kind(module: torch.nn.Module) -> str | None:
    """The ``ACTIVATIONS`` key of an elementwise activation module, recognised by running it on a
    fixed grid and comparing with each known function (so any Hugging Face or torch class that
    computes SiLU, GELU, tanh-GELU or ReLU is recognised); None when it computes none of them."""
    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.nn.Dropout):
        return None
    if any(True for _ in module.parameters()):
        return None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a probe must not move the RNG
            y = module(_PROBE_X.clone())
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE_X.shape:
        return None
    y = y.float()
    for kind, fn in ACTIVATIONS.items():
        ref = fn(_PROBE_X)
        if bool(((y - ref).abs() <= _PROBE_ATOL * (1.0 + ref.abs())).all()):
            return kind
    return None
