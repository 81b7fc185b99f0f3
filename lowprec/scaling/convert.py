"""``unit_scale_model``: convert an existing model to unit scaling, module by module, by explicit rule.

Rules (first match wins, a matched subtree is consumed, everything else is visited child by child):

* Llama-family causal LMs and base models (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
  ``MistralDecoderLayer``: pre-norm, RMSNorm, SwiGLU MLP, RoPE attention);
* GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``: pre-norm, LayerNorm, ``Conv1D``, GELU MLP);
* BERT (``BertForMaskedLM`` / ``BertModel``: post-norm);
* ``nn.Sequential`` MLPs of ``Linear`` / activation / dropout layers.

A module no rule knows is left as it is and listed in the report.

Two initialisations (``recipe.unit_scaling.init``):

* ``"unit"``: weights re-initialised N(0, 1) (norm gains 1, biases 0); every scale comes from
  the unit-scaling rules and residual weights from the u-muP depth rule.
* ``"keep"``: weights are kept. Each linear divides by its weight's actual rms (so its output
  is unit for unit input), and the scale each op leaves on its output, relative to the
  original model, is tracked forward: nonlinearities get an ``input_mult`` that undoes it,
  biases a ``bias_mult`` that matches it, attention a logit scale that undoes it, and each
  residual's ``tau`` is set to the ratio of skip to branch scale, so ``residual_add`` forms
  exactly a multiple of the original sum. Norms are scale-invariant except for ``eps``, which
  is multiplied by the square of the incoming scale. The converted model computes the same
  function (to rounding) while its activations sit near unit scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowprec.scaling import functional as U
from lowprec.scaling.hf import (
    UnitBertLayerMixin,
    UnitBertResidualOutputMixin,
    UnitBertSelfAttentionMixin,
    UnitGPT2AttentionMixin,
    UnitGPT2BlockMixin,
    UnitGPT2MLPMixin,
    UnitLlamaAttentionMixin,
    UnitLlamaMLPMixin,
    UnitPreNormDecoderLayerMixin,
    swap_class,
)
from lowprec.scaling.modules import (
    ResidualAdd,
    UnitActivation,
    UnitEmbedding,
    UnitGLU,
    UnitLayerNorm,
    UnitLinear,
    UnitOp,
    UnitRMSNorm,
    UnitSDPA,
)
from lowprec.scaling.nonlinearity import activation_kind, activation_scales, glu_scales

LLAMA_LIKE_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
RMSNORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "RMSNorm")
LLAMA_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}


class UnitScalingError(ValueError):
    """A model cannot be unit-scaled as asked (the message names the module and why)."""


@dataclass
class _Ctx:
    keep: bool
    readout: str
    residual_mult: float
    residual_attn_ratio: float
    recipe: Any
    report: Any
    pending_init: list[nn.Module] | None = None  # see unit_scale_model


# ----------------------------------------------------------------------------------------------
# Leaf conversions. Each returns the new module and, under "keep", the scale of its output
# relative to the original model's (r_out) given that of its input (r_in).
# ----------------------------------------------------------------------------------------------


def _rms(t: torch.Tensor) -> float:
    v = float(t.detach().float().pow(2).mean().sqrt())
    return v if math.isfinite(v) and v > 0 else 1.0


def unit_init(ops: list[nn.Module]) -> None:
    """Re-initialise the weights of ``ops`` (collected by :func:`unit_scale_model`'s
    ``pending_init``) in order, so the random draws are those of an immediate conversion."""
    for op in ops:
        _unit_init(op)


def _stored(op: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``op`` stores as ``name``: under a parametrization (a QAT plan applied after a
    deferred init) the original parameter, not the computed value that ``op.<name>`` returns."""
    if parametrize.is_parametrized(op, name):
        return op.parametrizations[name].original
    return getattr(op, name, None)


