"""Smooth-SwiGLU (Fishman, Chmiel, Banner, Soudry, ICLR 2025).

``SwiGLU(x) = (x w1) * Swish(x w2)``, then ``w3`` (Hugging Face names: ``up_proj`` = w1,
``gate_proj`` = w2, ``down_proj`` = w3). Late in long runs weight decay aligns w1 and w2 on a few
channels; those channels turn quadratic in x and produce rare huge values in ``h`` that overflow
FP8 under delayed scaling. Smooth-SwiGLU multiplies ``h`` per channel by ``s`` before the FP8
cast and folds ``s^-1`` into ``w3`` before its cast, so the function is unchanged in exact
arithmetic: ``h w3^T = (h * s)(w3 / s)^T``.

In lowprec the smoothing lives inside ``down_proj``'s FP8 GEMM (:class:`Fp8Gemm` with
``smooth=True``), so it composes with whatever a unit-scaled MLP does around that GEMM. The
scales are powers of two (``s_c = 2**floor(log2(1/amax_c(h)))``), so ``h * s`` is exact.
This module holds the reference functions and the model walk that switches it on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.matmul.fp8_gemm import Fp8Gemm, smoothing_scales

SWIGLU_CHILDREN = ("gate_proj", "up_proj", "down_proj")  # contract 2


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The plain SwiGLU MLP: ``(silu(x w_gate^T) * (x w_up^T)) w_down^T``."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def smooth_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  power_of_two: bool = True) -> torch.Tensor:
    """Smooth-SwiGLU as a reference: ``Q(h * s) Q(w_down / s)^T`` with per-channel ``s``.

    ``quantize=None`` runs it in the input's precision (the function-preservation check);
    ``power_of_two=False`` uses ``s = 1/amax_c`` exactly (then ``h * s`` rounds once)."""
    h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    h2 = h.reshape(-1, h.shape[-1])
    if power_of_two:
        s = smoothing_scales(h2)
    else:
        a = h2.detach().abs().amax(dim=0)
        s = torch.where(a > 0, 1.0 / a, torch.ones_like(a))
    hs, wd = h * s, w_down / s
    if quantize is not None:
        hs, wd = quantize(hs), quantize(wd)
    return F.linear(hs, wd)


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A module with ``gate_proj``, ``up_proj`` and ``down_proj`` children (HF Llama/Qwen2/Mistral
    MLPs, lowprec's unit-scaled SwiGLU)."""
    return all(isinstance(getattr(module, c, None), nn.Module) for c in SWIGLU_CHILDREN)


def swiglu_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every SwiGLU MLP in ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_swiglu_mlp(m)]


def enable_smooth_swiglu(model: nn.Module, report=None, *, gemm_type: type = Fp8Gemm, kind: str = "FP8",
                         note_converted: bool = False) -> list[str]:
    """Turn Smooth-SwiGLU on in the ``gemm_type`` GEMM (FP8 by default; the block-scaled GEMM
    under MXFP8/NVFP4) of every SwiGLU MLP's ``down_proj``.

    Returns the qualified names of the ``down_proj`` modules changed. An MLP whose ``down_proj``
    has no such GEMM (excluded, or kept in high precision) is reported as skipped; with
    ``note_converted`` the note is also appended when an earlier step converted that layer."""
    done = []
    for name, mlp in swiglu_mlps(model):
        down_name = f"{name}.down_proj" if name else "down_proj"
        gemm = getattr(mlp.down_proj, "gemm", None)
        if not isinstance(gemm, gemm_type):
            note = f"Smooth-SwiGLU not applied: down_proj has no {kind} GEMM"
            if report is None:
                continue
            if down_name not in report.converted:
                why = report.skipped.get(down_name)
                report.skip(down_name, f"{why}; {note}" if why else note)
            elif note_converted and note not in report.converted[down_name]:
                report.add(down_name, f"{report.converted[down_name]}; {note}")
            continue
        gemm.smooth = True
        done.append(down_name)
        if report is not None:
            report.add(down_name, report.converted.get(down_name, f"{kind} down_proj") + " + Smooth-SwiGLU")
    return done
