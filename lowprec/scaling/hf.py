"""Unit-scaled forwards for Hugging Face blocks (Llama/Qwen2/Mistral, GPT-2, BERT).

A converted block keeps its class (a subclass is swapped in, see :func:`swap_class`), its
children and its parameter names; only ``forward`` changes. The new forwards:

* split the residual stream with ``residual_split`` and join it with a :class:`ResidualAdd`
  (the tau-weighted add), so every residual add of the model is a unit-scaled one;
* run attention through :class:`UnitSDPA` with the mask Hugging Face built (boolean or
  additive, causal / padding / sliding window) passed on unchanged, and RoPE applied exactly
  as Hugging Face does (its adds are not residuals and are not rescaled);
* keep the KV cache protocol (``cache.update``) so generation still works.

These are the places where graphcore's traced transform goes wrong on HF Llama (design.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lowprec.scaling import functional as U

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


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's rotate-half RoPE on ``(batch, heads, seq, d)`` tensors."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa_call(sdpa: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
               dropout_p: float) -> Tensor:
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != k.shape[-2]:
        mask = mask[..., : k.shape[-2]]
    is_causal = causal and mask is None and q.shape[-2] > 1
    return sdpa(q, k, v, mask, is_causal, dropout_p)


# ----------------------------------------------------------------------------------------------
# Llama family (Llama, Qwen2, Mistral share this structure)
# ----------------------------------------------------------------------------------------------


class UnitLlamaAttentionMixin:
    """q/k/v/o projections are UnitLinears; ``self.sdpa`` is a UnitSDPA."""

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, cache: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k, v = _repeat_kv(k, self.num_key_value_groups), _repeat_kv(v, self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0
        out = _sdpa_call(self.sdpa, q, k, v, attention_mask, self.is_causal, dropout)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class UnitLlamaMLPMixin:
    """SwiGLU MLP with its HF child names kept (contract 2): ``act_fn`` is a UnitGLU."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class UnitPreNormDecoderLayerMixin:
    """Pre-norm decoder layer with tau-weighted residuals (``attn_residual``, ``mlp_residual``)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        branch, skip = self.attn_residual.split(hidden_states)
        h, _ = self.self_attn(hidden_states=self.input_layernorm(branch), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        hidden_states = self.attn_residual(h, skip)
        branch, skip = self.mlp_residual.split(hidden_states)
        h = self.mlp(self.post_attention_layernorm(branch))
        return self.mlp_residual(h, skip)


# ----------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------


class UnitGPT2AttentionMixin:
    """Fused ``c_attn`` (a transposed UnitLinear), ``self.sdpa``, ``c_proj``. Self-attention only.

    q and k share one GEMM with v here, so the q/k gradient factor of the SDPA is undone right
    after the split (``qk_grad_mult``): ``c_attn``'s gradient GEMM then sees exact q/k gradients.
    """

    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                output_attentions: bool | None = False, **kwargs: Any) -> tuple[Tensor, None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError("lowprec's unit-scaled GPT-2 attention does not support cross-attention")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        c = self.sdpa.qk_grad_mult
        q, k = U.scale_bwd(q, 1.0 / c), U.scale_bwd(k, 1.0 / c)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.attn_dropout.p if self.training else 0.0
        out = _sdpa_call(self.sdpa, q, k, v, attention_mask, True, dropout)
        out = out.transpose(1, 2).reshape(*out.shape[:1], out.shape[2], -1).contiguous()
        out = self.resid_dropout(self.c_proj(out))
        return out, None


class UnitGPT2MLPMixin:
    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class UnitGPT2BlockMixin:
    def forward(self, hidden_states: Tensor, cache: Any = None, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                use_cache: bool | None = False, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None:
            raise NotImplementedError("lowprec's unit-scaled GPT-2 block does not support cross-attention")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("position_ids", None)
        branch, skip = self.attn_residual.split(hidden_states)
        h, _ = self.attn(self.ln_1(branch), cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        hidden_states = self.attn_residual(h, skip)
        branch, skip = self.mlp_residual.split(hidden_states)
        return self.mlp_residual(self.mlp(self.ln_2(branch)), skip)


# ----------------------------------------------------------------------------------------------
# BERT (post-norm: the residual add feeds a LayerNorm)
# ----------------------------------------------------------------------------------------------


class UnitBertSelfAttentionMixin:
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        dropout = self.dropout.p if self.training else 0.0
        out = _sdpa_call(self.sdpa, q, k, v, attention_mask, False, dropout)
        return out.transpose(1, 2).reshape(*input_shape, -1).contiguous(), None


class UnitBertResidualOutputMixin:
    """BertSelfOutput / BertOutput: ``LayerNorm(residual_add(dropout(dense(h)), skip))``."""

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(self.residual(h, input_tensor))


class UnitBertLayerMixin:
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                cache: Any = None, **kwargs: Any) -> Tensor:
        attn_out = self.attention.output
        branch, skip = attn_out.residual.split(hidden_states)
        h, _ = self.attention.self(branch, attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = attn_out(h, skip)
        branch, skip = self.output.residual.split(hidden_states)
        return self.output(self.intermediate(branch), skip)
