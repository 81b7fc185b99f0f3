"""What a transformer is made of, as data: the description unit scaling converts from.

A :class:`StackSpec` says where a model's embeddings, blocks and final norm live; a
:class:`BlockSpec` says, for one block, where its attention and MLP parts are and how its
norms sit around the two residual adds (:data:`LAYOUTS`). :func:`describe_stack` derives both
from module names and types (:data:`NAMES`), the Hugging Face config (:data:`CONFIG_MULTIPLIERS`)
and small functional probes (:func:`norm_kind`, :func:`embedding_multiplier`,
:func:`lowprec.scaling.nonlinearity.activation_kind`), never from a class name, so a family
built from known parts needs no code of its own; a new naming or layout is one more table entry.
One generic block forward (:mod:`lowprec.scaling.hf`) runs every description.

A part that unit scaling has no rule for (:data:`NO_RULE_CONFIG`, an unknown norm or
activation, a parallel residual) makes :func:`describe_stack` return a sentence naming it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.scaling.nonlinearity import activation_kind

# Where each part is looked for, first match wins. Paths are relative to the stack (embeddings,
# layers, final norm) or to one block (everything else).
NAMES: dict[str, tuple[str, ...]] = {
    "embedding": ("embed_tokens", "wte", "embed_in", "embeddings.word_embeddings"),
    # further tables summed into the stream (GPT-2, BERT); absent ones are skipped
    "extra_embeddings": ("wpe", "embeddings.token_type_embeddings", "embeddings.position_embeddings"),
    "embedding_norm": ("embeddings.LayerNorm",),
    "layers": ("layers", "h", "encoder.layer"),
    "final_norm": ("norm", "ln_f", "final_layer_norm", "final_layernorm"),
    "attention": ("self_attn", "attn", "attention.self", "attention"),
    "q": ("q_proj", "query"),
    "k": ("k_proj", "key"),
    "v": ("v_proj", "value"),
    "qkv": ("qkv_proj", "c_attn", "query_key_value", "Wqkv"),
    "o": ("o_proj", "c_proj", "dense", "out_proj"),
    "q_norm": ("q_norm", "q_layernorm"),
    "k_norm": ("k_norm", "k_layernorm"),
    "mlp": ("mlp", "feed_forward", "intermediate"),
    "gate": ("gate_proj", "w1"),
    "gate_up": ("gate_up_proj",),  # fused, gate first (Phi-3)
    "up": ("up_proj", "c_fc", "fc1", "dense_h_to_4h", "dense", "w3"),
    "down": ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2"),
    "act": ("act_fn", "activation_fn", "act", "intermediate_act_fn"),
    # modules between the model's last norm and its readout (BERT's MLM transform)
    "head_trunk": ("cls.predictions.transform",),
}

# Config fields holding a constant the model's own forward multiplies by, outside the modules
# unit scaling replaces (Granite): the embedding output, each residual branch, the logits (divisor).
CONFIG_MULTIPLIERS = {
    "embedding": ("embedding_multiplier",),
    "residual": ("residual_multiplier",),
    "logit_divisor": ("logits_scaling",),
}

# Config fields that switch on something unit scaling has no rule for (when truthy).
NO_RULE_CONFIG = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "use_parallel_residual": "parallel residual (attention and MLP read the same input)",
    "parallel_attn": "parallel residual (attention and MLP read the same input)",
    "clip_qkv": "q/k/v clipping",
    "add_cross_attention": "cross-attention",
    "is_decoder": "decoder cross-attention",
}


@dataclass(frozen=True)
class Branch:
    """One residual branch: ``add(post(core(pre_norm(x))), x)``, then ``add_norm`` of the sum."""

    core: str  # the attention module (called with the block's arguments) or the MLP
    pre_norm: str | None = None
    post: tuple[str, ...] = ()  # applied after the core, before the add (projections, dropouts, norms)
    add_norm: str | None = None  # post-norm (BERT)


@dataclass(frozen=True)
class Layout:
    """Where a block's norms sit, recognised by the names it requires; ``post`` entries
    that a block does not have (optional dropouts) are left out."""

    name: str
    requires: tuple[str, ...]
    attention: Branch
    mlp: Branch
    causal_default: bool = True


LAYOUTS: tuple[Layout, ...] = (
    Layout("sandwich norms (Gemma 2/3)",
           ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
           Branch("", "input_layernorm", ("post_attention_layernorm",)),
           Branch("", "pre_feedforward_layernorm", ("post_feedforward_layernorm",))),
    Layout("post-branch norms (OLMo 2)", ("post_attention_layernorm", "post_feedforward_layernorm"),
           Branch("", None, ("post_attention_layernorm",)), Branch("", None, ("post_feedforward_layernorm",))),
    Layout("pre-norm", ("input_layernorm", "post_attention_layernorm"),
           Branch("", "input_layernorm", ("resid_attn_dropout", "post_attention_dropout")),
           Branch("", "post_attention_layernorm", ("resid_mlp_dropout", "post_mlp_dropout", "dropout"))),
    Layout("pre-norm (GPT-2)", ("ln_1", "ln_2"), Branch("", "ln_1"), Branch("", "ln_2")),
    Layout("post-norm (BERT)", ("attention.output.LayerNorm", "output.LayerNorm"),
           Branch("", None, ("attention.output.dense", "attention.output.dropout"), "attention.output.LayerNorm"),
           Branch("", None, ("output.dense", "output.dropout"), "output.LayerNorm"), causal_default=False),
)


@dataclass(frozen=True)
class AttentionParts:
    """Projections of one attention (paths relative to the block). ``qkv`` is a fused q/k/v
    projection (then ``q``, ``k``, ``v`` are None). ``o`` is the output projection, inside the
    core (Llama, GPT-2) or after it in the branch's ``post`` (BERT)."""

    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    q_norm: str | None
    k_norm: str | None
    head_dim: int
    q_width: int  # n_heads * head_dim
    causal: bool


