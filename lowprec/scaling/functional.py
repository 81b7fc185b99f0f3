"""Unit-scaled functional ops (Blake et al. 2023, "Unit Scaling"; u-muP, Blake et al. 2024).

Everything rests on one primitive, :func:`scaled`: multiply the value by ``fwd_scale`` in the
forward pass and the incoming gradient by ``bwd_scale`` in the backward pass. With
``fwd_scale == bwd_scale`` it is an ordinary multiplication; with different scales the
gradient is no longer that of the forward function but a constant multiple of it, which is
allowed only on "cut edges" (design.md): weights, biases and ops after the last residual add.

Each op below puts the scale that keeps its output (and the gradients of its inputs) at
unit variance when its inputs are unit variance. The scale rules are the published ones
(see design.md for the constants); nonlinearity scales come from
:mod:`lowprec.scaling.nonlinearity`. Scales are plain Python floats computed from shapes, so
``torch.compile`` sees constants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowprec.scaling.nonlinearity import ACTIVATIONS, activation_scales, glu_scales

__all__ = [
    "scaled",
    "scale_fwd",
    "scale_bwd",
    "linear_rule",
    "linear",
    "matmul",
    "add",
    "embedding",
    "layer_norm",
    "rms_norm",
    "activation",
    "gelu",
    "silu",
    "swiglu",
    "glu",
    "softmax",
    "dropout",
    "attention_output_scale",
    "attention_qk_grad_mult",
    "default_attention_mult",
    "scaled_dot_product_attention",
    "residual_weights",
    "residual_split",
    "residual_add",
    "transformer_residual_taus",
    "cross_entropy",
]


# ----------------------------------------------------------------------------------------------
# The primitive
# ----------------------------------------------------------------------------------------------


class _Scaled(torch.autograd.Function):
    """``y = x * fwd_scale``; ``dx = dy * bwd_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, fwd_scale: float, bwd_scale: float) -> Tensor:  # type: ignore[override]
        ctx.bwd_scale = bwd_scale
        return x * fwd_scale if fwd_scale != 1.0 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad * ctx.bwd_scale if ctx.bwd_scale != 1.0 else grad), None, None


def scaled(x: Tensor, fwd_scale: float, bwd_scale: float) -> Tensor:
    """Scale the value of ``x`` by ``fwd_scale`` and its gradient by ``bwd_scale`` (one autograd op)."""
    fwd_scale, bwd_scale = float(fwd_scale), float(bwd_scale)
    if fwd_scale == bwd_scale:
        return x if fwd_scale == 1.0 else x * fwd_scale
    return _Scaled.apply(x, fwd_scale, bwd_scale)


def scale_fwd(x: Tensor, scale: float) -> Tensor:
    """Scale the forward value only (the gradient passes through unchanged)."""
    return scaled(x, scale, 1.0)


def scale_bwd(x: Tensor, scale: float) -> Tensor:
    """Scale the gradient only (identity in forward)."""
    return scaled(x, 1.0, scale)


# ----------------------------------------------------------------------------------------------
# Matmuls
# ----------------------------------------------------------------------------------------------


def linear_rule(fan_in: int, fan_out: int, rows: int, readout: str | None = None) -> tuple[float, float, float]:
    """Unit-scaling rule for ``X(rows x fan_in) @ W.T -> (rows x fan_out)``.

    Returns ``(output_scale, grad_input_scale, grad_weight_scale)``. A hidden linear is a true
    scaled function: output and input-gradient scale are both ``fan_in**-0.5`` (the edge is not
    cut). A readout sits after the last residual add, so its input gradient is free:
    ``fan_out**-0.5``, with forward ``fan_in**-0.5`` (``readout="unit"``, Unit Scaling 2023) or
    ``1/fan_in`` (``readout="mup"``, u-muP 2024). The weight gradient is scaled by ``rows**-0.5``.
    """
    grad_weight = rows**-0.5
    if readout is None:
        s = fan_in**-0.5
        return s, s, grad_weight
    if readout == "unit":
        out = fan_in**-0.5
    elif readout == "mup":
        out = 1.0 / fan_in
    else:
        raise ValueError(f"readout rule must be 'unit' or 'mup', got {readout!r}")
    return out, fan_out**-0.5, grad_weight


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    output_scale: float,
    grad_input_scale: float,
    grad_weight_scale: float,
    bias_mult: float = 1.0,
    gemm: nn.Module | None = None,
) -> Tensor:
    """``output_scale * (x @ weight.T + bias_mult * bias)`` with explicit gradient scales.

    ``gemm`` is a GEMM backend (contract 1 in contracts.md, :mod:`lowprec.matmul.gemm`); ``None``
    means ``F.linear``. The scales are applied around the backend, so an FP8 or FP16 backend
    sees operands whose scale is set by the unit-scaling rule, not by the layer's init.
    """
    x = scale_bwd(x, grad_input_scale)
    weight = scale_bwd(weight, grad_weight_scale)
    if bias is not None:
        bias = scaled(bias, bias_mult, bias_mult * grad_weight_scale)
    y = F.linear(x, weight, bias) if gemm is None else gemm(x, weight, bias)
    return scale_fwd(y, output_scale)


