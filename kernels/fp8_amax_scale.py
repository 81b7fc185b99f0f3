"""Delayed-scaling update in one pass: record each tensor's amax in its history window and
compute the next scale from the window, keeping the previous scale on a bad amax.

For ``n`` tensors (rows) with ``history`` of shape ``(n, H)`` used as a ring buffer:

* a finite amax is written at column ``pos``; a non-finite one writes 0 there (the oldest entry
  leaves the window, nothing new enters) and is counted;
* the window's amax is ``max`` over the row, or the amax just recorded (``most_recent``);
* ``scale = fp8_max / max(window_amax, 1e-12) * 2**-margin``; where that window amax is zero or
  the amax was not finite, the previous scale is kept (a scale never becomes 0, inf or NaN).

TransformerEngine rolls its history; a ring buffer with a position gives the same window
without moving H values per step.
"""

from __future__ import annotations

import torch

from lowprec.formats import AMAX_FLOOR
from lowprec.kernels.dispatch import choose_backend

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def _check(history: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor, pos: int,
           reduction: str) -> None:
    if history.dim() != 2 or history.dtype != torch.float32 or not history.is_contiguous():
        raise ValueError(f"amax history must be a contiguous float32 (n, H) tensor; got {history.dtype} "
                         f"{tuple(history.shape)}")
    n, h = history.shape
    for name, t in (("amax", amax), ("scale", scale), ("fp8_max", fp8_max)):
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape ({n},) to match the history; got {t.dtype} {tuple(t.shape)}")
    if not 0 <= pos < h:
        raise ValueError(f"history position {pos} is outside the window of length {h}")
    if reduction not in ("max", "most_recent"):
        raise ValueError(f"reduction must be 'max' or 'most_recent'; got {reduction!r}")


def amax_scale_update_reference(history: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor,
                                pos: int, margin: int = 0, reduction: str = "max",
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. Updates ``history`` and ``scale`` in place; returns ``(scale, kept)``
    where ``kept`` (bool, (n,)) marks rows whose previous scale was kept."""
    _check(history, amax, scale, fp8_max, pos, reduction)
    finite = torch.isfinite(amax)
    recorded = torch.where(finite, amax, torch.zeros_like(amax))
    history[:, pos] = recorded
    window = history.amax(dim=1) if reduction == "max" else recorded
    new = fp8_max / window.clamp_min(AMAX_FLOOR) * (2.0 ** -margin)
    ok = finite & (window > 0) & torch.isfinite(new)
    scale.copy_(torch.where(ok, new, scale))
    return scale, ~ok


if triton is not None:

    @triton.jit
    def _amax_scale_kernel(hist_ptr, amax_ptr, scale_ptr, max_ptr, kept_ptr, H, pos, MARGIN_MULT: tl.constexpr,
                           MOST_RECENT: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        a = tl.load(amax_ptr + row)
        finite = (a == a) & (tl.abs(a) < float("inf"))
        rec = tl.where(finite, a, 0.0)
        tl.store(hist_ptr + row * H + pos, rec)
        if MOST_RECENT:
            window = rec
        else:
            window = rec
            for start in range(0, H, BLOCK_H):
                offs = start + tl.arange(0, BLOCK_H)
                h = tl.load(hist_ptr + row * H + offs, mask=offs < H, other=0.0)
                h = tl.where(offs == pos, rec, h)  # the value just stored, whatever the memory order
                window = tl.maximum(window, tl.max(h, axis=0))
        fmax = tl.load(max_ptr + row)
        new = tl.div_rn(fmax, tl.maximum(window, 1e-12)) * MARGIN_MULT
        ok = finite & (window > 0) & (new < float("inf"))
        prev = tl.load(scale_ptr + row)
        tl.store(scale_ptr + row, tl.where(ok, new, prev))
        tl.store(kept_ptr + row, tl.where(ok, 0, 1).to(tl.int8))


def amax_scale_update_triton(history: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor,
                             pos: int, margin: int = 0, reduction: str = "max", block_h: int = 256,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel; same contract and results as :func:`amax_scale_update_reference`."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not importable")
    _check(history, amax, scale, fp8_max, pos, reduction)
    n, h = history.shape
    kept = torch.zeros(n, dtype=torch.int8, device=history.device)
    if n:
        _amax_scale_kernel[(n,)](history, amax.contiguous(), scale, fp8_max.contiguous(), kept, h, pos,
                                 MARGIN_MULT=2.0 ** -margin, MOST_RECENT=reduction == "most_recent",
                                 BLOCK_H=block_h)
    return scale, kept.bool()


def amax_scale_update(history: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor,
                      pos: int, margin: int = 0, reduction: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Record ``amax`` at ``history[:, pos]`` and update ``scale`` in place (see module docstring).
    Returns ``(scale, kept)``. Triton on CUDA (or under the interpreter), PyTorch elsewhere."""
    if choose_backend(history, kernel="fp8_amax_scale") == "triton":
        return amax_scale_update_triton(history, amax, scale, fp8_max, pos, margin, reduction)
    return amax_scale_update_reference(history, amax, scale, fp8_max, pos, margin, reduction)
