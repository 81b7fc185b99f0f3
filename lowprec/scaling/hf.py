"""The unit-scaled forwards: one generic block, one gated MLP, one attention function.

A converted block keeps its class (a subclass is swapped in, see :func:`swap_class`), its
children and its parameter names; only ``forward`` changes, to :class:`UnitBlockMixin`'s,
which runs the block's :class:`lowprec.scaling.blocks.BlockSpec`:

* each residual add is a :class:`ResidualAdd` (tau-weighted, with ``residual_split`` for the
  branch input), wherever the norms sit (pre-norm, post-norm, sandwich, post-branch);
* attention keeps the family's own forward (projections, q/k norms, RoPE variant, GQA, KV
  cache) and only its attention function changes: the core's config copy names
  :data:`ATTENTION_IMPLEMENTATION`, registered with Hugging Face's ``AttentionInterface``, which
  runs :class:`UnitSDPA` with the mask Hugging Face built (boolean or additive, causal / padding
  / sliding window) passed on unchanged; RoPE's adds are not residuals and are not rescaled;
* a gated MLP (separate or fused gate/up) runs :class:`UnitGLUMLPMixin` (one two-input
  :class:`UnitGLU`); a plain MLP keeps its own forward around a :class:`UnitActivation`.

No family has a forward of its own here: Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-2, BERT,
OLMo 2, Granite, StableLM, Starcoder2 all run these three. These are the places where
graphcore's traced transform goes wrong on HF Llama (design.md).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from lowprec.scaling import functional as U

ATTENTION_IMPLEMENTATION = "lowprec_unit"

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the class ``Unit<Original>`` = (mixin, original class), in place."""
    cls = type(module)
    if issubclass(cls, mixin):
        return module
    key = (mixin, cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Unit{cls.__name__}", (mixin, cls), {"__module__": __name__})
    module.__class__ = _CLASS_CACHE[key]
    return module


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa_call(sdpa: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
               dropout_p: float) -> Tensor:
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != k.shape[-2]:
        mask = mask[..., : k.shape[-2]]
    is_causal = False
    if causal and mask is None and q.shape[-2] > 1:  # a branch, so a Python bool under dynamic shapes too
        is_causal = True
    return sdpa(q, k, v, mask, is_causal, dropout_p)


def unit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Hugging Face attention-function signature over ``module.sdpa`` (a :class:`UnitSDPA`):
    ``(batch, heads, seq, d)`` in, ``(batch, seq, heads, d)`` out. GQA from the head counts.

    ``module.lowprec_qk_undo`` (fused q/k/v projections): the SDPA's extra q/k gradient factor is
    undone here, so the one GEMM that made q, k and v sees their exact relative gradients.
    ``scaling`` (the family's logit scale) is replaced by the unit-scaling rule (or, under
    ``init="keep"``, by the value fixed at conversion)."""
    del scaling, kwargs
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    undo = module.lowprec_qk_undo
    if undo != 1.0:
        query, key = U.scale_bwd(query, undo), U.scale_bwd(key, undo)
    out = _sdpa_call(module.sdpa, query, key, value, attention_mask, module.sdpa.causal, dropout)
    return out.transpose(1, 2).contiguous(), None


def use_unit_attention(core: nn.Module, sdpa: nn.Module, qk_undo: float) -> None:
    """Route ``core``'s attention function to :func:`unit_attention` (its own config copy names
    it; the model's config, and so its mask construction, are unchanged)."""
    from transformers import AttentionInterface

    if ATTENTION_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, unit_attention)
    config = copy.copy(core.config)
    config._attn_implementation_internal = ATTENTION_IMPLEMENTATION  # not the setter: it recurses into sub-configs
    core.config = config
    core.sdpa = sdpa
    core.lowprec_qk_undo = float(qk_undo)


class UnitGLUMLPMixin:
    """``down(glu(gate, up))`` with the MLP's own child names (contract 2); ``lowprec_mlp`` is its
    :class:`lowprec.scaling.blocks.MLPParts` with paths relative to this MLP."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        parts = self.lowprec_mlp
        if parts.fused:
            gate, up = self.get_submodule(parts.up)(x).chunk(2, dim=-1)
        else:
            gate, up = self.get_submodule(parts.gate)(x), self.get_submodule(parts.up)(x)
        return self.get_submodule(parts.down)(self.get_submodule(parts.act)(gate, up))


class UnitBlockMixin:
    """A transformer block run from its :class:`lowprec.scaling.blocks.BlockSpec`
    (``lowprec_block``), with tau-weighted residuals ``attn_residual`` and ``mlp_residual``."""

    def _attention_args(self, args: tuple, kwargs: dict) -> dict:
        spec = self.lowprec_block
        named = dict(zip(spec.call_names[1:], args))
        named.update(kwargs)
        named.pop(spec.call_names[0], None)
        if named.get("encoder_hidden_states") is not None:
            raise NotImplementedError(f"lowprec's unit-scaled {type(self).__name__} has no cross-attention")
        if spec.attn_accepts is not None:
            named = {k: v for k, v in named.items() if k in spec.attn_accepts}
        return named

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        spec = self.lowprec_block
        attn_args = self._attention_args(args, kwargs)
        x = hidden_states
        for branch, residual, is_attn in ((spec.attention, self.attn_residual, True),
                                          (spec.mlp, self.mlp_residual, False)):
            h, skip = residual.split(x)
            if branch.pre_norm:
                h = self.get_submodule(branch.pre_norm)(h)
            core = self.get_submodule(branch.core)
            h = core(h, **attn_args) if is_attn else core(h)
            if isinstance(h, tuple):
                h = h[0]
            for name in branch.post:
                h = self.get_submodule(name)(h)
            x = residual(h, skip)
            if branch.add_norm:
                x = self.get_submodule(branch.add_norm)(x)
        return x
