"""``unit_scale_model``: convert an existing model to unit scaling, module by module, by explicit rule.

Rules (first match wins, a matched subtree is consumed, everything else is visited child by child):

* a transformer stack (embeddings, a list of blocks, final norm), with the model's readout
  and the modules before it when the stack's parent has one: described as data by
  :func:`lowprec.scaling.blocks.describe_stack` (from module names, the config and functional
  probes, not class names) and converted by one generic rule, :func:`_convert_block`. Covered
  as they come: Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3, GPT-2, BERT, OLMo 2, Granite,
  StableLM, Starcoder2, and whatever else is built from the same parts;
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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowprec.errors import RecipeError
from lowprec.scaling import functional as U
from lowprec.scaling.blocks import (
    CONFIG_MULTIPLIERS,
    BlockSpec,
    StackSpec,
    config_value,
    describe_stack,
    embedding_multiplier,
    first,
    get,
    head_of,
    is_linear,
    norm_kind,
)
from lowprec.scaling.hf import UnitBlockMixin, UnitGLUMLPMixin, swap_class, use_unit_attention
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
from lowprec.scaling.nonlinearity import activation_kind, activation_scales
from lowprec.scaling.verify import check_same_function, probe_inputs, record


class UnitScalingError(RecipeError):
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
        weight.fill_(1.0 - getattr(op, "weight_offset", 0.0))  # a gain of 1
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
    kind, offset = norm_kind(module) or ("rms", 0.0)
    new = UnitLayerNorm.wrap(module) if kind == "layer" else UnitRMSNorm.wrap(module, offset)
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


def _embeddings(ctx: _Ctx, modules: list[nn.Embedding], model_mult: float = 1.0,
                normalized: bool = False) -> tuple[list[UnitEmbedding], float]:
    """Embeddings whose outputs are summed, then multiplied by ``model_mult`` in the model's
    forward: one common output scale (keep: 1/rms of the stream, each table's own multiplier
    such as Gemma's ``sqrt(hidden)`` kept; unit: ``n**-0.5`` for n unit tables, or 1 when a norm
    follows the sum (``normalized``, BERT): each table's output is then unit itself). Returns the
    new modules and the stream's relative scale."""
    news = [UnitEmbedding.wrap(m) for m in modules]
    mults = [embedding_multiplier(m) or 1.0 for m in modules]
    if ctx.keep:
        rel = 1.0 / (model_mult * math.sqrt(sum((k * _rms(m.weight)) ** 2 for k, m in zip(mults, modules))))
        for n, k in zip(news, mults):
            n.out_mult = k * rel
        return news, rel
    for n in news:
        _init(ctx, n)
        n.out_mult = (1.0 if normalized else len(news) ** -0.5) / model_mult
    return news, 1.0


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


def _tau(ctx: _Ctx, skip_scale: float, branch_scale: float, rule_tau: float,
         branch_mult: float = 1.0) -> tuple[float, float]:
    """The residual's tau and the stream's new relative scale (keep: the original adds
    ``skip + branch_mult * branch``)."""
    if not ctx.keep:
        return rule_tau, 1.0
    tau = branch_mult * skip_scale / branch_scale
    return tau, skip_scale / math.sqrt(1.0 + tau * tau)


def _excluded_inside(ctx: _Ctx, name: str, module: nn.Module) -> str | None:
    for sub, _ in module.named_modules():
        full = f"{name}.{sub}" if sub and name else (sub or name)
        if full and ctx.recipe.excluded(full):
            return full
    return None


def _set(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return new


# ----------------------------------------------------------------------------------------------
# One rule for every transformer block (its description: lowprec.scaling.blocks)
# ----------------------------------------------------------------------------------------------


def _convert_attention(ctx: _Ctx, block: nn.Module, spec: BlockSpec, r: float,
                       max_len: int | None) -> tuple[float, float]:
    """q/k/v (separate or fused), q/k norms, the attention function and the output projection.
    Returns the output's relative scale and the fan-out of the branch input (q+k+v over q width)."""
    a = spec.attn
    if a.qkv:
        qkv, rq = _linear(ctx, get(block, a.qkv), r)
        _set(block, a.qkv, qkv)
        rk = rv = rq
        widths = qkv.out_features
    else:
        (q, rq), (k, rk), (v, rv) = (_linear(ctx, get(block, p), r) for p in (a.q, a.k, a.v))
        for p, new in ((a.q, q), (a.k, k), (a.v, v)):
            _set(block, p, new)
        widths = q.out_features + k.out_features + v.out_features
    if a.q_norm:
        _set(block, a.q_norm, _norm(ctx, get(block, a.q_norm), rq))
        rq = 1.0
    if a.k_norm:
        _set(block, a.k_norm, _norm(ctx, get(block, a.k_norm), rk))
        rk = 1.0
    core = get(block, spec.attention.core)
    scaling = float(getattr(core, "scaling", a.head_dim**-0.5))
    sdpa = _sdpa(ctx, a.head_dim, a.causal, scaling, rq, rk, max_len)
    if a.qkv:  # one GEMM makes q, k and v: undo the q/k factor after the split (hf.unit_attention)
        use_unit_attention(core, sdpa, 1.0 / sdpa.qk_grad_mult)
    else:
        q.grad_input_mult = k.grad_input_mult = 1.0 / sdpa.qk_grad_mult
        use_unit_attention(core, sdpa, 1.0)
    o, r_out = _linear(ctx, get(block, a.o), rv * (sdpa.output_scale or 1.0))
    _set(block, a.o, o)
    return r_out, widths / a.q_width


def _convert_mlp_parts(ctx: _Ctx, block: nn.Module, spec: BlockSpec, r: float) -> tuple[float, float]:
    """Gate/up (separate or fused) and GLU, or up and activation; then down. Returns the
    output's relative scale and the fan-out of the branch input."""
    f = spec.ffn
    if f.gate:  # gate before up: the order of the weight draws under init="unit"
        gate, rg = _linear(ctx, get(block, f.gate), r)
        _set(block, f.gate, gate)
    up, ru = _linear(ctx, get(block, f.up), r)
    _set(block, f.up, up)
    if f.glu:
        rg = rg if f.gate else ru
        glu = _set(block, f.act, UnitGLU(f.act_kind, gate_mult=1.0 / rg if ctx.keep else 1.0))
        r_mid = ru * glu.scale
        core = get(block, spec.mlp.core)
        strip = lambda p: p[len(spec.mlp.core) + 1:] if p else p  # noqa: E731  (paths relative to the MLP)
        core.lowprec_mlp = dataclasses.replace(f, up=strip(f.up), down=strip(f.down), act=strip(f.act),
                                               gate=strip(f.gate))
        swap_class(core, UnitGLUMLPMixin)
    else:
        act, r_mid = _activation(ctx, get(block, f.act), ru)
        _set(block, f.act, act)
    down, r_out = _linear(ctx, get(block, f.down), r_mid)
    _set(block, f.down, down)
    return r_out, 2.0 if f.glu and f.gate else 1.0


def _convert_block(ctx: _Ctx, name: str, block: nn.Module, spec: BlockSpec, s: float,
                   taus: tuple[float, float], max_len: int | None) -> float:
    """Convert one block in place from its description; ``s`` is the residual stream's relative
    scale on entry (``init="keep"``), the return value its scale on exit."""
    for branch, tau_rule, attr in ((spec.attention, taus[0], "attn_residual"), (spec.mlp, taus[1], "mlp_residual")):
        r, norm = s, None
        if branch.pre_norm:
            norm = _set(block, branch.pre_norm, _norm(ctx, get(block, branch.pre_norm), r))
            r = 1.0
        if branch is spec.attention:
            r, fan_out = _convert_attention(ctx, block, spec, r, max_len)
        else:
            r, fan_out = _convert_mlp_parts(ctx, block, spec, r)
        for p in branch.post:
            m = get(block, p)
            if not isinstance(m, (UnitOp, nn.Dropout)) and norm_kind(m) is not None:
                _set(block, p, _norm(ctx, m, r))
                r = 1.0
        tau, s = _tau(ctx, s, r, tau_rule, spec.residual_mult)
        setattr(block, attr, _residual(norm, tau, fan_out) if norm is not None else ResidualAdd(tau))
        if branch.add_norm:
            _set(block, branch.add_norm, _norm(ctx, get(block, branch.add_norm), s))
            s = 1.0
    block.lowprec_block = spec
    swap_class(block, UnitBlockMixin)
    ctx.report.add(name, f"{type(block).__name__} ({spec.layout}, tau_attn={block.attn_residual.tau:.4g}, "
                         f"tau_mlp={block.mlp_residual.tau:.4g})")
    return s


def _convert_stack(ctx: _Ctx, name: str, stack: nn.Module, spec: StackSpec) -> str | None:
    """Embeddings, every block and the final norm of a described stack, or why not."""
    p = f"{name}." if name else ""
    layers = get(stack, spec.layers)
    excluded = _excluded_inside(ctx, f"{p}{spec.layers}", layers)
    if excluded:
        return f"{excluded} is excluded by the recipe, so its residual stack cannot be converted"
    n_layers = len(layers)
    if spec.blocks[0].post_norm:  # every add is normalised right away: no depth rule
        taus = [(ctx.residual_mult, ctx.residual_mult)] * n_layers
    else:
        taus = U.transformer_residual_taus(n_layers, ctx.residual_mult, ctx.residual_attn_ratio)
    s = 1.0
    if any(ctx.recipe.excluded(f"{p}{e}") for e in spec.embeddings):
        for e in spec.embeddings:
            ctx.report.skip(f"{p}{e}", "excluded by the recipe's [exclude] patterns (with the tables summed with it)")
    else:
        model_mult = spec.embedding_mult
        attr = next((f for f in CONFIG_MULTIPLIERS["embedding"] if isinstance(getattr(stack, f, None), float)), None)
        if not ctx.keep and attr is not None:  # a muP multiplier held by the stack (Granite): unit scaling replaces it
            setattr(stack, attr, 1.0)
            model_mult = 1.0
        news, s = _embeddings(ctx, [get(stack, e) for e in spec.embeddings], model_mult,
                              normalized=spec.embedding_norm is not None)
        for e, new in zip(spec.embeddings, news):
            _set(stack, e, new)
            ctx.report.add(f"{p}{e}", "UnitEmbedding")
    if spec.embedding_norm:
        new = _set(stack, spec.embedding_norm, _norm(ctx, get(stack, spec.embedding_norm), s))
        ctx.report.add(f"{p}{spec.embedding_norm}", type(new).__name__)
        s = 1.0
    for i, (block, bspec) in enumerate(zip(layers, spec.blocks)):
        s = _convert_block(ctx, f"{p}{spec.layers}.{i}", block, bspec, s, taus[i], spec.max_len)
        _set_depth(block, n_layers)
    if spec.final_norm:
        new = _set(stack, spec.final_norm, _norm(ctx, get(stack, spec.final_norm), s))
        ctx.report.add(f"{p}{spec.final_norm}", type(new).__name__)
    return None


def _convert_head(ctx: _Ctx, name: str, root: nn.Module, head: nn.Module) -> None:
    """The modules between the stack and the readout (BERT's MLM transform), then the readout."""
    p = f"{name}." if name else ""
    trunk = first(root, "head_trunk")
    if trunk is not None:
        _convert_chain(ctx, f"{p}{trunk}", get(root, trunk), last_is_readout=False)
    head_name = next(n for n, m in root.named_modules() if m is head)
    full = f"{p}{head_name}"
    if ctx.recipe.excluded(full):
        ctx.report.skip(full, "excluded by the recipe's [exclude] patterns")
        return
    new, _ = _linear(ctx, head, 1.0, readout=ctx.readout)
    if not ctx.keep:  # the model divides its logits by this (Granite, read from its config): unit logits after
        # it, and the readout's input gradient (a cut edge) undoes it in backward
        config = getattr(root, "config", None)
        new.out_mult = new.grad_input_mult = config_value(config, CONFIG_MULTIPLIERS["logit_divisor"])
    _set(root, head_name, new)
    ctx.report.add(full, f"UnitLinear (readout, {ctx.readout} rule)")


# ----------------------------------------------------------------------------------------------
# Chains: nn.Sequential MLPs, a readout's trunk
# ----------------------------------------------------------------------------------------------


def _is_mlp(m: nn.Module) -> bool:
    if type(m) is not nn.Sequential or len(m) == 0:
        return False
    kinds_ok = all(isinstance(c, (nn.Linear, nn.Dropout, nn.Identity)) or activation_kind(c) is not None for c in m)
    return kinds_ok and any(isinstance(c, nn.Linear) for c in m)


def _convert_chain(ctx: _Ctx, name: str, seq: nn.Module, last_is_readout: bool = True) -> None:
    """Linear / activation / norm children applied in registration order (the last linear the
    readout when ``last_is_readout``)."""
    children = list(seq.named_children())
    last = max((i for i, (_, c) in enumerate(children) if is_linear(c)), default=-1) if last_is_readout else -1
    r = 1.0
    for i, (child_name, child) in enumerate(children):
        full = f"{name}.{child_name}" if name else child_name
        if ctx.recipe.excluded(full):
            ctx.report.skip(full, "excluded by the recipe's [exclude] patterns")
            continue
        if is_linear(child):
            readout = ctx.readout if i == last else None
            new, r = _linear(ctx, child, r, readout=readout)
            what = "UnitLinear" + (f" (readout, {ctx.readout} rule)" if readout else "")
        elif activation_kind(child) is not None:
            new, r = _activation(ctx, child, r)
            what = f"UnitActivation({new.kind})"
        elif norm_kind(child) is not None:
            new, r = _norm(ctx, child, r), 1.0
            what = type(new).__name__
        else:
            continue
        _set(seq, child_name, new)
        ctx.report.add(full, what)


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------


def _try_rules(ctx: _Ctx, name: str, m: nn.Module) -> str | bool:
    """True when a rule converted ``m``; a string when a rule matched but could not apply; False otherwise."""
    p = f"{name}." if name else ""
    for child_name, child in m.named_children():  # a model with a readout around a stack
        head = head_of(m, child)
        spec = describe_stack(child) if head is not None else None
        if isinstance(spec, str):
            return f"{child_name}.{spec}"
        if spec is not None:
            why = _convert_stack(ctx, f"{p}{child_name}", child, spec)
            if why is None:
                _convert_head(ctx, name, m, head)
            return why or True
    spec = describe_stack(m)
    if spec is not None:
        return spec if isinstance(spec, str) else (_convert_stack(ctx, name, m, spec) or True)
    if _is_mlp(m):
        _convert_chain(ctx, name, m)
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
    of the weights).

    Under ``init="keep"`` with ``unit_scaling.verify`` (the default) a probe batch runs before
    and after (:mod:`lowprec.scaling.verify`), and a changed function raises
    :class:`~lowprec.scaling.verify.UnitScalingMismatch` naming the module where it appears;
    :func:`lowprec.convert` then restores the model."""
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
    inputs = probe_inputs(model) if ctx.keep and getattr(cfg, "verify", True) else None
    reference = record(model, inputs) if inputs is not None else None
    _visit(ctx, "", model)
    _report_leftovers(model, report)
    if reference is not None:
        dev = check_same_function(reference, model, inputs)
        report.unit_scaling_check = f"same function: output within {dev:.2g} relative on a probe batch"
    elif ctx.keep:
        report.unit_scaling_check = ("not checked: unit_scaling.verify = false" if not getattr(cfg, "verify", True)
                                     else f"not checked: no probe input known for {type(model).__name__}")
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
