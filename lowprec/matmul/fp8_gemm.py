"""``Fp8Gemm``: the FP8 GEMM backend (contract 1), with its scaling state as buffers, and the FP8
linear autograd Function that runs the three GEMMs.

Forward ``Y = X.W^T`` (E4M3 x E4M3), grad-input ``dX = dY.W`` (E5M2 x E4M3), grad-weight
``dW = dY^T.X`` (E5M2 x E4M3) with the formats of the recipe's ``cast.forward`` /
``cast.backward`` (HYBRID by default). The weight, its gradient and the optimizer stay in the
high-precision dtype; only the GEMM operands are cast, and the forward's FP8 ``X`` and ``W``
(tensor-wise scaling) are saved and reused in the backward (the emulated backend keeps them
widened to float32, exact, so no operand is converted twice).

State (all persistent buffers, so a checkpoint carries it and loads with
``torch.load(weights_only=True)``), one row per operand role (input, weight, grad_output):
``scale``, ``amax_history`` (delayed scaling's window; length 1 otherwise), ``history_pos``,
``initialized``, ``last_amax``, ``kept_scale_events`` (a zero/non-finite amax kept the previous
scale) and ``nonfinite_inputs`` (operands that held NaN or Inf; with ``debug=True`` they raise).
Every buffer is state, and only state is a buffer: the formats' largest values (``fp8_max``) are
derived from ``scaling`` when used, never stored, so a model converted on the meta device and
materialised with ``to_empty()`` + ``load_state_dict`` has nothing left uninitialised. Without a
checkpoint, :meth:`Fp8Gemm.reset_parameters` restores the initial state.

Smooth-SwiGLU (``smooth=True``, set on a SwiGLU MLP's ``down_proj``): the input ``h`` is
multiplied per input channel by a power of two ``s`` (``s_c ~ 1 / amax_c(h)``) before its cast
and ``s^-1`` is folded into ``W`` before the weight's cast, so the product is unchanged in exact
arithmetic while one huge channel no longer sets the whole tensor's scale (Fishman et al. 2025).
``W / s`` changes every step, so the weight then always uses current scaling.
"""

from __future__ import annotations

import torch
from torch import nn

from lowprec.formats import AMAX_FLOOR, FloatFormat
from lowprec.kernels.fp8_amax_scale import amax_scale_update
from lowprec.kernels.fp8_cast_transpose import cast_transpose
from lowprec.matmul.functional import (
    GEMM_BACKENDS,
    cast_widened,
    finish_linear_grads,
    forward_gemm,
    fp8_mm,
    grad_input_gemm,
    grad_weight_gemm,
    resolve_backend,
)
from lowprec.matmul.scaling import (
    ScalingConfig,
    all_reduce_amax,
    blockwise_fake_cast,
    floor_pow2,
    next_scale,
    rowwise_fake_cast,
)

X, W, DY = 0, 1, 2
ROLE_NAMES = ("input X", "weight W", "output gradient dY")
# FP8 GEMMs on the GPU need both dimensions of every operand to be multiples of 16.
FP8_DIM_MULTIPLE = 16
_SMOOTH_AMAX_CAP = 2.0**100  # keeps 1/amax a normal float32, so its power-of-two floor is > 0