@dataclass(frozen=True)
class MLPParts:
    """Projections of one MLP (paths relative to the block). ``glu``: ``down(act(gate) * up)``,
    with ``gate``/``up`` separate or fused in ``up`` (``fused``, gate first); otherwise
    ``down(act(up))``."""

    up: str
    down: str
    act: str
    gate: str | None
    fused: bool
    glu: bool
    act_kind: str


@dataclass(frozen=True)
class BlockSpec:
    layout: str
    attention: Branch
    mlp: Branch
    attn: AttentionParts
    ffn: MLPParts
    call_names: tuple[str, ...]  # the block forward's parameter names, in order (positional binding)
    attn_accepts: tuple[str, ...] | None  # names the attention core accepts; None: any (**kwargs)
    residual_mult: float  # the model's branch multiplier (Granite), reproduced under init="keep"

    @property
    def post_norm(self) -> bool:
        return self.attention.add_norm is not None


@dataclass(frozen=True)
class StackSpec:
    embeddings: tuple[str, ...]  # summed into the residual stream, relative to the stack
    embedding_norm: str | None
    embedding_mult: float  # applied by the model's forward after the sum (Granite)
    layers: str
    final_norm: str | None
    blocks: tuple[BlockSpec, ...]
    max_len: int | None


# ----------------------------------------------------------------------------------------------
# Small helpers and probes
# ----------------------------------------------------------------------------------------------


def get(module: nn.Module, path: str) -> nn.Module | None:
    """``module.get_submodule(path)`` or None."""
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def first(module: nn.Module, kind: str, check=None) -> str | None:
    """The first name of ``NAMES[kind]`` that is a submodule of ``module`` (and passes ``check``)."""
    for name in NAMES[kind]:
        m = get(module, name)
        if isinstance(m, nn.Module) and (check is None or check(m)):
            return name
    return None


def is_linear(m: nn.Module | None) -> bool:
    """An ``nn.Linear`` or Hugging Face ``Conv1D`` (a 2-D weight stored (in, out), with ``nf``)."""
    if isinstance(m, nn.Linear):
        return True
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "nf")


