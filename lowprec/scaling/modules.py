"""Unit-scaled modules: thin ``nn.Module`` shells over :mod:`lowprec.scaling.functional`.

They keep the parameter names (and shapes) of the modules they replace (``weight``, ``bias``),
so a converted Hugging Face model's ``state_dict`` still loads into the original class.
Scales are plain float attributes computed from shapes at call time; the ``*_mult``
attributes are 1 for a model trained from scratch (``init="unit"``) and absorb the scale of
existing weights under ``init="keep"`` (see :mod:`lowprec.scaling.convert`).

Every module here is an "op" for :func:`lowprec.inspect.inspect` (``lowprec_op = True``) and
declares the u-muP role of each of its parameters in ``lowprec_param_roles`` (read by
:func:`lowprec.scaling.param_groups`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowprec.scaling import functional as U
from lowprec.scaling.nonlinearity import ACTIVATIONS, activation_scales, glu_scales

ROLES = ("hidden", "embedding", "readout", "norm", "bias")


class UnitOp(nn.Module):
    """Base of lowprec's unit-scaled ops."""

    lowprec_op = True

    def __init__(self) -> None:
        super().__init__()
        self.lowprec_param_roles: dict[str, str] = {}
        self.lowprec_depth: int | None = None  # number of layers when inside a residual stack


class UnitLinear(UnitOp):
    """A unit-scaled linear layer; weights are N(0, 1) under ``init="unit"``.

    ``y = s * (x @ W.T + bias_mult * b)`` with ``s = out_mult * fan_in**-0.5`` (hidden) or the
    readout rule. Holds ``gemm`` (contract 1): ``None`` runs ``F.linear``; a backend from
    :mod:`lowprec.matmul` runs the matmul in FP16/FP8 between the unit scales.
    ``transposed=True`` stores the weight as ``(in, out)``, Hugging Face ``Conv1D``'s layout.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, readout: str | None = None,
                 transposed: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.readout = readout  # None (hidden), "unit" or "mup"
        self.transposed = transposed
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.gemm: nn.Module | None = None
        self.out_mult = 1.0
        self.bias_mult = 1.0
        self.grad_input_mult = 1.0
        nn.init.normal_(self.weight)
        self._set_roles()

    def _set_roles(self) -> None:
        self.lowprec_param_roles = {"weight": "readout" if self.readout else "hidden"}
        if self.bias is not None:
            self.lowprec_param_roles["bias"] = "bias"

    @classmethod
    def wrap(cls, module: nn.Module, readout: str | None = None) -> UnitLinear:
        """A UnitLinear sharing the parameters of an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
        new = cls.__new__(cls)
        UnitOp.__init__(new)
        transposed = not isinstance(module, nn.Linear)
        w = module.weight
        new.in_features, new.out_features = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        new.readout, new.transposed = readout, transposed
        new.weight = w
        new.bias = module.bias
        new.gemm = getattr(module, "gemm", None)
        new.out_mult = new.bias_mult = new.grad_input_mult = 1.0
        new._set_roles()
        return new

    def rule(self, rows: int) -> tuple[float, float, float]:
        """(output, grad-input, grad-weight) scales for ``rows`` input rows, multipliers included."""
        out, gin, gw = U.linear_rule(self.in_features, self.out_features, rows, self.readout)
        out *= self.out_mult
        if self.readout is None:
            gin = out  # not a cut edge: a true scaled function
        return out, gin * self.grad_input_mult, gw

    def forward(self, x: Tensor) -> Tensor:
        rows = max(x.numel() // self.in_features, 1)
        out, gin, gw = self.rule(rows)
        w = self.weight.t() if self.transposed else self.weight
        return U.linear(x, w, self.bias, output_scale=out, grad_input_scale=gin, grad_weight_scale=gw,
                        bias_mult=self.bias_mult, gemm=self.gemm)

    def extra_repr(self) -> str:
        kind = f"readout={self.readout}" if self.readout else "hidden"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, out_mult={self.out_mult:.4g}")


class UnitEmbedding(UnitOp):
    """Lookup table with N(0, 1) rows; weight gradient scaled by ``sqrt(vocab / tokens)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        self.out_mult = 1.0
        self.lowprec_param_roles = {"weight": "embedding"}

    @classmethod
    def wrap(cls, module: nn.Embedding) -> UnitEmbedding:
        new = cls.__new__(cls)
        UnitOp.__init__(new)
        new.num_embeddings, new.embedding_dim = module.weight.shape
        new.padding_idx = module.padding_idx
        new.weight = module.weight
        new.out_mult = 1.0
        new.lowprec_param_roles = {"weight": "embedding"}
        return new

    def forward(self, ids: Tensor) -> Tensor:
        return U.embedding(ids, self.weight, self.padding_idx, self.out_mult)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, out_mult={self.out_mult:.4g}"


class UnitRMSNorm(UnitOp):
    """RMSNorm with the affine weight's gradient scaled; ``eps`` is rescaled under ``init="keep"``.

    ``weight_offset``: the gain is ``weight_offset + weight`` (1 for Gemma's ``1 + w`` norms, whose
    stored weight starts at 0), so the parameter keeps its meaning and its state-dict value."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset))
        self.eps = eps
        self.weight_offset = float(weight_offset)
        self.grad_mult = 1.0  # fan-out rule, see ResidualAdd.split_grad_mult
        self.lowprec_param_roles = {"weight": "norm"}

    @classmethod
    def wrap(cls, module: nn.Module, weight_offset: float = 0.0) -> UnitRMSNorm:
        new = cls.__new__(cls)
        UnitOp.__init__(new)
        weight = getattr(module, "weight", None)
        new.weight = weight
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        new.eps = float(eps) if eps is not None else torch.finfo(torch.float32).eps
        new.weight_offset = float(weight_offset)
        new.lowprec_param_roles = {"weight": "norm"} if weight is not None else {}
        new.grad_mult = 1.0
        return new

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[-1],)
        y = U.rms_norm(x, shape, self.weight, self.eps, self.weight_offset)
        return U.scale_bwd(y, self.grad_mult)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset:g}" if self.weight_offset else ""
        return f"{tuple(self.weight.shape) if self.weight is not None else None}, eps={self.eps:.4g}{offset}"