def matmul(left: Tensor, right: Tensor, constrain: bool = True) -> Tensor:
    """Unit-scaled ``left @ right``: forward ``inner**-0.5``; the left gradient by
    ``right_cols**-0.5`` and the right gradient by ``left_rows**-0.5`` (or all three equal to
    the output scale when ``constrain``, which keeps it a true scaled function)."""
    inner = left.shape[-1]
    out = inner**-0.5
    if constrain:
        return torch.matmul(left, right) * out
    left = scale_bwd(left, right.shape[-1] ** -0.5)
    right = scale_bwd(right, left.shape[-2] ** -0.5)
    return scale_fwd(torch.matmul(left, right), out)


def add(a: Tensor, b: Tensor) -> Tensor:
    """Unit-scaled sum of two independent unit tensors: ``(a + b) / sqrt(2)`` (both directions)."""
    return (a + b) * 2**-0.5


# ----------------------------------------------------------------------------------------------
# Embedding and norms
# ----------------------------------------------------------------------------------------------


def embedding(ids: Tensor, weight: Tensor, padding_idx: int | None = None, output_scale: float = 1.0) -> Tensor:
    """Lookup with the weight gradient scaled by ``sqrt(vocab / tokens)`` (a row is hit
    ``tokens / vocab`` times on average); the output keeps the weight's scale (times
    ``output_scale``, which ``init="keep"`` uses to absorb a trained table's scale)."""
    tokens = max(ids.numel(), 1)
    weight = scale_bwd(weight, (weight.shape[0] / tokens) ** 0.5)
    return scale_fwd(F.embedding(ids, weight, padding_idx), output_scale)


def _affine_grad_scale(x: Tensor, normalized_numel: int) -> float:
    return (normalized_numel / max(x.numel(), 1)) ** 0.5


def layer_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    """LayerNorm, output unscaled; affine weight/bias gradients by ``sqrt(normalized / numel)``."""
    s = _affine_grad_scale(x, math.prod(normalized_shape))
    weight = scale_bwd(weight, s) if weight is not None else None
    bias = scale_bwd(bias, s) if bias is not None else None
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def rms_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float,
             weight_offset: float = 0.0) -> Tensor:
    """RMSNorm computed in fp32 like Hugging Face's (``(offset + weight) * (x / rms(x)).to(dtype)``),
    output unscaled; weight gradient by ``sqrt(normalized / numel)``. ``weight_offset`` is 1 for
    Gemma-style norms that store ``w`` and multiply by ``1 + w``."""
    dtype = x.dtype
    y = F.rms_norm(x.float(), normalized_shape, None, eps).to(dtype)
    if weight is None:
        return y
    w = scale_bwd(weight, _affine_grad_scale(x, math.prod(normalized_shape)))
    return (w + weight_offset if weight_offset else w) * y


# ----------------------------------------------------------------------------------------------
# Nonlinearities
# ----------------------------------------------------------------------------------------------


def activation(x: Tensor, kind: str, input_mult: float = 1.0, scale: float | None = None) -> Tensor:
    """``act(input_mult * x) / std(act(X))`` for X ~ N(0, 1): a true scaled function.

    ``input_mult`` lets ``init="keep"`` feed the activation the same values as the original
    model when the preceding linear's output has been rescaled. ``scale`` is the precomputed
    ``1 / std`` (modules compute it once, so a compiled graph sees a constant).
    """
    if scale is None:
        scale = activation_scales(kind)[0]
    if input_mult != 1.0:
        x = x * input_mult
    return ACTIVATIONS[kind](x) * scale


def gelu(x: Tensor, approximate: str = "none", input_mult: float = 1.0) -> Tensor:
    return activation(x, "gelu_tanh" if approximate == "tanh" else "gelu", input_mult)


def silu(x: Tensor, input_mult: float = 1.0) -> Tensor:
    return activation(x, "silu", input_mult)


def glu(gate: Tensor, up: Tensor, kind: str = "silu", gate_mult: float = 1.0, scale: float | None = None) -> Tensor:
    """Gated unit ``act(gate_mult * gate) * up / std`` with std computed for N(0, 1) inputs
    (``scale``: that ``1 / std``, precomputed by the module)."""
    if scale is None:
        scale = glu_scales(kind)[0]
    if gate_mult != 1.0:
        gate = gate * gate_mult
    return ACTIVATIONS[kind](gate) * up * scale


