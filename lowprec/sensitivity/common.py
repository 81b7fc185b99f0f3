"""Shared plumbing for the sensitivity scorers: which layers, how a loss is evaluated with one
weight swapped, input checks, and the scoring mode (eval, parameters frozen).

Every scorer evaluates ``loss_fn(model, batch)`` with some weights *substituted* through
``torch.func.functional_call``; the model's own parameters are never written, so scoring leaves
the model exactly as it was (a failed run too).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lowprec.qat import check_bits, fake_quant_weight

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap the model's weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class LossEvaluator:
    """``loss(batch, {param_name: tensor})``: the loss with those parameters replaced."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> scalar tensor; got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self._wrapper = _LossModule(model, loss_fn)

    def __call__(self, batch: Any, overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if not overrides:
            return self.loss_fn(self.model, batch)
        return functional_call(self._wrapper, {f"model.{k}": v for k, v in overrides.items()}, (batch,))


def grads_or_zeros(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    grad_outputs: torch.Tensor | None = None,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> list[torch.Tensor]:
    """``d output / d inputs`` by ``torch.autograd.grad``, with zeros for every input the output does
    not reach.

    A layer the loss never uses (a Hugging Face ``BertModel``'s pooler when the loss reads
    ``last_hidden_state``, an unused head) has zero gradient and zero Hessian; plain
    ``torch.autograd.grad`` raises instead, both when that layer is the only input (the output then
    has no graph at all: "element 0 of tensors does not require grad") and when it is one of
    several. A zero has no graph, so a second derivative through it is zero as well.
    """
    inputs = list(inputs)
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def check_loss(loss: Any, where: str = "loss_fn(model, batch)") -> float:
    """The loss as a float; a clear error when it is not a finite scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where} must return a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(f"{where} must return a scalar (0-dim) tensor; got shape {tuple(loss.shape)} "
                         f"(reduce it, e.g. with .mean())")
    value = float(loss.detach().float().reshape(()))
    if not math.isfinite(value):
        raise ValueError(f"{where} returned a non-finite loss ({value}); sensitivity needs a finite loss at the "
                         f"unquantized weights")
    return value


def as_batch_list(batches: Iterable[Any]) -> list[Any]:
    """Materialise ``batches`` (scorers pass over them several times); an empty iterable is an error."""
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of batches (e.g. a list); got a single tensor. "
                        "Wrap it: batches=[x]")
    try:
        out = list(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    if not out:
        raise ValueError("batches is empty: sensitivity scoring needs at least one batch to evaluate loss_fn on")
    return out


def check_bit_list(bits: Sequence[int] | int) -> tuple[int, ...]:
    """Sorted, de-duplicated bit widths, each supported by the format layer."""
    if isinstance(bits, int) and not isinstance(bits, bool):
        bits = (bits,)
    try:
        items = list(bits)
    except TypeError:
        raise TypeError(f"bits must be a bit width or a sequence of them; got {bits!r}") from None
    if not items:
        raise ValueError("bits is empty: give at least one bit width, e.g. bits=(2, 3, 4, 8)")
    return tuple(sorted({check_bits(b, where="bits") for b in items}))


def find_layers(
    model: nn.Module, names: Sequence[str] | None = None, include_embeddings: bool = False
) -> dict[str, nn.Module]:
    """The quantizable layers: modules with a ``weight`` of 2+ dims (Linear-like), embeddings only
    when asked. A weight shared by two modules (tied embeddings) is listed once, under its first name."""
    modules = dict(model.named_modules())
    if names is not None:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            raise KeyError(f"layers not found in the model: {', '.join(map(repr, unknown))}")
        out = {}
        for n in names:
            w = getattr(modules[n], "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 2:
                raise ValueError(f"layer {n!r} ({type(modules[n]).__name__}) has no weight with 2+ dims to quantize")
            out[n] = modules[n]
        return out
    out, seen = {}, set()
    for n, m in modules.items():
        if not n:
            continue
        w = m._parameters.get("weight") if "weight" in m._parameters else getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not w.is_floating_point():
            continue
        if isinstance(m, _EMBEDDING_TYPES) and not include_embeddings:
            continue
        if id(w) in seen:
            continue
        seen.add(id(w))
        out[n] = m
    if not out:
        raise ValueError(f"{type(model).__name__} has no layer with a 2-D+ weight to score")
    return out


def layer_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def quantized_weights(weight: torch.Tensor, bits: Sequence[int]) -> dict[int, torch.Tensor]:
    """Symmetric per-output-channel INT-k copies of ``weight`` for each bit width."""
    return {b: fake_quant_weight(weight, b).to(weight.dtype) for b in bits}


@contextlib.contextmanager
def scoring_mode(model: nn.Module, second_order: bool = False) -> Iterator[None]:
    """Eval mode (BatchNorm uses its running statistics and never updates them; dropout off) and
    every parameter's ``requires_grad`` off (the scorers differentiate substituted tensors only).
    ``second_order``: a Hugging Face model using ``sdpa`` attention runs eager attention instead
    (torch's CPU SDPA kernel has no second derivative; eager is the same function)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    old_attn = getattr(config, "_attn_implementation", None)
    switched = second_order and old_attn == "sdpa"
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        if switched:
            config._attn_implementation = "eager"
        yield
    finally:
        if switched:
            config._attn_implementation = old_attn
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def progress_bar(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm bar (or a plain pass-through when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)
