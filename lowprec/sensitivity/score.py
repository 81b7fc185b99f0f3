"""``score``: one entry point for the three scorers, returning a :class:`SensitivityReport`.

* ``"measured"``: the exact single-layer loss change (one forward per layer, bit width, batch).
* ``"pqi"``: the path-integral estimate (``points`` gradients per layer, bit width and batch).
* ``"hawq"``: HAWQ-V2, per-layer Hessian trace (Hutchinson with SEM stopping, or Hutch++) times
  the squared quantization perturbation over the layer size.

All three quantise weights to symmetric per-output-channel INT-k (:func:`lowprec.qat.fake_quant_weight`),
run in eval mode, and never write the model's parameters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lowprec.sensitivity.common import (
    LossEvaluator,
    LossFn,
    as_batch_list,
    check_bit_list,
    find_layers,
    layer_weight,
    progress_bar,
    quantized_weights,
    scoring_mode,
)
from lowprec.sensitivity.hessian import (
    LayerHessian,
    hawq_scores,
    hutchinson_traces,
    hutchpp_trace,
    top_eigenvalue,
)
from lowprec.sensitivity.measured import mean_loss, measured_change
from lowprec.sensitivity.pqi import pqi
from lowprec.sensitivity.report import METHODS, SensitivityReport
from lowprec.sensitivity.training_formats import FORMAT_METHODS, TrainingSensitivityReport, score_formats

#: Bit widths scored when neither ``bits`` nor ``formats`` is given.
DEFAULT_BITS = (2, 3, 4, 8)


def score(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    method: str = "pqi",
    bits: Sequence[int] | None = None,
    *,
    formats: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    include_embeddings: bool = False,
    points: int = 2,
    rule: str = "gauss-legendre",
    trace: str = "hutchinson",
    rel_tol: float = 0.1,
    abs_tol: float = 0.0,
    min_probes: int = 10,
    max_probes: int = 200,
    hutchpp_matvecs: int = 30,
    eigenvalue: bool = False,
    backend: str = "autograd",
    seed: int = 0,
    progress: bool = True,
) -> SensitivityReport | TrainingSensitivityReport:
    """Score every quantizable layer (or ``layers``) of ``model`` at each bit width (default
    ``bits=(2, 3, 4, 8)``), or, with ``formats=`` instead of ``bits``, each linear layer under each
    training format.

    ``formats`` (e.g. ``("nvfp4", "mxfp8", "bf16")``): the loss change when one linear layer's forward
    GEMM takes its weight and its input activation in that format (NVFP4: 16x16 weight blocks, 1x16
    activation blocks; MX: 1x32 along the reduction dimension; bf16: a cast), every other layer
    exact; ``method`` is ``"measured"`` or ``"pqi"`` (both perturb weight and activation), and the
    result is a :class:`~lowprec.sensitivity.training_formats.TrainingSensitivityReport` with each
    layer's FLOPs per token, what :func:`~lowprec.sensitivity.select_high_precision` reads.
    The LM head is left out unless named in ``layers`` (recipes keep it in high precision).

    ``loss_fn(model, batch)`` returns a scalar tensor; ``batches`` is a non-empty iterable (read
    several times, so it is materialised). PQI: ``points`` quadrature nodes of ``rule``.
    HAWQ: ``trace="hutchinson"`` (stop at SEM <= max(``rel_tol`` * |trace|, ``abs_tol``), between ``min_probes``
    and ``max_probes`` probes) or ``"hutch++"`` (``hutchpp_matvecs`` products over all batches);
    ``eigenvalue=True`` adds each layer's top Hessian eigenvalue (Lanczos, 20 products) to ``extra``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if formats is not None:
        if bits is not None:
            raise ValueError("give bits=... (integer bit widths) or formats=... (training formats), not both")
        if method not in FORMAT_METHODS:
            raise ValueError(f"method {method!r} does not score training formats (HAWQ's trace x ||dW||^2 has no "
                             f"activation term); use one of {', '.join(FORMAT_METHODS)}")
        return score_formats(model, loss_fn, batches, method, formats, layers=layers, points=points, rule=rule,
                             progress=progress)
    if bits is None:
        bits = DEFAULT_BITS
    if trace not in ("hutchinson", "hutch++"):
        raise ValueError(f"trace must be 'hutchinson' or 'hutch++'; got {trace!r}")
    bit_list = check_bit_list(bits)
    batch_list = as_batch_list(batches)
    found = find_layers(model, layers, include_embeddings)
    ev = LossEvaluator(model, loss_fn)
    weights = {n: layer_weight(m) for n, m in found.items()}
    params = {n: f"{n}.weight" for n in found}
    scores: dict[str, dict[int, float]] = {}
    extra: dict[str, dict[str, Any]] = {n: {} for n in found}
    meta: dict[str, Any] = {"bits": list(bit_list), "batches": len(batch_list), "layers": len(found),
                            "quantizer": "symmetric per-output-channel INT-k (lowprec.formats)"}
    t0 = time.perf_counter()
    with scoring_mode(model, second_order=(method == "hawq")):
        base = mean_loss(ev, batch_list, check=True)
        if method == "measured":
            work = progress_bar(total=len(found) * len(bit_list), desc="measured", enabled=progress)
            for n in found:
                q = quantized_weights(weights[n], bit_list)
                scores[n] = {}
                for b in bit_list:
                    scores[n][b] = measured_change(ev, batch_list, params[n], q[b], base)
                    work.update(1)
            work.close()
            meta["forward_passes"] = len(found) * len(bit_list) * len(batch_list) + len(batch_list)
        elif method == "pqi":
            grads = 0
            work = progress_bar(total=len(found) * len(bit_list), desc="pqi", enabled=progress)
            for n in found:
                q = quantized_weights(weights[n], bit_list)
                scores[n] = {}
                for b in bit_list:
                    total, _, used = pqi(ev, batch_list, params[n], weights[n], q[b], points, rule)
                    scores[n][b] = total
                    grads += used
                    work.update(1)
            work.close()
            meta.update(points=points, rule=rule, gradients=grads)
        else:
            names = [params[n] for n in found]
            if trace == "hutchinson":
                est, hvps = hutchinson_traces(model, loss_fn, batch_list, names, rel_tol=rel_tol, abs_tol=abs_tol,
                                              min_probes=min_probes, max_probes=max_probes, seed=seed,
                                              backend=backend, progress=progress)
                meta.update(rel_tol=rel_tol, abs_tol=abs_tol, min_probes=min_probes, max_probes=max_probes)
            else:
                oracle = LayerHessian(model, loss_fn, batch_list, names, backend=backend)
                est = {}
                for n in progress_bar(names, desc="hutch++", enabled=progress):
                    est[n] = hutchpp_trace(oracle.matvec(n), oracle.numel(n), hutchpp_matvecs, seed=seed,
                                           dtype=oracle.weights[n].dtype)
                hvps = oracle.count
            if eigenvalue:
                oracle = LayerHessian(model, loss_fn, batch_list, names, backend=backend)
                for n in progress_bar(found, desc="eigenvalue", enabled=progress):
                    extra[n]["top_eigenvalue"] = top_eigenvalue(oracle.matvec(params[n]), oracle.numel(params[n]),
                                                                iters=20, seed=seed, dtype=weights[n].dtype)
                meta["eigenvalue_hvps"] = oracle.count
            for n in found:
                e = est[params[n]]
                scores[n] = hawq_scores(e.trace, weights[n], quantized_weights(weights[n], bit_list))
                extra[n].update(trace=e.trace, trace_sem=e.sem, probes=e.probes)
            meta.update(trace_estimator=trace, hvps=hvps, backend=backend, hvps_per_layer={n: est[params[n]].probes for n in found})
    meta["time_s"] = time.perf_counter() - t0
    return SensitivityReport(
        method=method, bits=bit_list, scores=scores,
        n_params={n: weights[n].numel() for n in found}, rows={n: weights[n].shape[0] for n in found},
        base_loss=base, extra={n: e for n, e in extra.items() if e}, meta=meta,
    )


def pqi_elementwise(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    bits: int,
    *,
    layers: Sequence[str] | None = None,
    include_embeddings: bool = False,
    points: int = 2,
    rule: str = "gauss-legendre",
) -> dict[str, torch.Tensor]:
    """Element-wise PQI at one bit width: per layer a tensor shaped like its weight whose entry
    ``j`` is ``Delta_j * integral grad_j``; each sums to that layer's PQI score."""
    (b,) = check_bit_list(bits)
    batch_list = as_batch_list(batches)
    found = find_layers(model, layers, include_embeddings)
    ev = LossEvaluator(model, loss_fn)
    out = {}
    with scoring_mode(model):
        mean_loss(ev, batch_list, check=True)
        for n, m in found.items():
            w = layer_weight(m)
            q = quantized_weights(w, [b])[b]
            _, elem, _ = pqi(ev, batch_list, f"{n}.weight", w, q, points, rule, elementwise=True)
            out[n] = elem
    return out