def tensor_amax(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as float32 in one pass (NaN propagates, an empty tensor gives 0)."""
    if t.numel() == 0:
        return torch.zeros((), device=t.device)
    lo, hi = torch.aminmax(t.detach())  # one vectorised pass; faster than abs().amax() or an inf-norm
    return torch.maximum(hi.float(), -lo.float()).abs()


def fp8_eligible(in_features: int, out_features: int) -> bool:
    """Whether a linear layer's dimensions allow FP8 GEMMs (both multiples of 16)."""
    return in_features % FP8_DIM_MULTIPLE == 0 and out_features % FP8_DIM_MULTIPLE == 0


def smoothing_scales(h: torch.Tensor, group=None) -> torch.Tensor:
    """Per-input-channel power-of-two scales ``s_c = 2**floor(log2(1 / amax_c))`` for a 2-D ``h``
    (tokens x channels): every smoothed channel's amax lands in (0.5, 1]. A zero or non-finite
    channel gets 1. Under torch.distributed the channel amax is all-reduced (MAX), so ranks agree."""
    amax = all_reduce_amax(h.detach().abs().float().amax(dim=0), group)
    ok = torch.isfinite(amax) & (amax > 0)
    s = floor_pow2(1.0 / amax.clamp(min=1e-30, max=_SMOOTH_AMAX_CAP))
    return torch.where(ok, s, torch.ones_like(s))


class _Fp8LinearFn(torch.autograd.Function):
    """``y = x @ w.T + b`` with the three GEMMs in FP8; ``mod`` is the :class:`Fp8Gemm` holding
    the scaling state (updated in place, outside autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod):  # type: ignore[override]
        n_out, k = weight.shape
        x2 = x.reshape(-1, k)
        sc = mod.scaling
        fwd = sc.fwd_format
        smooth = smoothing_scales(x2, mod.group) if mod.smooth else None
        w_eff = weight
        if smooth is not None:
            x2 = x2 * smooth.to(x2.dtype)
            w_eff = weight / smooth.to(weight.dtype)
        backend = resolve_backend(mod.backend, x.device)
        ctx.mod, ctx.kind, ctx.has_bias, ctx.backend = mod, sc.kind, bias is not None, backend
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        if sc.kind == "blockwise":
            xd, _ = mod._blockwise(x2, X, fwd, (1, sc.block_act))
            wd, _ = mod._blockwise(w_eff, W, fwd, (sc.block_weight, sc.block_weight))
            y = xd @ wd.t()
            ctx.save_for_backward(x2, wd, smooth)
        elif sc.kind == "rowwise":
            xq, sx = mod._rowwise(x2, X, fwd, dim=1)
            wq, sw = mod._rowwise(w_eff, W, fwd, dim=1)
            y = forward_gemm(xq, wq, 1.0 / sx, 1.0 / sw, torch.float32, backend)
            ctx.save_for_backward(x2, w_eff, smooth)
        else:
            need_t = x.is_cuda  # the GPU GEMM wants its second operand column-major
            # The emulated GEMMs take the FP8 values widened to float32 (exactly), made once and
            # kept for the backward, so no operand is converted twice.
            wide = backend == "emulated"
            xq, xqt, sx = mod._tensorwise(x2, X, fwd, need_t, widened=wide)
            wq, wqt, sw = mod._tensorwise(w_eff, W, fwd, need_t, force_current=mod.smooth, widened=wide)
            y = forward_gemm(xq, wq, 1.0 / sx, 1.0 / sw, torch.float32, backend)
            ctx.save_for_backward(xq, xqt, wq, wqt, sx, sw, smooth)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], n_out).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        mod = ctx.mod
        sc = mod.scaling
        fwd, bwd = sc.fwd_format, sc.bwd_format
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = None
        if ctx.kind == "blockwise":
            x2, wd, smooth = ctx.saved_tensors
            dyd, _ = mod._blockwise(dy2, DY, bwd, (1, sc.block_act))
            if need_x:
                gx = dyd @ wd
            if need_w:
                dyd_c, _ = mod._blockwise(dy2, DY, bwd, (sc.block_act, 1), count=False)
                xd_c, _ = mod._blockwise(x2, X, fwd, (sc.block_act, 1), count=False)
                gw = dyd_c.t() @ xd_c
        elif ctx.kind == "rowwise":
            x2, w_eff, smooth = ctx.saved_tensors
            if need_x:
                dyq, sdy = mod._rowwise(dy2, DY, bwd, dim=1)
                wq_c, sw_c = mod._rowwise(w_eff, W, fwd, dim=0, count=False)
                gx = grad_input_gemm(dyq, wq_c, 1.0 / sdy, 1.0 / sw_c, torch.float32, ctx.backend)
            if need_w:
                dyq_c, sdy_c = mod._rowwise(dy2, DY, bwd, dim=0, count=not need_x)
                xq_c, sx_c = mod._rowwise(x2, X, fwd, dim=0, count=False)
                gw = grad_weight_gemm(dyq_c.t(), xq_c, 1.0 / sdy_c.t(), 1.0 / sx_c, torch.float32, ctx.backend)
        else:
            xq, xqt, wq, wqt, sx, sw, smooth = ctx.saved_tensors
            need_t = dy2.is_cuda
            dyq, dyqt, sdy = mod._tensorwise(dy2, DY, bwd, need_t, widened=ctx.backend == "emulated")
            if need_x:
                w_nk = wqt.t() if wqt is not None else wq
                gx = grad_input_gemm(dyq, w_nk, 1.0 / sdy, 1.0 / sw, torch.float32, ctx.backend)
            if need_w:
                dy_t = dyqt if dyqt is not None else dyq.t()
                x_mk = xqt.t() if xqt is not None else xq
                gw = grad_weight_gemm(dy_t, x_mk, 1.0 / sdy, 1.0 / sx, torch.float32, ctx.backend)
        gx, gw, gb = finish_linear_grads(ctx, gx, gw, dy2, smooth, need_b)
        return gx, gw, gb, None


class Fp8Gemm(nn.Module):
    """FP8 GEMM backend for a linear-like module (``gemm(x, weight, bias)`` == ``F.linear`` up to
    FP8 rounding, with gradients). See the module docstring for the state it keeps."""

    def __init__(self, scaling: ScalingConfig | None = None, backend: str = "auto", smooth: bool = False,
                 debug: bool = False, name: str = "", group=None) -> None:
        super().__init__()
        self.scaling = scaling if scaling is not None else ScalingConfig()
        if backend not in GEMM_BACKENDS:
            raise ValueError(f"FP8 GEMM backend must be one of {', '.join(GEMM_BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.smooth = smooth
        self.debug = debug
        self.name = name
        self.group = group  # process group for the amax all-reduce (None: the default group)
        h = self.scaling.history_len if self.scaling.kind == "delayed" else 1
        self.register_buffer("scale", torch.empty(3))
        self.register_buffer("amax_history", torch.empty(3, h))
        self.register_buffer("history_pos", torch.empty(3, dtype=torch.int64))
        self.register_buffer("initialized", torch.empty(3, dtype=torch.bool))
        self.register_buffer("last_amax", torch.empty(3))
        self.register_buffer("kept_scale_events", torch.empty(3, dtype=torch.int64))
        self.register_buffer("nonfinite_inputs", torch.empty(3, dtype=torch.int64))
        self._fp8_max_cache: tuple[tuple, torch.Tensor] | None = None  # (device and maxima, tensor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Restore the initial scaling state in place: scales 1, empty amax history, no operand
        seen, counters 0. (The name is torch's convention: FSDP's default ``param_init_fn`` calls it
        on every module of a model materialised from the meta device without a checkpoint.)"""
        self.scale.fill_(1.0)
        self.amax_history.zero_()
        self.history_pos.zero_()
        self.initialized.fill_(False)
        self.last_amax.zero_()
        self.kept_scale_events.zero_()
        self.nonfinite_inputs.zero_()

    @property
    def fp8_max(self) -> torch.Tensor:
        """The largest finite value of each operand role's format (X, W: forward; dY: backward),
        float32 on the state's device: what the delayed-scaling update divides by the amax.

        A constant of ``scaling``, so not a buffer: a non-persistent buffer is neither saved nor
        loaded, and ``to_empty()`` after a meta-device conversion left it holding garbage (NaN
        losses from the second step under delayed scaling). Computed on first use per device."""
        key = (self.scale.device, self.scaling.fwd_format.max, self.scaling.bwd_format.max)
        if self._fp8_max_cache is None or self._fp8_max_cache[0] != key:
            _, fwd, bwd = key
            self._fp8_max_cache = (key, torch.tensor((fwd, fwd, bwd), dtype=torch.float32, device=key[0]))
        return self._fp8_max_cache[1]

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` must not turn the scaling state into bf16: scales and amax
        histories stay float32 (moving devices still moves them)."""
        super()._apply(fn, recurse)
        for name in ("scale", "amax_history", "last_amax"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.dim() != 2:
            raise ValueError(f"{self._who()}: weight must be 2-D (out_features, in_features); got {tuple(weight.shape)}")
        n_out, k = weight.shape
        if not fp8_eligible(k, n_out):
            raise ValueError(f"{self._who()}: FP8 GEMMs need in_features and out_features to be multiples of "
                             f"{FP8_DIM_MULTIPLE}; got in_features={k}, out_features={n_out} (keep this layer in "
                             f"high precision)")
        if x.shape[-1] != k:
            raise ValueError(f"{self._who()}: input's last dimension is {x.shape[-1]}, the weight expects {k}")
        return _Fp8LinearFn.apply(x, weight, bias, self)

    def extra_repr(self) -> str:
        s = self.scaling
        extra = f", history={s.history_len}, reduction={s.amax_reduction}" if s.kind == "delayed" else ""
        return (f"{s.forward}/{s.backward}, scaling={s.kind}{extra}, gemm={self.backend}"
                f"{', smooth_swiglu' if self.smooth else ''}{', debug' if self.debug else ''}")

    def _who(self) -> str:
        return f"Fp8Gemm {self.name!r}" if self.name else "Fp8Gemm"

    # -- NaN / Inf ------------------------------------------------------------------------------
    def _note_amax(self, amax: torch.Tensor, role: int, count: bool = True) -> None:
        """Record the operand's amax; count (or, in debug mode, raise on) NaN/Inf in it."""
        a = amax.detach().float().amax() if amax.numel() > 1 else amax.detach().float().reshape(())
        bad = ~torch.isfinite(a)
        if self.debug and bool(bad):
            raise FloatingPointError(
                f"{self._who()}: the {ROLE_NAMES[role]} (shape of the layer's {('input', 'weight', 'output grad')[role]}) "
                f"contains NaN or Inf (amax = {a.item()}); cast.debug is on, so lowprec stops here instead of "
                f"counting it in nonfinite_inputs")
        if count:
            with torch.no_grad():
                self.nonfinite_inputs[role] += bad.to(torch.int64)
                self.last_amax[role] = a

    # -- per-tensor (current, delayed, none) -----------------------------------------------------
    def _cast(self, t: torch.Tensor, s: torch.Tensor, fmt: FloatFormat, transpose: bool, widened: bool,
              need_amax: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(q, q^T or None, amax or None)``: the FP8 cast of ``t * s``; ``widened``: q as float32
        values (exact) for the emulated GEMM, in one fused pass where available, and no transpose
        (a float32 operand needs no column-major copy)."""
        if widened:
            return cast_widened(t, s, fmt), None, (tensor_amax(t) if need_amax else None)
        return cast_transpose(t, s, fmt, transpose)

    def _tensorwise(self, t: torch.Tensor, role: int, fmt: FloatFormat, transpose: bool, force_current: bool = False,
                    widened: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-tensor cast of operand ``role``: ``(q, q^T or None, scale)``; ``widened`` gives the
        FP8 values as float32 (what the emulated GEMM consumes)."""
        kind = "current" if force_current else self.scaling.kind
        if kind == "none":
            s = torch.ones((), device=t.device)
            q, qt, amax = self._cast(t, s, fmt, transpose, widened, need_amax=True)
            self._note_amax(amax, role)
            return q, qt, s
        delayed = kind == "delayed"
        update = self.training or not delayed
        if delayed and torch.compiler.is_compiling():
            return self._delayed_traced(t, role, fmt, transpose, widened, update)
        if not delayed or not bool(self.initialized[role]):
            amax = all_reduce_amax(tensor_amax(t), self.group)
            self._note_amax(amax, role)
            s, kept = next_scale(amax, self.scale[role], fmt.max, self.scaling.margin)
            q, qt, _ = self._cast(t, s, fmt, transpose, widened, need_amax=False)
            if update:
                with torch.no_grad():
                    self.kept_scale_events[role] += kept.to(torch.int64)
                    if not delayed:
                        self.scale[role] = s
                    else:
                        self._record(role, amax)
                        self.initialized[role] = True
            return q, qt, s
        s = self.scale[role].clone()  # the scale computed from earlier amaxes (used now)
        q, qt, amax = self._cast(t, s, fmt, transpose, widened, need_amax=True)
        amax = all_reduce_amax(amax, self.group)
        self._note_amax(amax, role)
        if update:
            self._record(role, amax)
        return q, qt, s

    def _delayed_traced(self, t: torch.Tensor, role: int, fmt: FloatFormat, transpose: bool, widened: bool,
                        update: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Delayed scaling as tensor operations only, for a compiled graph (the eager path reads
        ``initialized`` and ``history_pos`` back to the host, a graph break each): the first
        call of a role (``initialized`` false) uses the current amax's scale, later ones the
        stored scale; same results and state updates as the eager path."""
        amax = all_reduce_amax(tensor_amax(t), self.group)
        self._note_amax(amax, role)
        init = self.initialized[role]
        s_now, kept_now = next_scale(amax, self.scale[role], fmt.max, self.scaling.margin)
        s = torch.where(init, self.scale[role], s_now)
        q, qt, _ = self._cast(t, s, fmt, transpose, widened, need_amax=False)
        if update:
            with torch.no_grad():
                self.kept_scale_events[role] += (kept_now & ~init).to(torch.int64)
                self._record_traced(role, amax, fmt.max)
                self.initialized[role] = True
        return q, qt, s

    @torch.no_grad()
    def _record_traced(self, role: int, amax: torch.Tensor, fmt_max: float) -> None:
        """:meth:`_record` with the ring-buffer position kept a tensor (the reference update of
        :func:`lowprec.kernels.fp8_amax_scale.amax_scale_update`, traceable)."""
        pos = self.history_pos[role]
        hist = self.amax_history[role]
        a = amax.float().reshape(())
        finite = torch.isfinite(a)
        recorded = torch.where(finite, a, torch.zeros_like(a))
        onehot = torch.arange(hist.shape[0], device=hist.device) == pos
        hist.copy_(torch.where(onehot, recorded, hist))
        window = hist.amax() if self.scaling.amax_reduction == "max" else recorded
        new = fmt_max / window.clamp_min(AMAX_FLOOR) * (2.0 ** -self.scaling.margin)
        ok = finite & (window > 0) & torch.isfinite(new)
        self.scale[role] = torch.where(ok, new, self.scale[role])
        self.kept_scale_events[role] += (~ok).to(torch.int64)
        self.history_pos[role] = (pos + 1) % hist.shape[0]

    @torch.no_grad()
    def _record(self, role: int, amax: torch.Tensor) -> None:
        """Delayed scaling: push ``amax`` into the role's window and compute the next scale."""
        pos = int(self.history_pos[role])
        r = slice(role, role + 1)
        _, kept = amax_scale_update(self.amax_history[r], amax.float().reshape(1), self.scale[r], self.fp8_max[r],
                                    pos, self.scaling.margin, self.scaling.amax_reduction)
        self.kept_scale_events[role] += kept.to(torch.int64).sum()
        self.history_pos[role] = (pos + 1) % self.amax_history.shape[1]

    # -- per-row and per-block -------------------------------------------------------------------
    def _rowwise(self, t: torch.Tensor, role: int, fmt: FloatFormat, dim: int, count: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        q, s, amax = rowwise_fake_cast(t, fmt, dim=dim)
        self._note_amax(amax, role, count)
        return q, s

    def _blockwise(self, t: torch.Tensor, role: int, fmt: FloatFormat, block: tuple[int, int], count: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        deq, amax = blockwise_fake_cast(t, fmt, block)
        self._note_amax(amax, role, count)
        return deq, amax


__all__ = ["Fp8Gemm", "fp8_eligible", "smoothing_scales", "fp8_mm", "FP8_DIM_MULTIPLE"]