@torch.no_grad()
def _unit_init(op: nn.Module) -> None:
    weight = _stored(op, "weight")
    if isinstance(op, (UnitLinear, UnitEmbedding)):
        weight.normal_()
        if isinstance(op, UnitEmbedding) and op.padding_idx is not None:
            weight[op.padding_idx].zero_()
    if isinstance(op, (UnitRMSNorm, UnitLayerNorm)) and weight is not None:
        weight.fill_(1.0)
    bias = _stored(op, "bias")
    if isinstance(bias, nn.Parameter):
        bias.zero_()


def _init(ctx: _Ctx, op: nn.Module) -> None:
    """Re-initialise ``op``'s weights for training from scratch, now or (``ctx.pending_init``)
    when the caller commits."""
    if ctx.pending_init is None:
        _unit_init(op)
    else:
        ctx.pending_init.append(op)


def _linear(ctx: _Ctx, module: nn.Module, r_in: float = 1.0, readout: str | None = None) -> tuple[UnitLinear, float]:
    new = UnitLinear.wrap(module, readout=readout)
    if not ctx.keep:
        _init(ctx, new)
        return new, 1.0
    rule_out = U.linear_rule(new.in_features, new.out_features, 1, readout)[0]
    if readout is None:
        new.out_mult = 1.0 / _rms(new.weight)  # absorb the weight's scale: unit in, unit out
    else:
        new.out_mult = 1.0 / (r_in * rule_out)  # the logits must come out exactly as before
    new.bias_mult = r_in
    return new, r_in * rule_out * new.out_mult


def _norm(ctx: _Ctx, module: nn.Module, r_in: float = 1.0) -> nn.Module:
    new = UnitLayerNorm.wrap(module) if isinstance(module, nn.LayerNorm) else UnitRMSNorm.wrap(module)
    if ctx.keep:
        new.eps = new.eps * r_in * r_in  # norm(r x) with eps r^2 == norm(x) with eps
    else:
        _init(ctx, new)
    return new


def _activation(ctx: _Ctx, module: nn.Module, r_in: float = 1.0) -> tuple[UnitActivation, float]:
    kind = activation_kind(module)
    assert kind is not None
    new = UnitActivation(kind, input_mult=1.0 / r_in if ctx.keep else 1.0)
    return new, activation_scales(kind)[0]


def _embeddings(ctx: _Ctx, modules: list[nn.Embedding]) -> tuple[list[UnitEmbedding], float]:
    """Embeddings whose outputs are summed: one common output multiplier (keep: 1/rms of the sum;
    unit: ``n**-0.5`` for n unit tables). Returns the new modules and the relative scale."""
    news = [UnitEmbedding.wrap(m) for m in modules]
    if ctx.keep:
        mult = 1.0 / math.sqrt(sum(_rms(m.weight) ** 2 for m in modules))
    else:
        for n in news:
            _init(ctx, n)
        mult = len(news) ** -0.5
    for n in news:
        n.out_mult = mult
    return news, (mult if ctx.keep else 1.0)


def _sdpa(ctx: _Ctx, d_head: int, causal: bool, orig_logit_scale: float, rq: float, rk: float,
          max_len: int | None) -> UnitSDPA:
    mult = U.default_attention_mult(d_head)
    sdpa = UnitSDPA(mult=None, causal=causal, qk_grad_mult=U.attention_qk_grad_mult(d_head, mult))
    if ctx.keep:
        sdpa.logit_scale = orig_logit_scale / (rq * rk)
        # a fixed output scale: the rule's value at the model's full context length
        sdpa.output_scale = U.attention_output_scale(max_len or 512, d_head, causal, mult)
    return sdpa


def _residual(norm: nn.Module, tau: float, fan_out: float) -> ResidualAdd:
    """A ResidualAdd whose branch starts with ``norm`` feeding projections of total gradient gain
    ``fan_out`` (the fan-out rule, see :class:`ResidualAdd`); the true gradient is kept."""
    norm.grad_mult = fan_out**-0.5
    return ResidualAdd(tau, split_grad_mult=fan_out**0.5)


def _set_depth(module: nn.Module, depth: int) -> None:
    for m in module.modules():
        if isinstance(m, UnitOp):
            m.lowprec_depth = depth


