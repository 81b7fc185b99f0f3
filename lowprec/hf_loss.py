"""The unit-scaled language-model loss, for ``lm_loss`` and through a Hugging Face model's own forward.

Hugging Face users (and HF's ``Trainer``) compute the loss as ``model(input_ids, labels=labels).loss``.
HF's loss is the mean cross-entropy: its logit gradients shrink with the number of tokens
(1/N each), which in a unit-scaled model under FP16/FP8 is exactly the underflow unit scaling
exists to prevent. :func:`install` makes a converted HF causal or masked LM compute its
``labels=`` loss with :func:`lowprec.scaling.functional.cross_entropy` instead: the same value
HF reports (the mean over non-ignored tokens, or the sum over ``num_items_in_batch`` when the
Trainer passes it), with the unit-scaled gradient (Unit Scaling, Blake et al. 2023: the summed
loss's gradient times ``V / sqrt(V - 1)``, unit whatever the batch). ``ignore_index=-100``
masks padding as in HF.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here" (padding, prompt tokens, unmasked tokens)


def unit_scaled_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                     num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy of ``(N, V)`` logits against ``(N,)`` targets: the value is the mean over
    non-ignored targets (or their sum over ``num_items``), the gradient the unit-scaled one.

    The value is computed directly: a "value of the mean, gradient of the sum" written as
    ``sum + (mean - sum).detach()`` would keep only the sum's absolute precision (2^-10 at a sum
    of ~10^4: 1e-4 relative on the loss). ``unit - unit.detach()`` is exactly 0 and carries the
    unit-scaled gradient."""
    from lowprec.scaling.functional import cross_entropy as unit_cross_entropy

    logits = logits.float()
    unit = unit_cross_entropy(logits, targets, ignore_index=ignore_index)
    with torch.no_grad():
        if num_items is None:
            value = F.cross_entropy(logits, targets, ignore_index=ignore_index)
        else:
            total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
            value = total / torch.as_tensor(num_items, dtype=total.dtype, device=total.device)
    return value + (unit - unit.detach())


# Hugging Face head classes whose ``labels=`` loss is next-token (shifted) or masked-token
# cross-entropy, by the ending of the class name (HF's own convention, also its loss_type rule).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MASKED_SUFFIXES = ("ForMaskedLM",)


def lm_kind(model: nn.Module) -> str | None:
    """``"causal"``, ``"masked"``, or None for a model whose ``labels=`` loss lowprec does not replace."""
    name = type(model).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return "causal"
    if name.endswith(_MASKED_SUFFIXES):
        return "masked"
    return None


def install(model: nn.Module) -> bool:
    """Route ``model(..., labels=...)``'s loss through :func:`unit_scaled_loss`; True when installed.

    Only Hugging Face causal and masked LMs (:func:`lm_kind`) are changed; ``forward`` is replaced
    on the instance by a method bound to it (so ``copy.deepcopy`` binds the copy's to the copy), and
    the class, the state dict and ``save_pretrained`` are unchanged. The new forward runs the
    class's forward without ``labels`` and computes the loss from its logits (causal: tokens
    ``< n`` predict ``n``, as HF shifts them; ``shift_labels`` is honoured)."""
    kind = lm_kind(model)
    if kind is not None and not isinstance(model.__dict__.get("forward"), types.MethodType):
        model.forward = types.MethodType(_unit_loss_forward(kind, type(model).forward), model)
    return kind is not None


def _unit_loss_forward(kind: str, wrapped: Callable[..., Any]) -> Callable[..., Any]:
    """The forward :func:`install` binds: ``wrapped`` (the class's forward) without labels, then the
    unit-scaled loss. It carries ``wrapped``'s name and signature: HF's Trainer reads the signature
    to decide which dataset columns to pass and whether the model takes ``num_items_in_batch``."""
    def forward(self: nn.Module, *args: Any, labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                shift_labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        out = type(self).forward(self, *args, **kwargs)
        if labels is None and shift_labels is None:
            return out
        logits = out[0] if isinstance(out, tuple) else out.logits
        if kind == "causal":
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            targets = shift_labels
        else:
            targets = labels
        v = self.config.vocab_size
        loss = unit_scaled_loss(logits.reshape(-1, v), targets.reshape(-1).to(logits.device),
                                num_items=num_items_in_batch)
        if isinstance(out, tuple):  # return_dict=False: HF puts the loss first
            return (loss, *out)
        # a new output rather than out.loss = ...: HF's ModelOutput keys (and out[0]) hold only the
        # fields set when it was built, and the loss field comes first
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    return functools.wraps(wrapped)(forward)