def swiglu(gate: Tensor, up: Tensor, gate_mult: float = 1.0) -> Tensor:
    """Unit-scaled SwiGLU: ``silu(gate) * up``, divided by its std under N(0, 1) inputs."""
    return glu(gate, up, "silu", gate_mult)


def _log_interp(alpha: float, lower: float, upper: float) -> float:
    """Geometric interpolation: ``lower`` at alpha = 0, ``upper`` at alpha = 1."""
    return math.exp(alpha * math.log(upper) + (1.0 - alpha) * math.log(lower))


def softmax(x: Tensor, dim: int = -1, mult: float = 1.0) -> Tensor:
    """Unit-scaled softmax of ``mult * x``. The output std of a softmax over ``n`` entries lies
    between ``1/n`` (flat, small logits) and ``1/sqrt(n)`` (one-hot, large logits); the scale
    interpolates geometrically between ``n`` and ``sqrt(n)`` with the logit scale ``mult``."""
    n = x.shape[dim]
    alpha = 1.0 / (1.0 + 4.0 / mult**2)
    out = _log_interp(alpha, n, n**0.5)
    return F.softmax(x * mult, dim=dim) * out


def dropout(x: Tensor, p: float = 0.0, training: bool = True) -> Tensor:
    """Dropout rescaled by ``(1 - p)**0.5`` both ways, so a unit input stays unit."""
    if not training or p == 0.0:
        return x
    return F.dropout(x, p, training) * (1.0 - p) ** 0.5


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _harmonic(n: int) -> float:
    if n <= 2048:
        return sum(1.0 / i for i in range(1, n + 1))
    return math.log(n) + 0.5772156649015329 + 1.0 / (2 * n)


def _flat_alpha(d_head: int, mult: float) -> float:
    # 0 while the logits q.k * mult/d_head are small (attention near uniform), 1 when peaked.
    return 1.0 / (1.0 + 4.0 * d_head / mult**2)


def attention_output_scale(kv_len: int, d_head: int, causal: bool, mult: float = 1.0) -> float:
    """Scale that makes attention over unit values unit.

    With near-uniform attention, query i averages ``n_i`` unit values, so its output std is
    ``n_i**-0.5``: the rms over a causal sequence is ``sqrt(H_n / n)`` (H_n the harmonic number;
    graphcore approximates it by ``log n``), and ``n**-0.5`` without a mask. Peaked attention
    copies one value (std 1); the scale interpolates between the two with the logit size.
    """
    n = max(int(kv_len), 1)
    flat = (n / _harmonic(n)) ** 0.5 if causal else n**0.5
    return _log_interp(_flat_alpha(d_head, mult), flat, 1.0)


# Default logit multiplier: logits q.k * mult / d_head have std mult / sqrt(d_head) for unit q, k.
# lowprec uses std 2 (mult = 2 * sqrt(d_head)), the midpoint of the flat/one-hot interpolation.
# Measured on the demo Llama at init: with mult = 1 (graphcore's default, near-uniform attention)
# the attention outputs grow to std 2.2, 3.5 and 4.0 in layers 2-4, because uniform causal
# attention writes running means into the residual stream, which are correlated across positions
# and do not shrink when averaged again; with std-2 logits every op output stays in [0.68, 1.25].
DEFAULT_LOGIT_STD = 2.0


def default_attention_mult(d_head: int) -> float:
    """``mult`` giving logits of std ``DEFAULT_LOGIT_STD`` for unit q and k."""
    return DEFAULT_LOGIT_STD * d_head**0.5