def _tau(ctx: _Ctx, skip_scale: float, branch_scale: float, rule_tau: float) -> tuple[float, float]:
    """The residual's tau and the stream's new relative scale."""
    if not ctx.keep:
        return rule_tau, 1.0
    tau = skip_scale / branch_scale
    return tau, skip_scale / math.sqrt(1.0 + tau * tau)


def _excluded_inside(ctx: _Ctx, name: str, module: nn.Module) -> str | None:
    for sub, _ in module.named_modules():
        full = f"{name}.{sub}" if sub and name else (sub or name)
        if full and ctx.recipe.excluded(full):
            return full
    return None


def _config_len(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ----------------------------------------------------------------------------------------------
# Llama family
# ----------------------------------------------------------------------------------------------


def _llama_layer_problem(layer: nn.Module) -> str | None:
    if type(layer).__name__ not in LLAMA_LIKE_LAYERS:
        return f"{type(layer).__name__} is not one of {', '.join(LLAMA_LIKE_LAYERS)}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn / mlp"
    children = {n for n, _ in attn.named_children()}
    if children != LLAMA_ATTN_CHILDREN:
        return f"attention children {sorted(children)} differ from {sorted(LLAMA_ATTN_CHILDREN)}"
    if not all(isinstance(getattr(attn, n), nn.Linear) for n in LLAMA_ATTN_CHILDREN):
        return "attention projections are not nn.Linear"
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return "MLP is not a gate_proj/up_proj/down_proj SwiGLU"
    if activation_kind(getattr(mlp, "act_fn", None) or nn.Identity()) is None:
        return f"unknown MLP activation {type(getattr(mlp, 'act_fn', None)).__name__}"
    for n in ("input_layernorm", "post_attention_layernorm"):
        if type(getattr(layer, n, None)).__name__ not in RMSNORM_CLASSES:
            return f"{n} is not an RMSNorm"
    return None


def _is_llama_base(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("embed_tokens", "layers", "norm")) and isinstance(m.layers, nn.ModuleList)


def _convert_llama_layer(ctx: _Ctx, name: str, layer: nn.Module, s: float, taus: tuple[float, float],
                         max_len: int | None) -> float:
    attn, mlp = layer.self_attn, layer.mlp
    layer.input_layernorm = _norm(ctx, layer.input_layernorm, s)
    attn.q_proj, rq = _linear(ctx, attn.q_proj)
    attn.k_proj, rk = _linear(ctx, attn.k_proj)
    attn.v_proj, rv = _linear(ctx, attn.v_proj)
    attn.sdpa = _sdpa(ctx, attn.head_dim, True, float(attn.scaling), rq, rk, max_len)
    c = attn.sdpa.qk_grad_mult
    attn.q_proj.grad_input_mult = attn.k_proj.grad_input_mult = 1.0 / c
    attn.o_proj, r_attn = _linear(ctx, attn.o_proj, rv * (attn.sdpa.output_scale or 1.0))
    swap_class(attn, UnitLlamaAttentionMixin)
    tau, s = _tau(ctx, s, r_attn, taus[0])
    k_attn = (attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features) / attn.q_proj.out_features
    layer.attn_residual = _residual(layer.input_layernorm, tau, k_attn)

    layer.post_attention_layernorm = _norm(ctx, layer.post_attention_layernorm, s)
    kind = activation_kind(mlp.act_fn)
    mlp.gate_proj, rg = _linear(ctx, mlp.gate_proj)
    mlp.up_proj, ru = _linear(ctx, mlp.up_proj)
    mlp.act_fn = UnitGLU(kind, gate_mult=1.0 / rg if ctx.keep else 1.0)
    mlp.down_proj, r_mlp = _linear(ctx, mlp.down_proj, ru * glu_scales(kind)[0])
    swap_class(mlp, UnitLlamaMLPMixin)
    tau, s = _tau(ctx, s, r_mlp, taus[1])
    layer.mlp_residual = _residual(layer.post_attention_layernorm, tau, 2.0)
    swap_class(layer, UnitPreNormDecoderLayerMixin)
    ctx.report.add(name, f"{type(layer).__name__} (tau_attn={layer.attn_residual.tau:.4g}, "
                         f"tau_mlp={layer.mlp_residual.tau:.4g})")
    return s


def _convert_llama(ctx: _Ctx, name: str, base: nn.Module, root: nn.Module | None, head_name: str | None) -> str | None:
    """Convert a Llama-family base model (and the LM head ``root.<head_name>`` if given)."""
    for i, layer in enumerate(base.layers):
        why = _llama_layer_problem(layer)
        if why:
            return f"layer {i}: {why}"
    if type(base.norm).__name__ not in RMSNORM_CLASSES:
        return "final norm is not an RMSNorm"
    if not isinstance(base.embed_tokens, nn.Embedding):
        return "embed_tokens is not an nn.Embedding"
    p = f"{name}." if name else ""
    excluded = _excluded_inside(ctx, f"{p}layers", base.layers)
    if excluded:
        return f"{excluded} is excluded by the recipe, so its residual stack cannot be converted"
    n_layers = len(base.layers)
    taus = U.transformer_residual_taus(n_layers, ctx.residual_mult, ctx.residual_attn_ratio)
    max_len = _config_len(getattr(base, "config", None), "max_position_embeddings")

    s = 1.0
    if ctx.recipe.excluded(f"{p}embed_tokens"):
        ctx.report.skip(f"{p}embed_tokens", "excluded by the recipe's [exclude] patterns")
    else:
        (base.embed_tokens,), s = _embeddings(ctx, [base.embed_tokens])
        ctx.report.add(f"{p}embed_tokens", "UnitEmbedding")
    for i, layer in enumerate(base.layers):
        s = _convert_llama_layer(ctx, f"{p}layers.{i}", layer, s, taus[i], max_len)
        _set_depth(layer, n_layers)
    base.norm = _norm(ctx, base.norm, s)
    ctx.report.add(f"{p}norm", "UnitRMSNorm")
    _convert_head(ctx, root, head_name)
    return None


def _convert_head(ctx: _Ctx, root: nn.Module | None, head_name: str | None) -> None:
    if root is None or head_name is None:
        return
    attr = head_name.rpartition(".")[2]
    head = getattr(root, attr)
    if ctx.recipe.excluded(head_name):
        ctx.report.skip(head_name, "excluded by the recipe's [exclude] patterns")
        return
    if not isinstance(head, nn.Linear):
        ctx.report.skip(head_name, f"LM head is a {type(head).__name__}, not nn.Linear")
        return
    new, _ = _linear(ctx, head, 1.0, readout=ctx.readout)
    setattr(root, attr, new)
    ctx.report.add(head_name, f"UnitLinear (readout, {ctx.readout} rule)")


# ----------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------


def _gpt2_block_problem(block: nn.Module) -> str | None:
    if type(block).__name__ != "GPT2Block":
        return f"{type(block).__name__} is not GPT2Block"
    if hasattr(block, "crossattention"):
        return "cross-attention blocks are not supported"
    if type(block.attn).__name__ != "GPT2Attention" or getattr(block.attn, "is_cross_attention", False):
        return "attention is not GPT2Attention self-attention"
    if activation_kind(block.mlp.act) is None:
        return f"unknown MLP activation {type(block.mlp.act).__name__}"
    return None


def _convert_gpt2(ctx: _Ctx, name: str, tr: nn.Module, root: nn.Module | None, head_name: str | None) -> str | None:
    for i, block in enumerate(tr.h):
        why = _gpt2_block_problem(block)
        if why:
            return f"block {i}: {why}"
    p = f"{name}." if name else ""
    excluded = _excluded_inside(ctx, f"{p}h", tr.h) or _excluded_inside(ctx, f"{p}wte", tr.wte) or \
        _excluded_inside(ctx, f"{p}wpe", tr.wpe)
    if excluded:
        return f"{excluded} is excluded by the recipe, so the residual stack cannot be converted"
    n_layers = len(tr.h)
    taus = U.transformer_residual_taus(n_layers, ctx.residual_mult, ctx.residual_attn_ratio)
    max_len = _config_len(getattr(tr, "config", None), "n_positions", "max_position_embeddings")
    (tr.wte, tr.wpe), s = _embeddings(ctx, [tr.wte, tr.wpe])
    ctx.report.add(f"{p}wte", "UnitEmbedding")
    ctx.report.add(f"{p}wpe", "UnitEmbedding")
    for i, block in enumerate(tr.h):
        attn, mlp = block.attn, block.mlp
        block.ln_1 = _norm(ctx, block.ln_1, s)
        attn.c_attn, r_qkv = _linear(ctx, attn.c_attn)
        attn.sdpa = _sdpa(ctx, attn.head_dim, True, float(attn.scaling), r_qkv, r_qkv, max_len)
        attn.c_proj, r_attn = _linear(ctx, attn.c_proj, r_qkv * (attn.sdpa.output_scale or 1.0))
        swap_class(attn, UnitGPT2AttentionMixin)
        tau, s = _tau(ctx, s, r_attn, taus[i][0])
        block.attn_residual = _residual(block.ln_1, tau, attn.c_attn.out_features / attn.c_attn.in_features)
        block.ln_2 = _norm(ctx, block.ln_2, s)
        mlp.c_fc, r_fc = _linear(ctx, mlp.c_fc)
        mlp.act, k = _activation(ctx, mlp.act, r_fc)
        mlp.c_proj, r_mlp = _linear(ctx, mlp.c_proj, k)
        swap_class(mlp, UnitGPT2MLPMixin)
        tau, s = _tau(ctx, s, r_mlp, taus[i][1])
        block.mlp_residual = ResidualAdd(tau)
        swap_class(block, UnitGPT2BlockMixin)
        _set_depth(block, n_layers)
        ctx.report.add(f"{p}h.{i}", f"GPT2Block (tau_attn={block.attn_residual.tau:.4g}, "
                                    f"tau_mlp={block.mlp_residual.tau:.4g})")
    tr.ln_f = _norm(ctx, tr.ln_f, s)
    ctx.report.add(f"{p}ln_f", "UnitLayerNorm")
    _convert_head(ctx, root, head_name)
    return None


# ----------------------------------------------------------------------------------------------
# BERT (post-norm)
# ----------------------------------------------------------------------------------------------


def _bert_layer_problem(layer: nn.Module) -> str | None:
    if type(layer).__name__ != "BertLayer":
        return f"{type(layer).__name__} is not BertLayer"
    if getattr(layer, "is_decoder", False) or hasattr(layer, "crossattention"):
        return "decoder / cross-attention BERT layers are not supported"
    if type(layer.attention.self).__name__ != "BertSelfAttention":
        return "attention is not BertSelfAttention"
    if activation_kind(layer.intermediate.intermediate_act_fn) is None:
        return "unknown intermediate activation"
    return None


def _convert_bert_layer(ctx: _Ctx, name: str, layer: nn.Module, max_len: int | None) -> None:
    sa, so, inter, out = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
    sa.query, rq = _linear(ctx, sa.query)
    sa.key, rk = _linear(ctx, sa.key)
    sa.value, rv = _linear(ctx, sa.value)
    sa.sdpa = _sdpa(ctx, sa.attention_head_size, False, float(sa.scaling), rq, rk, max_len)
    sa.query.grad_input_mult = sa.key.grad_input_mult = 1.0 / sa.sdpa.qk_grad_mult
    swap_class(sa, UnitBertSelfAttentionMixin)
    so.dense, r_attn = _linear(ctx, so.dense, rv * (sa.sdpa.output_scale or 1.0))
    tau, s = _tau(ctx, 1.0, r_attn, ctx.residual_mult)
    so.residual = ResidualAdd(tau)
    so.LayerNorm = _norm(ctx, so.LayerNorm, s)
    swap_class(so, UnitBertResidualOutputMixin)
    inter.dense, r_i = _linear(ctx, inter.dense)
    inter.intermediate_act_fn, k = _activation(ctx, inter.intermediate_act_fn, r_i)
    out.dense, r_mlp = _linear(ctx, out.dense, k)
    tau, s = _tau(ctx, 1.0, r_mlp, ctx.residual_mult)
    out.residual = ResidualAdd(tau)
    out.LayerNorm = _norm(ctx, out.LayerNorm, s)
    swap_class(out, UnitBertResidualOutputMixin)
    swap_class(layer, UnitBertLayerMixin)
    ctx.report.add(name, f"BertLayer (tau_attn={so.residual.tau:.4g}, tau_mlp={out.residual.tau:.4g})")


def _convert_bert(ctx: _Ctx, name: str, bert: nn.Module) -> str | None:
    emb = bert.embeddings
    if getattr(getattr(bert, "config", None), "position_embedding_type", "absolute") != "absolute":
        return "only absolute position embeddings are supported"
    for i, layer in enumerate(bert.encoder.layer):
        why = _bert_layer_problem(layer)
        if why:
            return f"layer {i}: {why}"
    p = f"{name}." if name else ""
    excluded = _excluded_inside(ctx, f"{p}encoder", bert.encoder) or _excluded_inside(ctx, f"{p}embeddings", emb)
    if excluded:
        return f"{excluded} is excluded by the recipe, so the encoder cannot be converted"
    max_len = _config_len(getattr(bert, "config", None), "max_position_embeddings")
    names = ["word_embeddings", "token_type_embeddings", "position_embeddings"]
    news, s = _embeddings(ctx, [getattr(emb, n) for n in names])
    for n, new in zip(names, news):
        setattr(emb, n, new)
        ctx.report.add(f"{p}embeddings.{n}", "UnitEmbedding")
    emb.LayerNorm = _norm(ctx, emb.LayerNorm, s)
    ctx.report.add(f"{p}embeddings.LayerNorm", "UnitLayerNorm")
    n_layers = len(bert.encoder.layer)
    for i, layer in enumerate(bert.encoder.layer):
        _convert_bert_layer(ctx, f"{p}encoder.layer.{i}", layer, max_len)
        _set_depth(layer, n_layers)
    return None


def _convert_bert_mlm_head(ctx: _Ctx, name: str, pred: nn.Module) -> None:
    t = pred.transform
    t.dense, r = _linear(ctx, t.dense)
    t.transform_act_fn, k = _activation(ctx, t.transform_act_fn, r)
    t.LayerNorm = _norm(ctx, t.LayerNorm, k)
    pred.decoder, _ = _linear(ctx, pred.decoder, 1.0, readout=ctx.readout)
    ctx.report.add(f"{name}.transform", "UnitLinear + UnitActivation + UnitLayerNorm")
    ctx.report.add(f"{name}.decoder", f"UnitLinear (readout, {ctx.readout} rule)")


# ----------------------------------------------------------------------------------------------
# nn.Sequential MLP
# ----------------------------------------------------------------------------------------------


def _is_mlp(m: nn.Module) -> bool:
    if type(m) is not nn.Sequential or len(m) == 0:
        return False
    kinds_ok = all(isinstance(c, (nn.Linear, nn.Dropout, nn.Identity)) or activation_kind(c) is not None for c in m)
    return kinds_ok and any(isinstance(c, nn.Linear) for c in m)


def _convert_mlp(ctx: _Ctx, name: str, seq: nn.Sequential) -> None:
    last = max(i for i, c in enumerate(seq) if isinstance(c, nn.Linear))
    r = 1.0
    for i, child in enumerate(list(seq)):
        full = f"{name}.{i}" if name else str(i)
        if ctx.recipe.excluded(full):
            ctx.report.skip(full, "excluded by the recipe's [exclude] patterns")
            continue
        if isinstance(child, nn.Linear):
            readout = ctx.readout if i == last else None
            seq[i], r = _linear(ctx, child, r, readout=readout)
            ctx.report.add(full, "UnitLinear" + (f" (readout, {ctx.readout} rule)" if readout else ""))
        elif activation_kind(child) is not None:
            seq[i], r = _activation(ctx, child, r)
            ctx.report.add(full, f"UnitActivation({seq[i].kind})")


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------


def _try_rules(ctx: _Ctx, name: str, m: nn.Module) -> str | bool:
    """True when a rule converted ``m``; a string when a rule matched but could not apply; False otherwise."""
    p = f"{name}." if name else ""
    if _is_llama_base(getattr(m, "model", None) or nn.Module()) and hasattr(m, "lm_head"):
        return _convert_llama(ctx, f"{p}model", m.model, m, f"{p}lm_head") or True
    if _is_llama_base(m):
        return _convert_llama(ctx, name, m, None, None) or True
    tr = getattr(m, "transformer", None)
    if tr is not None and type(tr).__name__ == "GPT2Model" and hasattr(m, "lm_head"):
        return _convert_gpt2(ctx, f"{p}transformer", tr, m, f"{p}lm_head") or True
    if type(m).__name__ == "GPT2Model":
        return _convert_gpt2(ctx, name, m, None, None) or True
    if type(m).__name__ == "BertModel":
        return _convert_bert(ctx, name, m) or True
    if type(m).__name__ == "BertForMaskedLM":
        why = _convert_bert(ctx, f"{p}bert", m.bert)
        if why:
            return why
        _convert_bert_mlm_head(ctx, f"{p}cls.predictions", m.cls.predictions)
        return True
    if _is_mlp(m):
        _convert_mlp(ctx, name, m)
        return True
    return False


def _visit(ctx: _Ctx, name: str, m: nn.Module) -> None:
    if name and ctx.recipe.excluded(name):
        ctx.report.skip(name, "excluded by the recipe's [exclude] patterns")
        return
    if isinstance(m, UnitOp):
        return
    result = _try_rules(ctx, name, m)
    if result is True:
        return
    if isinstance(result, str):
        ctx.report.skip(name or type(m).__name__, f"{type(m).__name__} left as it is: {result}")
    for child_name, child in list(m.named_children()):
        _visit(ctx, f"{name}.{child_name}" if name else child_name, child)


def unit_scale_model(model: nn.Module, recipe: Any, report: Any, *,
                     pending_init: list[nn.Module] | None = None) -> nn.Module:
    """Convert ``model`` in place to unit scaling under ``recipe.unit_scaling``; record what was
    converted and what was left alone in ``report`` (a :class:`lowprec.recipes.ConversionReport`).
    Returns the model.

    ``pending_init``: under ``init="unit"``, the ops whose weights must be re-drawn are appended
    to this list instead of being re-initialised now, and the caller passes it to
    :func:`unit_init` once nothing else can fail. The conversion then changes no tensor value,
    only the module tree, which :func:`lowprec.convert` can restore cheaply on failure (no copy
    of the weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unit_scale_model expects a torch.nn.Module, got {type(model).__name__}")
    cfg = recipe.unit_scaling
    if cfg.init not in ("unit", "keep"):
        raise UnitScalingError(f"unit_scaling.init must be 'unit' or 'keep', got {cfg.init!r}")
    readout = getattr(cfg, "readout", "unit")
    if readout not in ("unit", "mup"):
        raise UnitScalingError(f"unit_scaling.readout must be 'unit' or 'mup', got {readout!r}")
    ctx = _Ctx(keep=cfg.init == "keep", readout=readout, residual_mult=float(cfg.residual_mult),
               residual_attn_ratio=float(cfg.residual_attn_ratio), recipe=recipe, report=report,
               pending_init=pending_init)
    _visit(ctx, "", model)
    _report_leftovers(model, report)
    return model


def _report_leftovers(model: nn.Module, report: Any) -> None:
    owned = {id(p) for m in model.modules() if isinstance(m, UnitOp) for p in m.parameters(recurse=False)}
    inside_unit = set()
    for name, m in model.named_modules():
        if isinstance(m, UnitOp):
            inside_unit.update(f"{name}.{s}" for s, _ in m.named_modules() if s)
    for name, m in model.named_modules():
        if isinstance(m, UnitOp) or name in inside_unit:
            continue
        own = [p for p in m.parameters(recurse=False) if id(p) not in owned]
        if own and name not in report.converted and name not in report.skipped:
            report.skip(name or type(m).__name__, f"{type(m).__name__}: no unit-scaling rule for this module")
