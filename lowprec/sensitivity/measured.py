"""The measured baseline: quantise one layer, run the loss, subtract the unquantized loss.

Exact for a single layer (one forward pass per layer, bit width and batch), so it is the
reference every other scorer is judged against layer by layer. Layers do not add up exactly
(design.md: the joint change was 0.6 to 3x the sum), so across layers the judge is regret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lowprec.sensitivity.common import LossEvaluator, check_loss


@torch.no_grad()
def mean_loss(ev: LossEvaluator, batches: Sequence[Any], overrides: Mapping[str, torch.Tensor] | None = None,
              check: bool = False) -> float:
    """Mean of ``loss_fn`` over ``batches`` with ``overrides`` substituted (a float)."""
    total = 0.0
    for batch in batches:
        loss = ev(batch, overrides)
        total += check_loss(loss) if check else float(loss.detach().float().reshape(()))
    return total / len(batches)


@torch.no_grad()
def measured_change(ev: LossEvaluator, batches: Sequence[Any], param: str, quantized: torch.Tensor,
                    base_loss: float) -> float:
    """``L(W with param <- quantized) - L(W)`` over ``batches`` (``base_loss`` is ``L(W)``)."""
    return mean_loss(ev, batches, {param: quantized}) - base_loss


def plan_loss(model: torch.nn.Module, loss_fn, batches, plan: Mapping[str, int]) -> float:
    """The true loss with every layer in ``plan`` quantised at once (eval mode, model untouched):
    what a plan is judged by when computing regret."""
    from lowprec.sensitivity.common import as_batch_list, find_layers, quantized_weights, scoring_mode

    batches = as_batch_list(batches)
    layers = find_layers(model, list(plan))
    ev = LossEvaluator(model, loss_fn)
    overrides = {f"{n}.weight": quantized_weights(m.weight.detach(), [plan[n]])[plan[n]] for n, m in layers.items()}
    with scoring_mode(model):
        return mean_loss(ev, batches, overrides, check=True)