class UnitLayerNorm(UnitOp):
    """LayerNorm with the affine gradients scaled; ``eps`` is rescaled under ``init="keep"``."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape))
        self.eps = eps
        self.grad_mult = 1.0  # fan-out rule, see ResidualAdd.split_grad_mult
        self.lowprec_param_roles = {"weight": "norm", "bias": "bias"}

    @classmethod
    def wrap(cls, module: nn.LayerNorm) -> UnitLayerNorm:
        new = cls.__new__(cls)
        UnitOp.__init__(new)
        w = getattr(module, "weight", None)
        shape = getattr(module, "normalized_shape", None)
        new.normalized_shape = tuple(shape) if shape is not None else tuple(w.shape)
        new.weight, new.bias = w, getattr(module, "bias", None)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))
        new.eps = float(eps)
        new.lowprec_param_roles = {k: r for k, r in (("weight", "norm"), ("bias", "bias"))
                                   if getattr(new, k) is not None}
        new.grad_mult = 1.0
        return new

    def forward(self, x: Tensor) -> Tensor:
        y = U.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return U.scale_bwd(y, self.grad_mult)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps:.4g}"


class UnitActivation(UnitOp):
    """Elementwise activation divided by its std under N(0, 1) input (``kind`` in ``ACTIVATIONS``)."""

    def __init__(self, kind: str, input_mult: float = 1.0) -> None:
        super().__init__()
        if kind not in ACTIVATIONS:
            raise ValueError(f"unknown activation {kind!r}; known: {', '.join(sorted(ACTIVATIONS))}")
        self.kind, self.input_mult = kind, input_mult
        self.scale = activation_scales(kind)[0]  # a Python float, computed once

    def forward(self, x: Tensor) -> Tensor:
        return U.activation(x, self.kind, self.input_mult, self.scale)

    def extra_repr(self) -> str:
        return f"{self.kind}, input_mult={self.input_mult:.4g}"


class UnitGLU(UnitOp):
    """Gated unit ``act(gate) * up`` (SwiGLU for ``kind="silu"``), unit-scaled. Called as
    ``glu(gate, up)``; it replaces a Llama MLP's ``act_fn`` so the MLP keeps its HF child names."""

    def __init__(self, kind: str = "silu", gate_mult: float = 1.0) -> None:
        super().__init__()
        self.kind, self.gate_mult = kind, gate_mult
        self.scale = glu_scales(kind)[0]  # a Python float, computed once

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return U.glu(gate, up, self.kind, self.gate_mult, self.scale)

    def extra_repr(self) -> str:
        return f"{self.kind}, gate_mult={self.gate_mult:.4g}"


