"""AdamW with quantized moments: ``AdamW4bit``, ``AdamW8bit``, ``AdamWFp8``.

Thin ``torch.optim.Optimizer`` shells over the pure step functions of
:mod:`lowprec.optim.functional` (the reference) and two hand-written kernels that equal it bit
for bit: the Triton kernel of :mod:`lowprec.kernels.adamw_step` (CUDA) and the C loop of
:mod:`lowprec.kernels.adamw_step_cpu` (CPU; where no C compiler is found, the reference compiled
with ``torch.compile``). State layout, per parameter
(``optimizer.state[p]``, plain tensors only, so ``state_dict()`` loads with
``torch.load(weights_only=True)``):

* ``step``: float32 scalar tensor (as torch's AdamW).
* float32 states (tensors below ``min_quant_size`` elements, or matched by ``fp32_state_params``
  / ``fp32_state_patterns``): ``exp_avg``, ``exp_avg_sq`` shaped like the (local) parameter.
* quantized m: ``exp_avg_codes`` (uint8, ``(n_blocks, B/2)`` packed 4-bit or ``(n_blocks, B)``),
  ``exp_avg_absmax`` (float32, ``(n_blocks,)``).
* quantized v in blocks: ``exp_avg_sq_codes``, ``exp_avg_sq_absmax`` likewise; rank-1
  normalised v: ``exp_avg_sq_codes``, ``exp_avg_sq_row``, ``exp_avg_sq_col``; factored v (no
  codes): ``exp_avg_sq_row``, ``exp_avg_sq_col`` (float32 EMAs of row / column means of g^2).

``state_dict()`` adds to each parameter's saved state a ``state_format`` string recording the
formats and layout it was written with (:meth:`QuantizedAdamW.state_format`; the live state stays
tensors only). ``load_state_dict`` refuses a state without that record or with another one, and
any tensor whose dtype or shape is not the one this optimizer creates
(:meth:`QuantizedAdamW.state_spec`), before changing anything.

DTensor parameters (FSDP2 ``fully_shard``): whether a tensor is quantized is decided on the
*full* parameter's size, then each rank quantizes its local shard; states are the local shard's
plain tensors (not DTensors), saved per rank.

Non-finite gradients: a param group with any NaN/Inf gradient is skipped whole (weights, states
and step counts untouched) and ``group["skipped_steps"]`` counts it; ``nonfinite="raise"``
raises instead.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lowprec.compiled import run_compiled
from lowprec.kernels import adamw_step_cpu
from lowprec.kernels.dispatch import choose_backend, forced_backend
from lowprec.optim import functional as F
from lowprec.optim.state_quant import (
    M_DE4_B128,
    M_DE8_B256,
    M_E4M3_B256,
    V_DE8U_B256,
    V_E5M2_B256,
    V_LINEAR4_B128,
    StateFormat,
    as_matrix,
    codes_shape,
    num_blocks,
    to_blocks,
    zero_code_byte,
)

# bitsandbytes and torchao keep float32 states below 4096 elements.
DEFAULT_MIN_QUANT_SIZE = 4096
# Name patterns for embeddings (8-bit embedding states destabilised pretraining in bitsandbytes'
# users' reports): pass ``fp32_state_patterns=EMBEDDING_PATTERNS`` with named parameters.
EMBEDDING_PATTERNS = (r"embed", r"\bwte\b", r"\bwpe\b")

V_MODES = ("block", "rank1")

# The per-parameter state entry recording the state's format (a string, so that it survives
# torch.save / torch.load(weights_only=True) and DCP checkpoints as a plain value).
STATE_FORMAT_KEY = "state_format"
# Version tag of the state layout below; bump it when a layout changes meaning.
STATE_FORMAT_TAG = "lowprec.QuantizedAdamW/1"
# Param-group options that decide a parameter's state layout: a saved group must agree on them.
LAYOUT_OPTIONS = ("min_quant_size", "v_mode", "factor_second_moment")


@dataclass(frozen=True)
class StateSlot:
    """One tensor of a parameter's optimizer state, as :meth:`QuantizedAdamW._init_state` creates
    it and :meth:`QuantizedAdamW.load_state_dict` requires it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codes_of: StateFormat | None = None  # uint8 codes of this format: start as the code of 0
    device: str | None = None  # None: the (local) parameter's device

    def new(self, param_device: torch.device) -> torch.Tensor:
        """The initial tensor: codes of zeros, or zeros."""
        device = self.device or param_device
        if self.codes_of is not None:
            return torch.full(self.shape, zero_code_byte(self.codes_of), dtype=torch.uint8, device=device)
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def describe(self) -> str:
        return f"a {self.dtype} tensor of shape {self.shape}"

    def mismatch(self, value: Any) -> str | None:
        """What is wrong with ``value`` as this slot's tensor (``None``: nothing)."""
        if not isinstance(value, torch.Tensor) or hasattr(value, "device_mesh"):
            return f"a {type(value).__name__}"
        if value.layout != torch.strided or value.dtype != self.dtype or tuple(value.shape) != self.shape:
            return f"a {value.dtype} tensor of shape {tuple(value.shape)}" + (
                f" (layout {value.layout})" if value.layout != torch.strided else "")
        return None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _layout_of(state: Mapping[str, Any]) -> str:
    """The layout of a parameter's live state, read from its keys (as the step dispatches on it):
    'fp32', or the v layout of quantized states ('block', 'rank1', 'factored')."""
    if "exp_avg" in state:
        return "fp32"
    if "exp_avg_sq_absmax" in state:
        return "block"
    return "rank1" if "exp_avg_sq_codes" in state else "factored"