def config_value(config: Any, fields: tuple[str, ...], default: float = 1.0) -> float:
    for f in fields:
        v = getattr(config, f, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return default


def _probe_input(width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(3, width, generator=g) + 0.5  # a non-zero mean separates LayerNorm from RMSNorm


@torch.no_grad()
def norm_kind(module: nn.Module | None) -> tuple[str, float] | None:
    """``("rms", offset)`` or ``("layer", 0.0)`` for a module computing RMSNorm (gain
    ``offset + weight``, offset 0 or 1) or LayerNorm over the last dim, recognised by running it
    on a fixed input and comparing with each formula; None when it computes neither."""
    if module is None or isinstance(module, nn.Linear):
        return None
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    shape = getattr(module, "normalized_shape", None)
    width = w.shape[-1] if isinstance(w, torch.Tensor) else (shape[-1] if shape else None)
    if width is None or (isinstance(w, torch.Tensor) and w.dim() != 1):
        return None
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    x = _probe_input(width)
    try:
        y = module(x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    wf = w.detach().float() if isinstance(w, torch.Tensor) else None
    bf = b.detach().float() if isinstance(b, torch.Tensor) else None
    rms = F.rms_norm(x, (width,), None, eps)
    candidates = [("layer", 0.0, F.layer_norm(x, (width,), wf, bf, eps))]
    if bf is None:
        candidates += [("rms", 0.0, rms * wf if wf is not None else rms)]
        if wf is not None:
            candidates += [("rms", 1.0, rms * (1.0 + wf))]
    for kind, offset, ref in candidates:
        if torch.allclose(y.float(), ref, rtol=1e-4, atol=1e-5):
            return kind, offset
    return None


@torch.no_grad()
def embedding_multiplier(module: nn.Module) -> float | None:
    """The constant an embedding module multiplies its looked-up rows by (1 for ``nn.Embedding``,
    ``sqrt(hidden)`` for Gemma's scaled embedding), measured on a few ids; None if not constant."""
    if not isinstance(module, nn.Embedding):
        return None
    ids = torch.arange(min(module.num_embeddings, 8))
    out = module(ids).float()
    ref = F.embedding(ids, module.weight.detach().float(), module.padding_idx)
    denom = float((ref * ref).sum())
    if denom == 0.0:
        return 1.0
    c = float((out * ref).sum()) / denom
    return c if torch.allclose(out, c * ref, rtol=1e-5, atol=1e-6) else None


def _params(fn: Any) -> tuple[tuple[str, ...], bool]:
    """Parameter names of ``fn`` (``self`` dropped) and whether it takes ``**kwargs``."""
    sig = inspect.signature(fn)
    names = tuple(n for n, p in sig.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self")
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


# ----------------------------------------------------------------------------------------------
# Deriving the description
# ----------------------------------------------------------------------------------------------


def _attention_parts(block: nn.Module, core_path: str, o_path: str | None, config: Any,
                     causal_default: bool) -> AttentionParts | str:
    core = get(block, core_path)
    p = f"{core_path}."
    qkv = first(core, "qkv", is_linear)
    q, k, v = (first(core, n, is_linear) for n in ("q", "k", "v"))
    if qkv is None and None in (q, k, v):
        return f"{core_path}: no q/k/v projections (looked for {NAMES['q'] + NAMES['qkv']})"
    if o_path is None:
        o = first(core, "o", is_linear)
        if o is None:
            return f"{core_path}: no output projection (looked for {NAMES['o']})"
        o_path = p + o
    norms = {}
    for n in ("q_norm", "k_norm"):
        name = first(core, n)
        if name is not None and norm_kind(get(core, name)) is None:
            return f"{p}{name}: a {type(get(core, name)).__name__} that unit scaling has no rule for"
        norms[n] = p + name if name else None
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    head_dim = (getattr(core, "head_dim", None) or getattr(core, "attention_head_size", None)
                or getattr(config, "head_dim", None))
    if not (isinstance(n_heads, int) and isinstance(head_dim, int)):
        return f"{core_path}: cannot tell the number of heads and their width"
    causal = bool(getattr(core, "is_causal", causal_default))
    return AttentionParts(q=p + q if q else None, k=p + k if k else None, v=p + v if v else None,
                          qkv=p + qkv if qkv else None, o=o_path, q_norm=norms["q_norm"], k_norm=norms["k_norm"],
                          head_dim=head_dim, q_width=n_heads * head_dim, causal=causal)


def _mlp_parts(block: nn.Module, core_path: str, down_path: str | None) -> MLPParts | str:
    core = get(block, core_path)
    p = f"{core_path}."
    act = first(core, "act")
    if act is None:
        return f"{core_path}: no activation module (looked for {NAMES['act']})"
    kind = activation_kind(get(core, act))
    if kind is None:
        return f"{p}{act}: a {type(get(core, act)).__name__} activation that unit scaling has no rule for"
    down = down_path or (p + d if (d := first(core, "down", is_linear)) else None)
    gate, gate_up = first(core, "gate", is_linear), first(core, "gate_up", is_linear)
    up = first(core, "up", is_linear)
    if down is None or (up is None and gate_up is None):
        return f"{core_path}: no up/down projections (looked for {NAMES['up']} and {NAMES['down']})"
    if gate_up is not None:
        return MLPParts(up=p + gate_up, down=down, act=p + act, gate=None, fused=True, glu=True, act_kind=kind)
    return MLPParts(up=p + up, down=down, act=p + act, gate=p + gate if gate else None, fused=False,
                    glu=gate is not None, act_kind=kind)


def describe_block(block: nn.Module, config: Any) -> BlockSpec | str:
    """The description of one transformer block, or why it cannot be given."""
    for key, what in NO_RULE_CONFIG.items():
        if getattr(config, key, None):
            return f"{what} ({key}={getattr(config, key)!r}) has no unit-scaling rule"
    layout = next((lay for lay in LAYOUTS if all(get(block, n) is not None for n in lay.requires)), None)
    if layout is None:
        names = sorted(n for n, _ in block.named_children())
        return f"{type(block).__name__}: no known norm layout for children {names}"
    attn_core = first(block, "attention")
    mlp_core = first(block, "mlp")
    if attn_core is None or mlp_core is None:
        return f"{type(block).__name__}: no attention ({NAMES['attention']}) or MLP ({NAMES['mlp']}) child"
    has = lambda path: get(block, path) is not None  # noqa: E731
    post = lambda br: tuple(n for n in br.post if has(n))  # noqa: E731
    attention = Branch(attn_core, layout.attention.pre_norm, post(layout.attention), layout.attention.add_norm)
    mlp = Branch(mlp_core, layout.mlp.pre_norm, post(layout.mlp), layout.mlp.add_norm)
    for br in (attention, mlp):
        for n in (br.pre_norm, br.add_norm, *br.post):
            m = get(block, n) if n else None
            if n and not isinstance(m, nn.Dropout) and not is_linear(m) and norm_kind(m) is None:
                return f"{n}: a {type(m).__name__} norm that unit scaling has no rule for"
    o_path = next((n for n in attention.post if is_linear(get(block, n))), None)
    down_path = next((n for n in mlp.post if is_linear(get(block, n))), None)
    attn = _attention_parts(block, attn_core, o_path, config, layout.causal_default)
    if isinstance(attn, str):
        return attn
    ffn = _mlp_parts(block, mlp_core, down_path)
    if isinstance(ffn, str):
        return ffn
    call_names, _ = _params(type(block).forward)
    accepts, any_kw = _params(type(get(block, attn_core)).forward)
    return BlockSpec(layout=layout.name, attention=attention, mlp=mlp, attn=attn, ffn=ffn, call_names=call_names,
                     attn_accepts=None if any_kw else accepts,
                     residual_mult=config_value(config, CONFIG_MULTIPLIERS["residual"]))


def describe_stack(stack: nn.Module) -> StackSpec | str | None:
    """The description of a transformer stack (embeddings, a list of blocks, final norm), a
    sentence naming the part that has no rule, or None when ``stack`` is not a transformer stack."""
    layers_name = first(stack, "layers", lambda m: isinstance(m, nn.ModuleList) and len(m) > 0)
    emb_name = first(stack, "embedding")
    if layers_name is None or emb_name is None:
        return None
    config = getattr(stack, "config", None)
    embeddings = [emb_name] + [n for n in NAMES["extra_embeddings"] if isinstance(get(stack, n), nn.Embedding)]
    for n in embeddings:
        if embedding_multiplier(get(stack, n)) is None:
            return f"{n}: a {type(get(stack, n)).__name__} that is not a (scaled) embedding lookup"
    final = first(stack, "final_norm")
    if final is not None and norm_kind(get(stack, final)) is None:
        return f"{final}: a {type(get(stack, final)).__name__} norm that unit scaling has no rule for"
    emb_norm = first(stack, "embedding_norm")
    blocks = []
    for i, block in enumerate(get(stack, layers_name)):
        spec = describe_block(block, config)
        if isinstance(spec, str):
            return f"{layers_name}.{i}: {spec}"
        blocks.append(spec)
    max_len = next((v for f in ("max_position_embeddings", "n_positions")
                    if isinstance(v := getattr(config, f, None), int) and v > 0), None)
    return StackSpec(embeddings=tuple(embeddings), embedding_norm=emb_norm,
                     embedding_mult=config_value(config, CONFIG_MULTIPLIERS["embedding"]),
                     layers=layers_name, final_norm=final, blocks=tuple(blocks), max_len=max_len)


def head_of(root: nn.Module, stack: nn.Module) -> nn.Module | None:
    """``root``'s readout (its output embedding) when it is a linear layer outside ``stack``."""
    get_out = getattr(root, "get_output_embeddings", None)
    try:
        head = get_out() if get_out is not None else None
    except Exception:
        head = None
    if head is None or not is_linear(head) or any(head is m for m in stack.modules()):
        return None
    return head