class UnitSDPA(UnitOp):
    """Unit-scaled scaled-dot-product attention as a module (so :func:`lowprec.inspect.inspect` sees it).

    ``logit_scale`` None means the u-muP rule ``mult / d_head`` (``mult`` None: logits of std 2 at
    init, see ``functional.DEFAULT_LOGIT_STD``); ``output_scale`` None means the
    rule from the key length at call time (``init="keep"`` fixes both to reproduce the original).
    """

    def __init__(self, mult: float | None = None, causal: bool = True, qk_grad_mult: float = 1.0) -> None:
        super().__init__()
        self.mult, self.causal, self.qk_grad_mult = mult, causal, qk_grad_mult
        self.logit_scale: float | None = None
        self.output_scale: float | None = None

    def scales(self, kv_len: int, d_head: int) -> tuple[float, float]:
        mult = self.mult if self.mult is not None else U.default_attention_mult(d_head)
        logit = self.logit_scale if self.logit_scale is not None else mult / d_head
        out = self.output_scale if self.output_scale is not None else U.attention_output_scale(
            kv_len, d_head, self.causal, mult)
        return logit, out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
        logit, out = self.scales(k.shape[-2], q.shape[-1])
        return U.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, logit_scale=logit, output_scale=out,
                                              qk_grad_mult=self.qk_grad_mult, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return (f"mult={self.mult}, causal={self.causal}, qk_grad_mult={self.qk_grad_mult:.4g}, "
                f"logit_scale={self.logit_scale}, output_scale={self.output_scale}")


class ResidualAdd(UnitOp):
    """``branch * tau/d + skip / d`` (forward); :meth:`split` is the matching
    :func:`lowprec.scaling.functional.residual_split` for the branch input.

    Fan-out rule (lowprec's, not graphcore's): when the branch's first op (a norm) feeds ``k``
    projections (q, k, v: ``k = 3``; gate and up: ``k = 2``), its output gradient is a sum of
    ``k`` unit gradients, std ``sqrt(k)``, which graphcore leaves as is. Conversion sets the
    norm's ``grad_mult = k**-0.5`` (the backward twin of the unit add's ``2**-0.5``) and this
    module's ``split_grad_mult = k**0.5``, so inside the branch gradients are unit while the
    gradient reaching the residual stream is exactly the true one.
    """

    def __init__(self, tau: float = 1.0, split_grad_mult: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.split_grad_mult = float(split_grad_mult)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        wb, ws = U.residual_weights(self.tau)
        return U.scale_bwd(x, wb * self.split_grad_mult), U.scale_bwd(x, ws)

    def forward(self, branch: Tensor, skip: Tensor) -> Tensor:
        return U.residual_add(branch, skip, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau:.4g}, split_grad_mult={self.split_grad_mult:.4g}"