# ----------------------------------------------------------------------------------------------
# Compiled CPU steps: one compiled function per step function and pair of state formats, shared
# by every parameter; the block count is marked dynamic, so one graph serves every size (per dtype).
# ----------------------------------------------------------------------------------------------

# Elements per call of the compiled CPU step: the requantize pass re-reads what the update pass
# just read while it is still in cache, and inductor's temporary buffers stay small (a 64 MiB one
# is a fresh mmap, page-faulted on every step). Measured on one 4096x4096 parameter, 1 thread:
# 85 ms per step unchunked, 43-48 ms in chunks of 2**18 to 2**20 elements.
CPU_CHUNK_ELEMENTS = 1 << 20


def _compiled_blocks_step(p2: torch.Tensor, g2: torch.Tensor, mc: torch.Tensor, ma: torch.Tensor, vc: torch.Tensor,
                          va: torch.Tensor, hp: torch.Tensor, mf: StateFormat, vf: StateFormat, maximize: bool) -> None:
    """The compiled CPU step on ``(n_blocks, B)`` views: two graphs per pair of state formats, each
    one vectorised loop (update ``p`` and reduce the new absmax; requantize), shared by every
    parameter (block count dynamic), run chunk by chunk (:data:`CPU_CHUNK_ELEMENTS`)."""
    key = f"{mf.name}-{vf.name}"
    if mf.packed and vf.packed:
        p2, g2 = F.half_block_views(p2, g2)
    nb = p2.shape[0]
    chunk = max(2, CPU_CHUNK_ELEMENTS // mf.block_size)
    start = 0
    while start < nb:
        end = start + chunk
        if nb - end < 2:  # no 1-block tail: dynamo would specialise (and compile) a graph for it
            end = nb
        a = [t[start:end] for t in (p2, g2, mc, ma, vc, va)]
        new_ma, new_va = run_compiled(f"optim:update-{key}", F.adamw_blocks_update_, *a, hp, mf, vf, maximize,
                                      dynamic_args=a, dynamic=False, fullgraph=True)
        run_compiled(f"optim:requantize-{key}", F.adamw_blocks_requantize_, *a[1:], new_ma, new_va, hp, mf, vf,
                     maximize, dynamic=False, fullgraph=True)
        a[3].copy_(new_ma)
        a[5].copy_(new_va)
        start = end


class QuantizedAdamW(Optimizer):
    """AdamW whose moments are stored block-quantized (shared base of the three optimizers).

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param groups.
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (decoupled weight decay).
        amsgrad: not supported (raises).
        min_quant_size: tensors with fewer elements (the *full* parameter, even when sharded) keep
            float32 states.
        fp32_state_params: parameters (tensors or names) that keep float32 states.
        fp32_state_patterns: regular expressions; named parameters whose name matches keep float32
            states (e.g. :data:`EMBEDDING_PATTERNS`).
        nonfinite: ``"skip"`` (count in ``group["skipped_steps"]``) or ``"raise"``.
        compile: run the CPU step through its fast path (``True``): the hand-written C kernel
            (:mod:`lowprec.kernels.adamw_step_cpu`), or where it cannot be built, the step compiled
            with ``torch.compile``; ``False`` runs the eager PyTorch reference. All three agree
            bit for bit. ``LOWPREC_KERNELS=torch`` skips the C kernel, ``LOWPREC_C_KERNELS=0``
            turns it off.
    """

    M_FORMAT: StateFormat = M_DE4_B128
    V_FORMAT: StateFormat = V_LINEAR4_B128

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        min_quant_size: int = DEFAULT_MIN_QUANT_SIZE,
        fp32_state_params: Iterable[torch.Tensor | str] = (),
        fp32_state_patterns: Iterable[str] = (),
        v_mode: str = "block",
        factor_second_moment: bool = False,
        nonfinite: str = "skip",
        compile: bool = True,
    ) -> None:
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name}: amsgrad=True is not supported (it would need a third, quantized state)")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise ValueError(f"{name}: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"{name}: invalid eps {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1); got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"{name}: invalid weight_decay {weight_decay}")
        if v_mode not in V_MODES:
            raise ValueError(f"{name}: v_mode must be one of {V_MODES}; got {v_mode!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"{name}: nonfinite must be 'skip' or 'raise'; got {nonfinite!r}")
        if not isinstance(min_quant_size, int) or min_quant_size < 0:
            raise ValueError(f"{name}: min_quant_size must be a non-negative int; got {min_quant_size!r}")
        self._fp32_ids = {id(t) for t in fp32_state_params if isinstance(t, torch.Tensor)}
        self._fp32_names = {t for t in fp32_state_params if isinstance(t, str)}
        self._fp32_patterns = [re.compile(p) for p in fp32_state_patterns]
        self.compile = bool(compile)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=maximize, min_quant_size=min_quant_size, v_mode=v_mode,
                        factor_second_moment=bool(factor_second_moment), nonfinite=nonfinite,
                        skipped_steps=0)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Which tensors are quantized
    # ------------------------------------------------------------------------------------------

    def _param_name(self, group: dict[str, Any], index: int) -> str | None:
        names = group.get("param_names")
        return names[index] if names is not None and index < len(names) else None

    def _keeps_fp32(self, p: torch.Tensor, name: str | None, group: dict[str, Any]) -> bool:
        if p.numel() < group["min_quant_size"]:  # DTensor.numel() is the full parameter's
            return True
        if id(p) in self._fp32_ids:
            return True
        if name is not None and (name in self._fp32_names or any(r.search(name) for r in self._fp32_patterns)):
            return True
        return False

    def _v_layout(self, p: torch.Tensor, group: dict[str, Any]) -> str:
        """'factored', 'rank1' or 'block' for a quantized tensor."""
        if group["factor_second_moment"] and p.dim() >= 2:
            return "factored"
        if group["v_mode"] == "rank1" and p.dim() >= 2:
            return "rank1"
        return "block"

    def _layout(self, p: torch.Tensor, name: str | None, group: dict[str, Any]) -> str:
        """'fp32', or for a quantized tensor the v layout (:meth:`_v_layout` of the local shard)."""
        return "fp32" if self._keeps_fp32(p, name, group) else self._v_layout(_local(p), group)

    def state_format(self, layout: str) -> str:
        """The record of a state written by this optimizer in ``layout`` ('fp32', 'block', 'rank1'
        or 'factored'): the layout version, both state formats and the layout. Two optimizers
        whose records differ do not read each other's states (AdamW8bit and AdamWFp8 have the same
        tensors but other maps)."""
        return f"{STATE_FORMAT_TAG}:m={self.M_FORMAT.name},v={self.V_FORMAT.name},layout={layout}"

    def state_spec(self, p: torch.Tensor, name: str | None, group: dict[str, Any]) -> tuple[str, dict[str, StateSlot]]:
        """The state this optimizer keeps for ``p`` (named ``name``, in ``group``): its format record
        and its tensors (``{key: StateSlot}``). The one place that decides the layout:
        :meth:`_init_state` allocates from it and :meth:`load_state_dict` checks saved states
        against it. Shapes are the local shard's for DTensor parameters."""
        local = _local(p)
        n = local.numel()
        layout = self._layout(p, name, group)
        f32 = torch.float32
        slots = {"step": StateSlot(f32, (), device="cpu")}
        if layout == "fp32":
            slots["exp_avg"] = StateSlot(f32, tuple(local.shape))
            slots["exp_avg_sq"] = StateSlot(f32, tuple(local.shape))
            return self.state_format(layout), slots
        slots["exp_avg_codes"] = StateSlot(torch.uint8, codes_shape(n, self.M_FORMAT), self.M_FORMAT)
        slots["exp_avg_absmax"] = StateSlot(f32, (num_blocks(n, self.M_FORMAT.block_size),))
        if layout in ("block", "rank1"):
            slots["exp_avg_sq_codes"] = StateSlot(torch.uint8, codes_shape(n, self.V_FORMAT), self.V_FORMAT)
        if layout == "block":
            slots["exp_avg_sq_absmax"] = StateSlot(f32, (num_blocks(n, self.V_FORMAT.block_size),))
        else:
            rows, cols = as_matrix(local.shape)
            slots["exp_avg_sq_row"] = StateSlot(f32, (rows,))
            slots["exp_avg_sq_col"] = StateSlot(f32, (cols,))
        return self.state_format(layout), slots

    def _init_state(self, p: torch.Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Any]:
        _, slots = self.state_spec(p, name, group)
        state = self.state[p]
        device = _local(p).device
        for key, slot in slots.items():
            state[key] = slot.new(device)
        return state

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------

    def _where(self, group_index: int, index: int, name: str | None, p: torch.Tensor, method: str = "") -> str:
        """The parameter named in an error message (and the method raising it, if given)."""
        who = f"{type(self).__name__}.{method}:" if method else type(self).__name__
        return f"{who} param group {group_index}, parameter {name if name is not None else index} (shape {tuple(p.shape)})"

    @staticmethod
    def _check_grad(p: torch.Tensor, g: torch.Tensor, where: Callable[[], str]) -> None:
        """Raise for gradients the step cannot take; ``where()`` names the parameter (built only on error)."""
        if g.is_sparse:
            raise RuntimeError(f"{where()}: sparse gradients are not supported (use a dense embedding or SparseAdam)")
        if g.is_complex() or p.is_complex():
            raise RuntimeError(f"{where()}: complex parameters/gradients are not supported (view them as real "
                               f"with torch.view_as_real)")
        if not p.is_floating_point():
            raise RuntimeError(f"{where()}: parameter has non-floating dtype {p.dtype}")

    @staticmethod
    def _local_all_finite(grads: list[torch.Tensor]) -> bool:
        """True when every gradient is finite. A finite sum proves it (inf/NaN propagate through a
        sum) at the cost of one read; only a non-finite sum (or an overflow) is checked element-wise."""
        if not grads:
            return True
        fast = adamw_step_cpu.all_finite(grads)  # CPU tensors: one C call for the group
        if fast is not None:
            return fast
        sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
        if bool(torch.isfinite(sums).all()):
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)

    @classmethod
    def _all_finite(cls, params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
        """:meth:`_local_all_finite`, agreed across ranks when parameters are sharded DTensors, so
        that every rank skips (or steps) the group together."""
        ok = cls._local_all_finite(grads)
        meshes = [p.device_mesh for p in params if hasattr(p, "device_mesh")]
        if meshes and torch.distributed.is_available() and torch.distributed.is_initialized():
            mesh = meshes[0]
            group = mesh.get_group() if mesh.ndim == 1 else None
            flag = torch.tensor([0.0 if ok else 1.0], device=grads[0].device if grads else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
            ok = bool(flag.item() == 0.0)
        return ok

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            items = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = self._param_name(group, i)
                self._check_grad(p, p.grad, functools.partial(self._where, gi, i, name, p))
                items.append((p, name, i))
            if not items:
                continue
            grads = [_local(p.grad) for p, _, _ in items]
            if not self._all_finite([p for p, _, _ in items], grads):
                if group["nonfinite"] == "raise":
                    bad = [self._where(gi, i, name, p) for (p, name, i), g in zip(items, grads)
                           if not bool(torch.isfinite(g).all())]
                    raise FloatingPointError(f"{type(self).__name__}: non-finite gradient in {bad[0]}"
                                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
                group["skipped_steps"] = int(group.get("skipped_steps", 0)) + 1
                continue
            c_dtypes = self._c_kernel_dtypes()
            blocks, fp32 = [], []
            for (p, name, _), g in zip(items, grads):
                state = self.state[p]
                if len(state) == 0:
                    state = self._init_state(p, name, group)
                kind = self._c_kernel_kind(p, g, state, c_dtypes) if c_dtypes else None
                if kind == "blocks":
                    blocks.append((_local(p), g, state))
                elif kind == "fp32":
                    fp32.append((_local(p), g, state))
                else:
                    self._step_param(p, g, state, group)
            if blocks or fp32:
                self._step_c_kernel(blocks, fp32, group)
        return loss

    def _c_kernel_dtypes(self) -> frozenset[torch.dtype]:
        """Parameter dtypes the CPU C kernel steps for this optimizer now: none when it is off
        (``compile=False``, ``LOWPREC_KERNELS=torch``, ``LOWPREC_C_KERNELS=0``) or unbuildable."""
        if not self.compile or forced_backend() is not None:
            return frozenset()
        return adamw_step_cpu.supported_dtypes()

    @staticmethod
    def _c_kernel_takes(p: torch.Tensor, g: torch.Tensor, dtypes: frozenset[torch.dtype]) -> bool:
        """Whether the C kernel can read ``p`` and ``g`` in place: contiguous CPU tensors of one
        dtype in ``dtypes`` (:meth:`_c_kernel_dtypes`)."""
        return (p.dtype in dtypes and g.dtype == p.dtype and p.is_cpu and g.is_cpu and p.is_contiguous()
                and g.is_contiguous())

    def _c_kernel_kind(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any],
                       dtypes: frozenset[torch.dtype]) -> str | None:
        """``"blocks"`` or ``"fp32"`` for a tensor the CPU C kernel steps in place (block-quantized m
        and v whose size is a whole number of blocks, or float32 states), else ``None`` (then
        :meth:`_step_param` runs: padded copies, rank-1 / factored v, Triton, other devices).
        ``dtypes``: the parameter dtypes the kernel supports here."""
        pl = _local(p)
        n = pl.numel()
        step = state["step"]
        if not (n > 0 and self._c_kernel_takes(pl, g, dtypes) and step.dtype == torch.float32 and step.is_cpu):
            return None
        layout = _layout_of(state)
        if layout == "fp32":
            return "fp32"
        bs = self.M_FORMAT.block_size
        if (layout == "block" and n % bs == 0 and state["exp_avg_absmax"].numel() == n // bs
                and adamw_step_cpu.supports_formats(self.M_FORMAT, self.V_FORMAT)):
            return "blocks"
        return None

    def _step_c_kernel(self, blocks: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                       fp32: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]], group: dict[str, Any]) -> None:
        """Two C calls for a whole param group: the block-quantized tensors and the float32-state
        ones (a call per tensor measured ~40 us of Python each: half the step on the demo Llama).
        Step counts advance only once the kernels have run."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        maximize = bool(group["maximize"])
        hps: dict[int, torch.Tensor] = {}

        def hp_of(st: dict[str, Any]) -> torch.Tensor:
            k = int(st["step"].item()) + 1
            if k not in hps:
                hps[k] = F.hyperparams(lr, beta1, beta2, group["eps"], group["weight_decay"], k)
            return hps[k]

        if blocks:
            adamw_step_cpu.adamw_tensors_cpu_(
                [p for p, _, _ in blocks], [g for _, g, _ in blocks],
                [st["exp_avg_codes"] for _, _, st in blocks], [st["exp_avg_absmax"] for _, _, st in blocks],
                [st["exp_avg_sq_codes"] for _, _, st in blocks], [st["exp_avg_sq_absmax"] for _, _, st in blocks],
                [hp_of(st) for _, _, st in blocks], self.M_FORMAT, self.V_FORMAT, maximize, check=False)
        if fp32:
            adamw_step_cpu.adamw_fp32_tensors_cpu_(
                [p for p, _, _ in fp32], [g for _, g, _ in fp32], [st["exp_avg"] for _, _, st in fp32],
                [st["exp_avg_sq"] for _, _, st in fp32], [hp_of(st) for _, _, st in fp32], maximize, check=False)
        adamw_step_cpu.increment_([st["step"] for _, _, st in blocks + fp32])

    def _step_param(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        pl = _local(p)
        if pl.numel() == 0:
            return
        hp = F.hyperparams(lr, beta1, beta2, group["eps"], group["weight_decay"], step, device=pl.device)
        maximize = bool(group["maximize"])
        layout = _layout_of(state)
        if layout == "fp32":
            F.adamw_fp32_(pl, g, state["exp_avg"], state["exp_avg_sq"], hp, maximize)
            return
        mf, vf = self.M_FORMAT, self.V_FORMAT
        mc, ma = state["exp_avg_codes"], state["exp_avg_absmax"]
        if layout == "block":
            self._step_blocks(pl, g, mc, ma, state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], hp, maximize)
        elif layout == "rank1":
            args = (pl, g, mc, ma, state["exp_avg_sq_codes"], state["exp_avg_sq_row"], state["exp_avg_sq_col"], hp,
                    mf, vf, maximize)
            if self._c_kernel_takes(pl, g, self._c_kernel_dtypes()) and adamw_step_cpu.supports_formats(mf, vf):
                adamw_step_cpu.adamw_rank1_cpu_(*args)
            else:
                F.adamw_rank1_(*args)
        else:
            F.adamw_factored_(pl, g, mc, ma, state["exp_avg_sq_row"], state["exp_avg_sq_col"], hp, mf, maximize)

    def _step_blocks(self, p: torch.Tensor, g: torch.Tensor, mc: torch.Tensor, ma: torch.Tensor,
                     vc: torch.Tensor, va: torch.Tensor, hp: torch.Tensor, maximize: bool) -> None:
        """Block-quantized m and v: one fused pass over ``(n_blocks, B)`` views; a parameter whose
        size is not a multiple of B (or that is not contiguous) runs on padded copies."""
        mf, vf = self.M_FORMAT, self.V_FORMAT
        bs = mf.block_size
        n = p.numel()
        direct = p.is_contiguous() and g.is_contiguous() and n % bs == 0
        p2 = p.view(-1, bs) if direct else to_blocks(p, bs).to(p.dtype)
        g2 = g.view(-1, bs) if direct else to_blocks(g, bs).to(g.dtype)
        self._check_block_states(n, p.device, {"exp_avg_codes": mc, "exp_avg_absmax": ma, "exp_avg_sq_codes": vc,
                                                "exp_avg_sq_absmax": va})
        backend = choose_backend(p2, g2, kernel="adamw_step")
        if backend == "triton":
            from lowprec.kernels.adamw_step import adamw_blocks_triton_

            adamw_blocks_triton_(p2, g2, mc, ma, vc, va, hp, mf, vf, maximize)
        elif self._c_kernel_takes(p2, g2, self._c_kernel_dtypes()) and adamw_step_cpu.supports_formats(mf, vf):
            adamw_step_cpu.adamw_blocks_cpu_(p2, g2, mc, ma, vc, va, hp, mf, vf, maximize)
        elif self.compile:
            _compiled_blocks_step(p2, g2, mc, ma, vc, va, hp, mf, vf, maximize)
        else:
            F.adamw_blocks_(p2, g2, mc, ma, vc, va, hp, mf, vf, maximize)
        if not direct:
            p.copy_(p2.reshape(-1)[:n].view(p.shape))

    def _check_block_states(self, n: int, device: torch.device, states: dict[str, torch.Tensor]) -> None:
        """Raise ``RuntimeError`` unless the block states of an ``n``-element parameter are
        contiguous tensors on its device with the dtype and size :meth:`state_spec` gives them: the
        Triton kernel trusts them (a state edited in place after load_state_dict's check)."""
        nb = num_blocks(n, self.M_FORMAT.block_size)
        want = {"exp_avg_codes": (torch.uint8, math.prod(codes_shape(n, self.M_FORMAT))),
                "exp_avg_sq_codes": (torch.uint8, math.prod(codes_shape(n, self.V_FORMAT))),
                "exp_avg_absmax": (torch.float32, nb), "exp_avg_sq_absmax": (torch.float32, nb)}
        for key, t in states.items():
            dtype, numel = want[key]
            if t.dtype != dtype or t.numel() != numel or t.device != device or not t.is_contiguous():
                raise RuntimeError(f"{type(self).__name__}: state {key!r} is {t.dtype} of {t.numel()} elements on "
                                   f"{t.device}; a parameter of {n} elements needs contiguous {dtype} of {numel} "
                                   f"on {device} (state edited or loaded for another parameter?)")

    # ------------------------------------------------------------------------------------------
    # Loading a state dict: everything checked before anything changes
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, each parameter's saved state with its ``state_format`` record added
        (:meth:`state_format` of the layout it holds): what :meth:`load_state_dict` checks. The
        saved states are new dicts; the live ones stay tensors only."""
        sd = super().state_dict()
        sd["state"] = {pid: {**st, STATE_FORMAT_KEY: self.state_format(_layout_of(st))} if st else st
                       for pid, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict` of an optimizer with the same formats and layout.

        Checked first, for every saved parameter state (a failed load changes nothing): the
        ``state_format`` record equals the one this optimizer writes for that parameter (a state
        without one, from ``torch.optim.AdamW``, another optimizer or an older lowprec, is
        refused), the keys are exactly :meth:`state_spec`'s and each tensor has its dtype and shape;
        param groups match in number, size and the options that decide the layout
        (:data:`LAYOUT_OPTIONS`). Raises ``ValueError`` naming the parameter and the state.

        torch's loader casts every floating-point state to the parameter's dtype (and would turn
        uint8 codes into floats and float32 absmax into bf16): the saved tensors are restored as
        saved, as contiguous copies on the parameter's device."""
        checked = self._check_state_dict(state_dict)
        saved = state_dict["state"]
        # torch's loader takes the param groups; the states go in below (its cast copies of them
        # would be thrown away, uint8 codes cast to float costing 4x their size meanwhile)
        super().load_state_dict({**state_dict, "state": {pid: {} for pid in saved}})
        for pid, (p, slots) in checked.items():
            state = self.state[p]
            device = _local(p).device
            for key, slot in slots.items():
                state[key] = saved[pid][key].detach().to(device=slot.device or device,
                                                         memory_format=torch.contiguous_format, copy=True)

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` where :meth:`load_state_dict` would refuse ``state_dict``; change
        nothing (for loaders that check every part of a checkpoint before loading any)."""
        self._check_state_dict(state_dict)

    def _check_state_dict(self, state_dict: Any) -> dict[Any, tuple[torch.Tensor, dict[str, StateSlot]]]:
        """Check a state dict against this optimizer (raise ``ValueError``); return, for each saved
        parameter state, its id -> (this optimizer's parameter, its :meth:`state_spec` slots)."""
        cls = type(self).__name__
        if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping)
                and isinstance(state_dict.get("param_groups"), (list, tuple))):
            raise ValueError(f"{cls}.load_state_dict: expected a dict with 'state' and 'param_groups' "
                             f"(as state_dict() returns); got {type(state_dict).__name__}")
        places = self._check_saved_groups(state_dict["param_groups"])
        checked = {}
        for pid, saved in state_dict["state"].items():
            if pid not in places:
                raise ValueError(f"{cls}.load_state_dict: saved state for parameter id {pid!r}, which no saved "
                                 "param group lists")
            if isinstance(saved, Mapping) and not saved:  # no state yet: created at the first step
                continue
            gi, i = places[pid]
            checked[pid] = (self.param_groups[gi]["params"][i], self._check_saved_state(gi, i, saved))
        self._check_layout_options(state_dict["param_groups"])
        return checked

    def _check_layout_options(self, saved_groups: list[Mapping[str, Any]]) -> None:
        """The saved groups' :data:`LAYOUT_OPTIONS` are this optimizer's (torch's loader would
        replace them, and the states created later would follow the saved ones)."""
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for option in LAYOUT_OPTIONS:
                found = saved.get(option, "(missing)")
                if found != group[option]:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: saved param group {gi} has {option}="
                                     f"{found!r}; this optimizer has {group[option]!r} (it decides the states' layout)")

    def _check_saved_groups(self, saved_groups: list[Any]) -> dict[Any, tuple[int, int]]:
        """Same number of groups, of the same sizes, each saved parameter id listed once; returns
        saved id -> (group index, index)."""
        cls = type(self).__name__
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{cls}.load_state_dict: the saved state has {len(saved_groups)} param groups; this "
                             f"optimizer has {len(self.param_groups)}")
        places: dict[Any, tuple[int, int]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            ids = saved.get("params") if isinstance(saved, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(group["params"]):
                size = len(ids) if isinstance(ids, (list, tuple)) else "no"
                raise ValueError(f"{cls}.load_state_dict: saved param group {gi} has {size} parameters; this "
                                 f"optimizer's has {len(group['params'])}")
            for i, pid in enumerate(ids):
                if not isinstance(pid, (int, str)) or pid in places:
                    raise ValueError(f"{cls}.load_state_dict: saved param group {gi} lists parameter id {pid!r} "
                                     "twice or of a type other than int/str")
                places[pid] = (gi, i)
        return places

    def _check_saved_state(self, gi: int, i: int, saved: Any) -> dict[str, StateSlot]:
        """Check that a saved parameter state is the one this optimizer keeps for parameter ``i`` of
        group ``gi`` (same format record, same keys, each tensor of the same dtype and shape, a
        non-negative whole step count); return the expected slots."""
        group = self.param_groups[gi]
        p = group["params"][i]
        name = self._param_name(group, i)
        where = self._where(gi, i, name, p, "load_state_dict")
        record, slots = self.state_spec(p, name, group)
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where}: the saved state is a {type(saved).__name__}, not a dict")
        found = saved.get(STATE_FORMAT_KEY)
        if found is None:
            raise ValueError(f"{where}: the saved state has no {STATE_FORMAT_KEY!r} record (written by "
                             "torch.optim.AdamW, another optimizer, or lowprec before states recorded their format), "
                             f"so its layout cannot be checked; this optimizer keeps {record!r}")
        if found != record:
            raise ValueError(f"{where}: the saved state was written as {found!r}; this optimizer keeps {record!r} "
                             "(another optimizer class, v_mode, factor_second_moment, min_quant_size or fp32 state "
                             "settings?)")
        keys = set(saved) - {STATE_FORMAT_KEY}
        if keys != set(slots):
            missing, extra = sorted(set(slots) - keys), sorted(map(str, keys - set(slots)))
            raise ValueError(f"{where}: the saved state's keys differ from this optimizer's (missing {missing}, "
                             f"unexpected {extra}); expected " + ", ".join(f"{k}: {s.describe()}" for k, s in slots.items()))
        for key, slot in slots.items():
            bad = slot.mismatch(saved[key])
            if bad is not None:
                raise ValueError(f"{where}: state {key!r} must be {slot.describe()}; found {bad}")
        step = float(saved["step"])
        if not (math.isfinite(step) and step >= 0 and step == int(step)):
            raise ValueError(f"{where}: state 'step' must hold a non-negative whole number; found {step}")
        return slots

    # ------------------------------------------------------------------------------------------
    # Accounting
    # ------------------------------------------------------------------------------------------

    def state_nbytes(self, include_maps: bool = True) -> int:
        """True storage of the optimizer states in bytes (codes, scales, fp32 states, step
        counters, and the two maps once)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        if include_maps:
            total += self.M_FORMAT.map_nbytes() + self.V_FORMAT.map_nbytes()
        return total

    @property
    def skipped_steps(self) -> int:
        """Param-group steps skipped for non-finite gradients, over all groups."""
        return sum(int(g.get("skipped_steps", 0)) for g in self.param_groups)


class AdamW4bit(QuantizedAdamW):
    """AdamW with 4-bit states (Li, Chen, Zhu 2023): m in the signed dynamic-exponent map, v in
    the linear map without zero, both in blocks of 128 (``v_mode="block"``, the default), or v
    rank-1 normalised as in the paper (``v_mode="rank1"``).

    Block or rank-1, measured on the demo Llama (``benchmarks/train_optim.py``, 300 x 16, lr 5e-4,
    AdamW's best; final validation loss, seeds 0 / 1 / 2): block 1.8053 / 1.8274 / 1.8303, rank-1
    1.7996 / 1.8244 / 1.8017, torch AdamW 1.8038 / 1.8126 / 1.8260. Rank-1 is lower in all three
    pairs (by 0.3%, 0.2%, 1.6%), and both are within 1% of AdamW on average (+0.4% block, -0.3%
    rank-1). Block stays the default: rank-1 needs the whole new v before any code is written, so
    its step is two passes (CPU: 23.9 ms on a 4096x4096 parameter against block's 9.9 and torch
    fused's 8.2) and it has no Triton kernel, where block is one fused pass on both devices.

    With ``factor_second_moment=True`` 2-D+ tensors keep an Adafactor-factored float32 v instead."""

    M_FORMAT = M_DE4_B128
    V_FORMAT = V_LINEAR4_B128


class AdamW8bit(QuantizedAdamW):
    """AdamW with 8-bit states (bitsandbytes' dynamic maps, signed for m and unsigned for v,
    blocks of 256)."""

    M_FORMAT = M_DE8_B256
    V_FORMAT = V_DE8U_B256


class AdamWFp8(QuantizedAdamW):
    """AdamW with FP8 states: m in E4M3, v in E5M2 (E4M3 flushes small v to zero: design.md),
    each block of 256 scaled by its absmax."""

    M_FORMAT = M_E4M3_B256
    V_FORMAT = V_E5M2_B256
