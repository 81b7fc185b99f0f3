"""Hessian-vector products, per-layer Hutchinson / Hutch++ traces, top eigenvalue (Lanczos), and
the HAWQ-V2 score.

* :func:`hvp`: ``H v`` for any set of parameters, through ``torch.func`` (``jvp`` of ``grad``,
  forward-over-reverse) or through double backward (``backend="autograd"``). BatchNorm and the
  other buffers are frozen (eval mode) so that the Hessian is that of a fixed function.
* :func:`hutchinson_traces`: ``Tr(H_ii)`` for each layer block ``i`` with *layer-local* Rademacher
  probes (zero outside the layer, so cross-layer blocks add no variance), stopped per layer when
  the standard error of the mean falls below ``rel_tol * |mean|`` (design.md: PyHessian's rule,
  the change of the running mean, stops early with up to 17% error). With the autograd backend
  one gradient graph per round serves every layer's probe (each probe then costs one double
  backward, ~8x cheaper than a fresh forward-over-reverse HVP on the demo Llama).
* :func:`hutchpp_trace` (Meyer, Musco, Musco, Woodruff 2021): a low-rank sketch takes the top of
  the spectrum exactly, Hutchinson the rest: error O(1/m) instead of O(1/sqrt(m)).
* :func:`top_eigenvalue`: Lanczos with full re-orthogonalisation on a layer block.
* :func:`hawq_scores`: HAWQ-V2 ``Omega_i(b) = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowprec.sensitivity.common import (
    LossEvaluator,
    LossFn,
    as_batch_list,
    check_loss,
    grads_or_zeros,
    progress_bar,
    scoring_mode,
)

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _params(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"parameters not found in the model: {', '.join(map(repr, missing))}")
    return {n: params[n].detach() for n in names}


def _second_order_error(e: Exception) -> Exception:
    msg = str(e)
    if "derivative for" in msg or "forward AD" in msg or "not implemented" in msg.lower():
        return RuntimeError(
            f"a Hessian-vector product needs second derivatives of every op in loss_fn, and one op has none: {msg.splitlines()[0]} "
            f"(for attention, build the model with attn_implementation='eager')"
        )
    return e


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vectors: Mapping[str, torch.Tensor],
    backend: str = "func",
) -> dict[str, torch.Tensor]:
    """``H v`` restricted to the parameters named in ``vectors`` (qualified parameter names).

    ``H`` is the Hessian of ``loss_fn(model, batch)`` with respect to those parameters only (the
    block of the full Hessian); pass every parameter for the full product. ``backend="func"``
    uses ``torch.func.jvp(torch.func.grad(f))``; ``"autograd"`` double backward.
    """
    if backend not in ("func", "autograd"):
        raise ValueError(f"backend must be 'func' or 'autograd'; got {backend!r}")
    primals = _params(model, list(vectors))
    for n, v in vectors.items():
        if v.shape != primals[n].shape:
            raise ValueError(f"vector for {n!r} has shape {tuple(v.shape)}; the parameter has {tuple(primals[n].shape)}")
    ev = LossEvaluator(model, loss_fn)
    tangents = {n: vectors[n].to(primals[n].dtype) for n in primals}
    with scoring_mode(model, second_order=True):
        check_loss(ev(batch))
        try:
            if backend == "func":
                _, out = torch.func.jvp(torch.func.grad(lambda p: ev(batch, p)), (primals,), (tangents,))
                return dict(out)
            leaves = {n: p.clone().requires_grad_(True) for n, p in primals.items()}
            grads = grads_or_zeros(ev(batch, leaves), list(leaves.values()), create_graph=True)
            dot = sum((g * tangents[n]).sum() for g, n in zip(grads, leaves))
            hv = grads_or_zeros(dot, list(leaves.values()))
            return {n: h.detach() for n, h in zip(leaves, hv)}
        except (RuntimeError, NotImplementedError) as e:
            raise _second_order_error(e) from e


class LayerHessian:
    """Products with the diagonal Hessian blocks ``H_ii`` of the mean loss over ``batches``.

    ``products(batch_index, {name: v})`` returns ``{name: H_ii(batch) v}`` for each layer named
    (parameter names), building one gradient graph for all of them (autograd backend) or one
    ``torch.func`` HVP per layer. ``count`` counts layer-local HVPs.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], names: Sequence[str],
                 backend: str = "autograd") -> None:
        if backend not in ("func", "autograd"):
            raise ValueError(f"backend must be 'func' or 'autograd'; got {backend!r}")
        self.model, self.loss_fn, self.backend = model, loss_fn, backend
        self.batches = as_batch_list(batches)
        self.weights = _params(model, names)
        self.ev = LossEvaluator(model, loss_fn)
        self.count = 0

    def numel(self, name: str) -> int:
        return self.weights[name].numel()

    def products(self, batch_index: int, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self.batches[batch_index % len(self.batches)]
        out: dict[str, torch.Tensor] = {}
        try:
            if self.backend == "func":
                for n, v in vectors.items():
                    w = self.weights[n]
                    _, hv = torch.func.jvp(torch.func.grad(lambda x, n=n: self.ev(batch, {n: x})), (w,), (v,))
                    out[n] = hv
                    self.count += 1
                return out
            leaves = {n: self.weights[n].clone().requires_grad_(True) for n in vectors}
            grads = grads_or_zeros(self.ev(batch, leaves), list(leaves.values()), create_graph=True)
            for i, (n, g) in enumerate(zip(leaves, grads)):
                self.count += 1
                last = i == len(leaves) - 1
                # A loss constant or linear in this weight gives a gradient without graph: H_ii = 0.
                (hv,) = grads_or_zeros(g, [leaves[n]], grad_outputs=vectors[n], retain_graph=not last)
                out[n] = hv.detach()
            return out
        except (RuntimeError, NotImplementedError) as e:
            raise _second_order_error(e) from e

    def matvec(self, name: str) -> Matvec:
        """``v -> H_ii v`` for the mean loss over all batches (a fixed matrix: for Hutch++ and Lanczos)."""

        def mv(v: torch.Tensor) -> torch.Tensor:
            v = v.reshape(self.weights[name].shape).to(self.weights[name].dtype)
            acc = torch.zeros_like(v)
            for i in range(len(self.batches)):
                acc += self.products(i, {name: v})[name]
            return (acc / len(self.batches)).reshape(-1)

        return mv


@dataclass
class TraceEstimate:
    """A stochastic trace estimate: mean, standard error of the mean, probes used (HVPs for Hutch++)."""

    trace: float
    sem: float
    probes: int
    converged: bool
    method: str = "hutchinson"

    def to_dict(self) -> dict[str, Any]:
        return dict(trace=self.trace, sem=self.sem, probes=self.probes, converged=self.converged, method=self.method)


def _rademacher(shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)


def hutchinson_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    names: Sequence[str],
    *,
    rel_tol: float = 0.05,
    abs_tol: float = 0.0,
    min_probes: int = 16,
    max_probes: int = 1000,
    seed: int = 0,
    backend: str = "autograd",
    progress: bool = False,
) -> tuple[dict[str, TraceEstimate], int]:
    """Per-layer ``Tr(H_ii)`` by Hutchinson with layer-local Rademacher probes.

    Probe ``k`` uses batch ``k mod len(batches)``, so the estimate is of the mean Hessian over
    the batches. A layer stops once it has ``min_probes`` probes and its standard error of the mean
    is at most ``max(rel_tol * |mean|, abs_tol)`` (``abs_tol`` lets layers whose trace is near zero,
    where a relative error means nothing, stop); ``max_probes`` caps it (``converged=False`` then).
    ``names`` are parameter names (``"layer.weight"``). Returns the estimates and the HVP count.
    """
    if not (rel_tol > 0) or not (abs_tol >= 0):
        raise ValueError(f"need rel_tol > 0 and abs_tol >= 0; got rel_tol={rel_tol!r}, abs_tol={abs_tol!r}")
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 <= min_probes <= max_probes; got min_probes={min_probes}, max_probes={max_probes}")
    oracle = LayerHessian(model, loss_fn, batches, names, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    done: dict[str, TraceEstimate] = {}
    bar = progress_bar(total=len(names), desc="hutchinson", enabled=progress)
    with scoring_mode(model, second_order=True):
        for b in oracle.batches:
            check_loss(oracle.ev(b))
        for k in range(max_probes):
            active = [n for n in names if n not in done]
            if not active:
                break
            vecs = {n: _rademacher(oracle.weights[n].shape, oracle.weights[n].dtype, gen) for n in active}
            hv = oracle.products(k, vecs)
            for n in active:
                samples[n].append(float((vecs[n] * hv[n]).sum()))
                s = samples[n]
                if len(s) >= min_probes:
                    mean, sem = _mean_sem(s)
                    ok = sem <= max(rel_tol * abs(mean), abs_tol)
                    if ok or len(s) >= max_probes:
                        done[n] = TraceEstimate(mean, sem, len(s), ok)
                        bar.update(1)
    bar.close()
    for n in names:
        if n not in done:
            mean, sem = _mean_sem(samples[n])
            done[n] = TraceEstimate(mean, sem, len(samples[n]), sem <= max(rel_tol * abs(mean), abs_tol))
    return {n: done[n] for n in names}, oracle.count


def _mean_sem(s: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(s, dtype=torch.float64)
    mean = float(t.mean())
    sem = float(t.std(unbiased=True) / math.sqrt(len(s))) if len(s) > 1 else math.inf
    return mean, sem


def hutchpp_trace(matvec: Matvec, n: int, num_matvecs: int = 30, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> TraceEstimate:
    """Hutch++ estimate of ``Tr(A)`` for a symmetric ``n x n`` operator given as ``matvec``.

    A third of the budget sketches ``Q = orth(A S)``; the trace on range(Q) is exact
    (``Tr(Q^T A Q)``) and Hutchinson with probes projected off range(Q) estimates the rest.
    ``sem`` is the standard error of that Hutchinson part.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 matrix-vector products; got {num_matvecs}")
    k = min(num_matvecs // 3, n)
    m = max(num_matvecs - 2 * k, 1)
    gen = torch.Generator().manual_seed(seed)
    S = _rademacher(torch.Size((n, k)), dtype, gen)
    AS = torch.stack([matvec(S[:, j]) for j in range(k)], dim=1)
    Q, _ = torch.linalg.qr(AS.double())
    Q = Q.to(dtype)
    AQ = torch.stack([matvec(Q[:, j]) for j in range(k)], dim=1)
    top = float((Q.double() * AQ.double()).sum())
    rest: list[float] = []
    if k < n:
        for _ in range(m):
            g = _rademacher(torch.Size((n,)), dtype, gen)
            g = g - Q @ (Q.T @ g)
            rest.append(float((g.double() * matvec(g).double()).sum()))
    if rest:
        mean, sem = _mean_sem(rest) if len(rest) > 1 else (rest[0], math.inf)
    else:
        mean, sem = 0.0, 0.0
    return TraceEstimate(top + mean, sem, 2 * k + len(rest), True, method="hutch++")


def top_eigenvalue(matvec: Matvec, n: int, iters: int = 30, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> float:
    """The largest eigenvalue of a symmetric operator by Lanczos (full re-orthogonalisation).

    ``iters`` matvecs (fewer when the Krylov space is exhausted); extreme eigenvalues converge
    first, typically to a few digits in 20 to 30 steps.
    """
    m = min(iters, n)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64)
    q /= q.norm()
    Qs = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = matvec(Qs[-1].to(dtype)).double()
        a = float(w @ Qs[-1])
        alphas.append(a)
        V = torch.stack(Qs, dim=1)
        w = w - V @ (V.T @ w)
        w = w - V @ (V.T @ w)
        b = float(w.norm())
        if j == m - 1 or b < 1e-10 * max(1.0, abs(a)):
            break
        betas.append(b)
        Qs.append(w / b)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1])


def hawq_scores(trace: float, weight: torch.Tensor, quantized: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """HAWQ-V2: ``Omega(b) = Tr(H)/n * ||Q_b(W) - W||^2`` (average Hessian eigenvalue times the
    squared quantization perturbation), for each bit width in ``quantized``."""
    n = weight.numel()
    w = weight.double()
    return {b: trace / n * float(((q.double() - w) ** 2).sum()) for b, q in quantized.items()}