def attention_qk_grad_mult(d_head: int, mult: float = 1.0) -> float:
    """Extra gradient factor that brings q and k gradients to unit scale.

    With the output scale above and logit scale ``mult / d_head``, the exact gradients of q and
    k have rms about ``mult / sqrt(d_head)`` while attention is near flat (~0.1 for 64-wide heads
    and mult 1: graphcore's q/k gradients); the factor interpolates from its inverse to 1 as
    attention sharpens.
    q and k each feed only the attention, so the factor can be applied here and removed again
    in the q/k projections' input gradient (``UnitLinear.grad_input_mult``): every path from the
    residual split to the residual add keeps the same product of scales, so the gradient that
    reaches the residual stream is the exact one (no cut edge is needed).
    """
    return _log_interp(_flat_alpha(d_head, mult), d_head**0.5 / mult, 1.0)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    mult: float = 1.0,
    logit_scale: float | None = None,
    output_scale: float | None = None,
    qk_grad_mult: float = 1.0,
    dropout_p: float = 0.0,
) -> Tensor:
    """Unit-scaled SDPA on ``(batch, heads, seq, d_head)`` tensors (heads of k, v already repeated).

    Logits are ``q.k * logit_scale`` (default ``mult / d_head``, the u-muP rule, not
    ``1/sqrt(d_head)``); the output and the gradients of q, k, v are multiplied by
    ``output_scale`` (default :func:`attention_output_scale` from the key length), and the q, k
    gradients further by ``qk_grad_mult``. A causal mask passed as ``attn_mask`` (not
    ``is_causal``) needs ``output_scale`` from the caller. ``attn_mask`` is passed to SDPA unchanged (boolean or
    additive), so Hugging Face causal/padding/sliding-window masks keep their meaning.
    """
    d_head = query.shape[-1]
    if logit_scale is None:
        logit_scale = mult / d_head
    if output_scale is None:
        output_scale = attention_output_scale(key.shape[-2], d_head, is_causal, mult)
    query = scale_bwd(query, output_scale * qk_grad_mult)
    key = scale_bwd(key, output_scale * qk_grad_mult)
    value = scale_bwd(value, output_scale)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=logit_scale)
    return scale_fwd(out, output_scale)


# ----------------------------------------------------------------------------------------------
# Residuals
# ----------------------------------------------------------------------------------------------


def residual_weights(tau: float) -> tuple[float, float]:
    """``(branch_weight, skip_weight) = (tau / d, 1 / d)`` with ``d = sqrt(1 + tau**2)``."""
    d = (1.0 + tau * tau) ** 0.5
    return tau / d, 1.0 / d


def residual_split(x: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(branch_input, skip)``: identity in forward; in backward the branch gradient is weighted
    ``tau/d`` and the skip gradient ``1/d``, the same weights :func:`residual_add` applies in
    forward, moved one step earlier so the gradients inside the branch stay unit."""
    wb, ws = residual_weights(tau)
    return scale_bwd(x, wb), scale_bwd(x, ws)


def residual_add(branch: Tensor, skip: Tensor, tau: float) -> Tensor:
    """``branch * tau/d + skip / d`` in forward (gradients pass unweighted: see :func:`residual_split`)."""
    wb, ws = residual_weights(tau)
    return scale_fwd(branch, wb) + scale_fwd(skip, ws)


def transformer_residual_taus(n_layers: int, residual_mult: float = 1.0,
                              residual_attn_ratio: float = 1.0) -> list[tuple[float, float]]:
    """u-muP depth rule: ``[(tau_attn, tau_mlp)]`` per layer for an embedding followed by
    ``n_layers`` (attention, MLP) pairs.

    ``alpha_mlp = mult * sqrt(2 / (1 + r**2))``, ``alpha_attn = r * alpha_mlp``; branch i gets
    ``tau_i = alpha_i / sqrt(B/2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2)`` with ``B``
    the number of branches and ``n_attn``/``n_mlp`` those before it. Each attention branch then
    contributes the same variance to the final stream, each MLP branch too; all attention
    branches together contribute ``r**2`` times what all MLP branches do, and the two totals
    average ``residual_mult**2`` times the embedding's contribution.
    """
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp
    branches = 2 * n_layers
    out = []
    for layer in range(n_layers):
        taus = []
        for i in (2 * layer, 2 * layer + 1):
            n_attn, n_mlp = (i + 1) // 2, i // 2
            alpha = alpha_attn if i % 2 == 0 else alpha_mlp
            taus.append(alpha / (branches / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5)
        out.append((taus[0], taus[1]))
    return out


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, mult: float = 1.0) -> Tensor:
    """Unit-scaled cross-entropy of ``(N, V)`` logits against ``(N,)`` class indices.

    The returned value is the ordinary mean cross-entropy (of ``mult * logits``). The backward
    pass is that of the *summed* loss with the logit gradient multiplied by ``V / sqrt(V - 1)``:
    each logit gradient (``softmax - onehot``) then has unit scale whatever the batch size,
    which is what replaces loss scaling. Optimizers such as Adam are invariant to the constant.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, V); got {tuple(getattr(logits, 'shape', ()))}")
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy expects targets of shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}; "
            f"got {tuple(getattr(targets, 'shape', ()))}"
        )
    vocab = logits.shape[1]
    grad_scale = vocab / (vocab - 1) ** 0.5 if vocab > 1 else 1.0
    logits = scaled(logits, mult, grad_scale)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp_min(1).to(total.dtype)
    mean = total / count
    # value of the mean (exact: the added term is zero in value), gradient of the sum
    return mean.detach() + (total - total.detach())
