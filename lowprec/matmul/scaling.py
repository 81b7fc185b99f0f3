"""FP8 scaling strategies as data, and the pure functions that turn an amax into a scale.

Convention (TransformerEngine's, as in :mod:`lowprec.formats`): ``q = cast(x * scale)`` and
``x ~= q / scale``, with ``scale = FP8_MAX / max(amax, AMAX_FLOOR) / 2**margin``.

Strategies (``ScalingConfig.kind``):

* ``current``: per tensor, from this call's amax (torchao "tensorwise", TE "current scaling").
* ``delayed``: per tensor, from the max (or most recent) amax of the last ``history_len`` calls;
  the scale used now was computed before this call's amax was seen (TE "delayed scaling").
* ``rowwise``: one scale per row of each GEMM operand, along the GEMM's reduction dimension.
* ``blockwise``: 1 x 128 blocks for activations and gradients, 128 x 128 tiles for weights,
  power-of-two scales (DeepSeek-V3's recipe).
* ``none``: scale 1, a naive cast (shown beside the others to show why scaling is needed).

A per-tensor scale never becomes zero, inf or NaN: when the amax is zero or not finite the
previous scale is kept and the event is counted (:func:`next_scale`). Per-row and per-block
scales have no previous value; a non-finite group falls back to scale 1 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowprec.formats import AMAX_FLOOR, FloatFormat, get_format

KINDS = ("current", "delayed", "rowwise", "blockwise", "none")
REDUCTIONS = ("max", "most_recent")
# DeepSeek-V3 (2024), section 3.3: 1 x 128 tiles for activations and gradients, 128 x 128 for weights.
BLOCK_ACT = 128
BLOCK_WEIGHT = 128
# TransformerEngine's DelayedScaling default amax_history_len.
DEFAULT_HISTORY_LEN = 1024


@dataclass(frozen=True)
class ScalingConfig:
    """How the operands of one FP8 GEMM are scaled (built from a recipe's ``[cast]``)."""

    kind: str = "current"
    forward: str = "e4m3"  # format of X and W
    backward: str = "e5m2"  # format of dY
    history_len: int = DEFAULT_HISTORY_LEN
    amax_reduction: str = "max"
    margin: int = 0
    block_act: int = BLOCK_ACT
    block_weight: int = BLOCK_WEIGHT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FP8 scaling kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.amax_reduction not in REDUCTIONS:
            raise ValueError(f"amax_reduction must be one of {', '.join(REDUCTIONS)}; got {self.amax_reduction!r}")
        for what in ("forward", "backward"):
            f = get_format(getattr(self, what))
            if not isinstance(f, FloatFormat) or f.bits != 8:
                raise ValueError(f"cast.{what} must be an FP8 format (e4m3, e5m2); got {getattr(self, what)!r}")
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1; got {self.history_len}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0; got {self.margin}")

    @property
    def fwd_format(self) -> FloatFormat:
        return get_format(self.forward)  # type: ignore[return-value]

    @property
    def bwd_format(self) -> FloatFormat:
        return get_format(self.backward)  # type: ignore[return-value]

    @property
    def per_tensor(self) -> bool:
        return self.kind in ("current", "delayed", "none")

    @classmethod
    def from_cast(cls, cast) -> ScalingConfig:
        """From a :class:`lowprec.recipes.CastConfig`."""
        return cls(kind=cast.scaling, forward=cast.forward, backward=cast.backward, history_len=cast.history_len,
                   amax_reduction=cast.amax_reduction, margin=cast.margin)


# ----------------------------------------------------------------------------------------------
# Pure scale arithmetic
# ----------------------------------------------------------------------------------------------


def raw_scale(amax: torch.Tensor, fp8_max: float | torch.Tensor, margin: int = 0) -> torch.Tensor:
    """``fp8_max / max(amax, 1e-12) / 2**margin`` in float32 (no validity checks)."""
    return fp8_max / amax.float().clamp_min(AMAX_FLOOR) * (2.0 ** -margin)


def floor_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal float32 scales down to a power of two by clearing the mantissa bits
    (exact, unlike ``exp2(floor(log2(s)))``)."""
    bits = scale.float().contiguous().view(torch.int32) & 0x7F800000
    return bits.view(torch.float32)


def next_scale(amax: torch.Tensor, prev_scale: torch.Tensor, fp8_max: float | torch.Tensor, margin: int = 0,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale for ``amax``, keeping ``prev_scale`` where amax is zero, inf or NaN.

    Returns ``(scale, kept)`` where ``kept`` is a bool tensor marking the kept entries. No host
    synchronisation: usable inside a GEMM without stalling the device.
    """
    a = amax.float()
    s = raw_scale(a, fp8_max, margin)
    ok = torch.isfinite(a) & (a > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, prev_scale.float()), ~ok


def group_scale(amax: torch.Tensor, fp8_max: float, power_of_two: bool = False) -> torch.Tensor:
    """Per-row / per-block scales: a non-finite amax group falls back to scale 1 (no previous value
    exists for a group); a zero group gets the floor's (finite) scale."""
    a = amax.float()
    s = raw_scale(a, fp8_max)
    if power_of_two:
        s = floor_pow2(s)
    return torch.where(torch.isfinite(a) & torch.isfinite(s), s, torch.ones_like(s))


def reduce_history(history: torch.Tensor, latest: torch.Tensor, reduction: str) -> torch.Tensor:
    """The amax a delayed scale is computed from: the max over the window, or the latest entry."""
    if reduction == "max":
        return history.amax(dim=-1)
    if reduction == "most_recent":
        return latest
    raise ValueError(f"amax_reduction must be 'max' or 'most_recent'; got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# Casts
# ----------------------------------------------------------------------------------------------


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``cast(x * scale)`` to ``fmt``, saturating at +-max (NaN stays NaN). Round to nearest even."""
    return (x.float() * scale).clamp_(-fmt.max, fmt.max).to(fmt.dtype)


def fake_cast(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``cast(x * scale) / scale`` in float32: what the FP8 GEMM sees of ``x``."""
    return cast_to_fp8(x, scale, fmt).float() / scale


def all_reduce_amax(amax: torch.Tensor, group=None) -> torch.Tensor:
    """Contract 7: under torch.distributed with world size > 1, every rank gets the MAX amax over
    ``group`` (default: the default group), so all ranks use the scale one process would."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return amax
    if torch.distributed.get_world_size(group) <= 1:
        return amax
    amax = amax.float().clone()
    torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    n = x.shape[dim]
    pad = (-n) % multiple
    if pad == 0:
        return x
    widths = [0, 0] * x.dim()
    widths[2 * (x.dim() - 1 - dim) + 1] = pad
    return F.pad(x, widths)


def rowwise_fake_cast(x: torch.Tensor, fmt: FloatFormat, dim: int = -1,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor with one scale per slice along ``dim`` (the GEMM's reduction dim).

    Returns ``(q, scale, amax)``: FP8 data, float32 scales shaped to broadcast against ``x``.
    Per-row scales are local to each row (a token's row lives on one rank), so nothing is
    all-reduced here.
    """
    amax = x.detach().abs().float().amax(dim=dim, keepdim=True)
    s = group_scale(amax, fmt.max)
    return cast_to_fp8(x, s, fmt), s, amax


def blockwise_fake_cast(x: torch.Tensor, fmt: FloatFormat, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize a 2-D tensor in tiles of ``block`` (rows, cols) with power-of-two scales.

    Ragged edges are padded with zeros for the amax only. Returns ``(x_dequantized_fp32, amax
    per tile)``.
    """
    if x.dim() != 2:
        raise ValueError(f"block-wise casts take 2-D tensors; got shape {tuple(x.shape)}")
    br, bc = block
    m, n = x.shape
    xp = _pad_to(_pad_to(x.float(), 0, br), 1, bc)
    mp, np_ = xp.shape
    tiles = xp.reshape(mp // br, br, np_ // bc, bc)
    amax = tiles.detach().abs().amax(dim=(1, 3), keepdim=True)
    s = group_scale(amax, fmt.max, power_of_two=True)
    deq = ((tiles * s).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() / s).reshape(mp, np_)
    return deq[:m, :n], amax.reshape(mp // br, np_ // bc)
