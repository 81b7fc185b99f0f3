"""``export``: a model converted by :func:`lowprec.convert`, back as the plain model it came from.

A unit-scaled model keeps N(0, 1) weights and puts the scales in its ops, so its ``state_dict``
loaded into the original class computes the wrong function. :func:`export` builds a fresh
instance of the original Hugging Face class from ``model.config`` (its original attention
implementation included) and loads into it weights with every scale folded in. The converted
model is not modified.

Folding rules (``s`` a linear's forward scale: ``out_mult * fan_in**-0.5``, or the readout rule):

* linear: ``W' = s W``, ``b' = s * bias_mult * b``; under QAT ``W`` is the fake-quantized value,
  so the exported weights are the quantized ones (times a per-tensor or per-row constant); under
  FP8 the GEMM backend is dropped and the high-precision master weight is exported.
  Smooth-SwiGLU lives inside ``down_proj``'s FP8 GEMM and is exactly function-preserving, so it
  folds to nothing.
* nonlinearity ``scale * act(input_mult * u)``: ``input_mult`` into the rows of the linear that
  makes ``u`` (for a GLU, ``gate_mult`` into the gate rows), ``scale`` into the next linear's
  weight (a GLU: into the up rows).
* attention ``softmax(logit_scale * q.k) v * out_scale``: ``logit_scale / scaling`` (``scaling``
  the plain module's own) into the q rows, or into the q norm's gain when the family normalises
  q; ``out_scale`` into the output projection's weight. Under ``init="unit"`` the unit-scaled
  model computes ``out_scale`` from the key length at call time, which a plain attention cannot
  do: the export fixes it at ``seq_len`` (default: the model's context length, the length
  ``init="keep"`` fixes it at), and equals the converted model exactly at that key length.
* residual stream: the converted model computes ``x' = tau/d * B + x/d`` (``d = sqrt(1+tau^2)``);
  the plain one ``y' = y + m * B'`` (``m`` the family's residual multiplier, 1 but for Granite).
  With ``y = c x`` this holds for ``c' = c d`` and ``B' = c' tau/d B / m``: the branch weight
  folds into the branch's last linear (or its post norm's gain in sandwich / post-branch
  layouts), and the skip weight ``1/d`` becomes a growing scale ``c`` of the stream. That is
  exact because everything that reads the stream is a norm, scale-invariant (RMSNorm and
  LayerNorm, gain and bias after the normalisation) except for ``eps``, which must become
  ``eps c^2``; a branch with no norm before it (OLMo 2's post-branch layout) reads the stream
  itself, so ``1/c`` folds into its input projections' weights. Post-norm (BERT): the norm after each add resets ``c`` to 1, so ``B' = tau B``
  and that norm sees ``c = d``. The embeddings start the stream at ``c_0``: 1, or when the
  readout is tied to the embedding table, the one value that makes the table's two uses agree
  (``c_0 = s_readout / embedding_out_mult``).
* ``eps``: Hugging Face configs hold one ``eps`` for all norms, so the export sets it to the
  geometric mean of what each norm needs; the function then differs by about
  ``eps * (ratio - 1)`` relative (``eps`` 1e-6: ~1e-6), which :attr:`ExportInfo.eps_spread`
  reports.

Only Hugging Face models (``model.config``) are exported; a converted module the rules above do
not cover raises :class:`ExportError` naming it.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowprec.errors import RecipeError
from lowprec.scaling import hf as unit_hf
from lowprec.scaling.blocks import (
    CONFIG_MULTIPLIERS,
    BlockSpec,
    StackSpec,
    describe_stack,
    embedding_multiplier,
    first,
    get,
    head_of,
    norm_kind,
)
from lowprec.scaling.functional import residual_weights
from lowprec.scaling.modules import (
    UnitActivation,
    UnitEmbedding,
    UnitGLU,
    UnitLayerNorm,
    UnitLinear,
    UnitOp,
    UnitRMSNorm,
    UnitSDPA,
)

log = logging.getLogger(__name__)

EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")


class ExportError(RecipeError):
    """A converted model (or one of its parts) cannot be folded back into its original class."""


@dataclass
class ExportInfo:
    """What :func:`export` did, attached to the exported model as ``lowprec_export``."""

    seq_len: int | None  # key length the attention output scale was fixed at (None: not needed)
    stream_scale: list[float] = field(default_factory=list)  # c of each norm reading the stream
    eps: float | None = None  # the config eps written
    eps_spread: float = 0.0  # max |needed eps / written eps - 1| over the norms


# ----------------------------------------------------------------------------------------------
# Folded values: a dict of the fresh model's parameter names to float64 tensors
# ----------------------------------------------------------------------------------------------


class _Fold:
    """The converted model (``src``), the fresh plain model (``dst``) and the folded values."""

    def __init__(self, src: nn.Module, dst: nn.Module) -> None:
        self.src, self.dst = src, dst
        self.vals: dict[str, Tensor] = {}
        self.done: set[str] = set()  # converted modules whose scales are folded
        self.eps_needed: dict[str, float] = {}
        self.stream: list[float] = []
        for name, _ in dst.named_parameters(remove_duplicate=False):
            path, _, leaf = name.rpartition(".")
            m = get(src, path)
            if m is None or getattr(m, leaf, None) is None:
                raise ExportError(f"{type(src).__name__}: {name} has no counterpart in the converted model "
                                  f"(expected a module {path!r} with a {leaf!r})")
            value = getattr(m, leaf).detach().to(torch.float64).clone()  # parametrized: the fake-quantized value
            if isinstance(m, UnitLinear):
                s = m.rule(1)[0]
                value *= s if leaf == "weight" else s * m.bias_mult
                self.done.add(path)
            self.vals[name] = value
        # a tied parameter read through a plain module (BERT's predictions.bias, tied to the
        # converted decoder's bias) takes the value folded by the converted module
        by_id: dict[int, list[str]] = {}
        for name, p in dst.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        for names in by_id.values():
            owner = [n for n in names if isinstance(get(src, n.rpartition(".")[0]), UnitLinear)]
            for n in names:
                if owner and not isinstance(get(src, n.rpartition(".")[0]), UnitOp):
                    self.vals[n] = self.vals[owner[0]].clone()

    def linear_out(self, path: str, factor: float, rows: slice = slice(None), bias: bool = True) -> None:
        """Multiply the outputs ``rows`` of the linear at ``path`` by ``factor`` (weight, and bias)."""
        m = self.dst.get_submodule(path)
        dim = 0 if isinstance(m, nn.Linear) else 1  # Hugging Face Conv1D stores (in, out)
        w = self.vals[f"{path}.weight"]
        (w[rows] if dim == 0 else w[:, rows]).mul_(factor)
        if bias and f"{path}.bias" in self.vals:
            self.vals[f"{path}.bias"][rows].mul_(factor)

    def gain(self, path: str, factor: float) -> None:
        """Multiply the output of the norm at ``path`` by ``factor`` (gain, with its offset, and bias)."""
        kind = norm_kind(self.dst.get_submodule(path))
        offset = kind[1] if kind else 0.0
        w = self.vals[f"{path}.weight"]
        w.mul_(factor).add_(offset * (factor - 1.0))  # (offset + w) f - offset
        if f"{path}.bias" in self.vals:
            self.vals[f"{path}.bias"].mul_(factor)

    def norm(self, path: str, c: float) -> None:
        """The norm at ``path`` reads ``c`` times what the converted one reads: it needs ``eps c^2``."""
        m = get(self.src, path)
        eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
        if eps is not None:
            self.eps_needed[path] = float(eps) * c * c
        self.done.add(path)

    def unit(self, path: str, kind: type | tuple[type, ...]) -> nn.Module | None:
        """The converted module at ``path`` when it is a ``kind``, marked folded; else None."""
        m = get(self.src, path)
        if isinstance(m, kind):
            self.done.add(path)
            return m
        return None


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------
# The structural rules
# ----------------------------------------------------------------------------------------------


def _fold_attention(f: _Fold, p: str, spec: BlockSpec, seq_len: int | None) -> None:
    a = spec.attn
    core = _join(p, spec.attention.core)
    sdpa = f.unit(f"{core}.sdpa", UnitSDPA)
    if sdpa is None:
        return
    if sdpa.output_scale is None and seq_len is None:
        raise ExportError(f"{core}: its attention output scale depends on the key length; pass seq_len=")
    logit, out = sdpa.scales(seq_len or 1, a.head_dim)
    plain = float(getattr(f.dst.get_submodule(core), "scaling", a.head_dim**-0.5))
    q_factor = logit / plain
    if a.q_norm:
        f.gain(_join(p, a.q_norm), q_factor)
    elif a.qkv:
        f.linear_out(_join(p, a.qkv), q_factor, slice(0, a.q_width))
    else:
        f.linear_out(_join(p, a.q), q_factor)
    for n in (a.q_norm, a.k_norm):
        if n:
            f.norm(_join(p, n), 1.0)
    f.linear_out(_join(p, a.o), out, bias=False)


def _fold_mlp(f: _Fold, p: str, spec: BlockSpec) -> None:
    m = spec.ffn
    act = f.unit(_join(p, m.act), (UnitGLU, UnitActivation))
    if act is None:
        return
    up, down = _join(p, m.up), _join(p, m.down)
    if isinstance(act, UnitGLU):
        f.done.add(_join(p, spec.mlp.core))  # the UnitGLUMLPMixin forward
        if m.fused:
            half = f.dst.get_submodule(up).weight.shape[0 if isinstance(f.dst.get_submodule(up), nn.Linear) else 1] // 2
            f.linear_out(up, act.gate_mult, slice(0, half))
            f.linear_out(up, act.scale, slice(half, None))
        else:
            f.linear_out(_join(p, m.gate), act.gate_mult)
            f.linear_out(up, act.scale)
    else:
        f.linear_out(up, act.input_mult)
        f.linear_out(down, act.scale, bias=False)


def _fold_branch_output(f: _Fold, p: str, spec: BlockSpec, is_attn: bool, factor: float) -> None:
    """Multiply a branch's output by ``factor``: its last post norm's gain, else its last linear."""
    branch = spec.attention if is_attn else spec.mlp
    norms = [n for n in branch.post if isinstance(get(f.src, _join(p, n)), (UnitRMSNorm, UnitLayerNorm))]
    if norms:
        f.gain(_join(p, norms[-1]), factor)
    else:
        f.linear_out(_join(p, spec.attn.o if is_attn else spec.ffn.down), factor)


def _fold_stack(f: _Fold, name: str, spec: StackSpec, head: str | None, seq_len: int | None) -> None:
    """Embeddings, blocks and final norm of one described stack (see the module docstring)."""
    stack_src, stack_dst = get(f.src, name), get(f.dst, name)
    layers = get(stack_src, spec.layers)
    if not all(isinstance(b, unit_hf.UnitBlockMixin) for b in layers):
        return  # convert left this stack alone: its weights are plain
    # the embedding tables' own multipliers, and the stack's (Granite), converted vs plain
    attr = next((a for a in CONFIG_MULTIPLIERS["embedding"] if isinstance(getattr(stack_src, a, None), float)), None)
    m_src = getattr(stack_src, attr) if attr else spec.embedding_mult
    m_dst = getattr(stack_dst, attr) if attr else spec.embedding_mult
    emb_mult = {}
    for e in spec.embeddings:
        src = get(stack_src, e)
        k_src = src.out_mult if isinstance(src, UnitEmbedding) else (embedding_multiplier(src) or 1.0)
        emb_mult[e] = k_src * m_src / ((embedding_multiplier(get(stack_dst, e)) or 1.0) * m_dst)
        f.done.add(_join(name, e))
    c = 1.0
    if head is not None:
        e0 = spec.embeddings[0]
        if get(f.dst, head).weight is get(stack_dst, e0).weight:  # tied: one table, two uses
            w_head = get(f.src, head)
            s_head = w_head.rule(1)[0] if isinstance(w_head, UnitLinear) else 1.0
            c = s_head / emb_mult[e0]
    for e in spec.embeddings:
        f.vals[f"{_join(name, e)}.weight"].mul_(c * emb_mult[e])
    if spec.embedding_norm:
        f.norm(_join(name, spec.embedding_norm), c)
        c = 1.0
    for i, bspec in enumerate(spec.blocks):
        p = _join(name, spec.layers, str(i))
        f.done.add(p)
        _fold_attention(f, p, bspec, seq_len)
        _fold_mlp(f, p, bspec)
        block = get(f.src, p)
        for branch, attr, is_attn in ((bspec.attention, "attn_residual", True), (bspec.mlp, "mlp_residual", False)):
            res = getattr(block, attr)
            f.done.add(_join(p, attr))
            if branch.pre_norm:
                f.norm(_join(p, branch.pre_norm), c)
                f.stream.append(c)
            elif c != 1.0:  # the branch reads the stream itself (OLMo 2): its input projections undo c
                a, m = bspec.attn, bspec.ffn
                inputs = ([a.qkv] if a.qkv else [a.q, a.k, a.v]) if is_attn else [m.gate, m.up]
                for n in filter(None, inputs):
                    f.linear_out(_join(p, n), 1.0 / c, bias=False)
            for n in branch.post:
                if isinstance(get(f.src, _join(p, n)), (UnitRMSNorm, UnitLayerNorm)):
                    f.norm(_join(p, n), 1.0)
            wb, ws = residual_weights(res.tau)
            c = c / ws
            _fold_branch_output(f, p, bspec, attr == "attn_residual", c * wb / bspec.residual_mult)
            if branch.add_norm:
                f.norm(_join(p, branch.add_norm), c)
                f.stream.append(c)
                c = 1.0
    if spec.final_norm:
        f.norm(_join(name, spec.final_norm), c)
        f.stream.append(c)


def _fold_chain(f: _Fold, name: str) -> None:
    """A chain of linear / activation / norm children run in order (BERT's MLM transform)."""
    children = list(get(f.src, name).named_children())
    g = 1.0  # plain value / converted value of what flows
    for i, (child_name, child) in enumerate(children):
        path = _join(name, child_name)
        if isinstance(child, UnitLinear):
            nxt = next((c for _, c in children[i + 1:] if not isinstance(c, nn.Dropout)), None)
            g_out = nxt.input_mult if isinstance(nxt, UnitActivation) else 1.0
            f.linear_out(path, g_out, bias=True)
            f.vals[f"{path}.weight"].div_(g)
            g = g_out
        elif isinstance(child, UnitActivation):
            f.done.add(path)
            g = 1.0 / child.scale
        elif isinstance(child, (UnitRMSNorm, UnitLayerNorm)):
            f.norm(path, g)
            g = 1.0


def _find_stack(model: nn.Module) -> tuple[str, StackSpec | None, str | None]:
    """(stack path, its description, readout path), as :func:`lowprec.scaling.convert` finds them."""
    for child_name, child in model.named_children():
        head = head_of(model, child)
        if head is not None:
            spec = describe_stack(child)
            if isinstance(spec, StackSpec):
                head_name = next(n for n, m in model.named_modules() if m is head)
                return child_name, spec, head_name
    spec = describe_stack(model)
    return "", spec if isinstance(spec, StackSpec) else None, None


# ----------------------------------------------------------------------------------------------
# The shell
# ----------------------------------------------------------------------------------------------


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before lowprec swapped in a ``Unit<Class>`` subclass."""
    cls = type(module)
    while cls.__module__ == unit_hf.__name__:
        cls = cls.__mro__[1]
    return cls


def _default_seq_len(config: Any) -> int:
    return next((v for k in ("max_position_embeddings", "n_positions")
                 if isinstance(v := getattr(config, k, None), int) and v > 0), 512)


def _set_eps(f: _Fold, config: Any) -> tuple[float | None, float]:
    """Write one eps for all norms into ``config`` and the fresh model: the geometric mean of what
    each needs. Returns it and the largest relative mismatch."""
    key = next((k for k in EPS_FIELDS if isinstance(getattr(config, k, None), float)), None)
    if key is None or not f.eps_needed:
        return None, 0.0
    old = getattr(config, key)
    needed = [e for e in f.eps_needed.values() if e > 0]
    eps = math.exp(sum(math.log(e) for e in needed) / len(needed)) if needed else old
    setattr(config, key, eps)
    for m in f.dst.modules():
        for a in ("variance_epsilon", "eps"):
            if isinstance(getattr(m, a, None), float) and getattr(m, a) == old:
                setattr(m, a, eps)
    spread = max((abs(e / eps - 1.0) for e in needed), default=0.0)
    return eps, spread


@torch.no_grad()
def export(model: nn.Module, *, seq_len: int | None = None) -> nn.Module:
    """The plain model a converted ``model`` computes: a NEW instance of the Hugging Face class
    :func:`lowprec.convert` received (its own modules, ``nn.Linear``/``Conv1D``, norms, the
    original attention implementation), with every unit scale, residual weight and GLU/attention
    scale folded into its weights (rules: module docstring). ``model`` is not modified.

    QAT: the exported weights are the fake-quantized values. FP8/FP16 casts: the high-precision
    master weights are exported (the export equals the converted model with its casts off).
    ``seq_len``: the key length the unit-scaled attention's output scale is fixed at when it
    depends on it (``init="unit"``); default the model's context length. The export equals the
    converted model exactly at that key length (its eps aside, see :class:`ExportInfo`).

    A model that was never converted is returned unchanged, with a warning. A model that is not a
    Hugging Face model, or holds a converted part no rule covers, raises :class:`ExportError`."""
    if getattr(model, "lowprec_recipe", None) is None:
        warnings.warn(f"lowprec.export: {type(model).__name__} was not converted by lowprec.convert; "
                      "returned unchanged", stacklevel=2)
        return model
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        raise ExportError(f"lowprec.export: {type(model).__name__} is not a Hugging Face model (no config to "
                          "rebuild it from); export supports Hugging Face transformers")
    cls = original_class(model)
    config = copy.deepcopy(config)
    param = next(model.parameters())
    dst = cls(config).to(device=param.device, dtype=param.dtype)
    dst.train(model.training)
    stack, spec, head = _find_stack(dst)
    needs_len = any(isinstance(m, UnitSDPA) and m.output_scale is None for m in model.modules())
    seq_len = (seq_len or _default_seq_len(config)) if needs_len else None
    f = _Fold(model, dst)
    if spec is not None:
        _fold_stack(f, stack, spec, head, seq_len)
        trunk = first(model, "head_trunk")
        if trunk is not None:
            _fold_chain(f, trunk)
    leftover = [n for n, m in model.named_modules() if isinstance(m, (UnitOp, unit_hf.UnitBlockMixin,
                                                                       unit_hf.UnitGLUMLPMixin))
                and n not in f.done]
    if leftover:
        m = model.get_submodule(leftover[0])
        raise ExportError(f"lowprec.export: {leftover[0]} is a {type(m).__name__} that export has no folding "
                          f"rule for ({len(leftover)} such module(s): {', '.join(leftover[:5])})")
    eps, spread = _set_eps(f, config)
    first_value: dict[int, tuple[str, Tensor]] = {}
    for name, p in dst.named_parameters(remove_duplicate=False):
        v = f.vals[name].to(p.dtype)
        if id(p) in first_value:  # tied: both uses must fold to the same tensor
            other, v0 = first_value[id(p)]
            if not torch.allclose(v0, v, rtol=1e-5, atol=1e-12):
                raise ExportError(f"lowprec.export: {name} is tied to {other}, but the two fold to different values")
            continue
        first_value[id(p)] = (name, v)
        p.data.copy_(v)
    dst.lowprec_export = ExportInfo(seq_len=seq_len, stream_scale=f.stream, eps=eps, eps_spread=spread)
    log.info("lowprec.export: %s exported (attention output scale fixed at key length %s; eps %s, spread %.2g)",
             cls.__name__, seq_len, eps, spread)
    return dst
