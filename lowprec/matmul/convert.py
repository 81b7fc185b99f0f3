"""``apply_casts``: give every eligible linear layer the GEMM backend a recipe's ``[cast]`` asks for.

Called by :func:`lowprec.convert` after unit scaling. A module that already exposes a ``gemm``
attribute (lowprec's unit-scaled linears) gets the backend set; a plain ``nn.Linear`` is
swapped for :class:`LowPrecisionLinear` sharing its parameters.

``cast.keep_high_precision`` lists what stays in high precision: module kinds
(:data:`HIGH_PRECISION_KINDS`: ``"lm_head"`` is the model's output embedding; embeddings and
norms are never cast, since only linear layers are, so ``"embedding"`` and ``"norm"`` are
accepted for the record) and fnmatch patterns of qualified module names, which keep every
linear layer at or inside a matching module. An entry that is neither a kind nor a pattern
matching some module of the model is a typo (``"embeddings"``), and an error: ignoring it
would silently cast what the user meant to keep.

FP8 (``cast.format = "fp8"``): each eligible layer gets its own :class:`Fp8Gemm` (scaling state
per layer). Layers whose dimensions are not multiples of 16 stay in high precision and are
listed in the report; a model with no eligible layer at all raises, since a silent no-op would
let the user believe they train in FP8. With ``cast.smooth_swiglu`` every SwiGLU MLP's
``down_proj`` GEMM applies Smooth-SwiGLU.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

from lowprec.errors import RecipeError
from lowprec.matmul.fp8_gemm import FP8_DIM_MULTIPLE, Fp8Gemm, fp8_eligible
from lowprec.matmul.gemm import CastGemm
from lowprec.matmul.linear import LowPrecisionLinear
from lowprec.matmul.scaling import ScalingConfig


def make_gemm(recipe, module_name: str, module: nn.Module) -> nn.Module:
    """The GEMM backend for one layer under ``recipe.cast``."""
    fmt = recipe.cast.format
    if fmt in ("fp16", "bf16"):
        return CastGemm(fmt)
    if fmt == "fp8":
        c = recipe.cast
        return Fp8Gemm(ScalingConfig.from_cast(c), backend=c.gemm, debug=c.debug, name=module_name)
    raise NotImplementedError(f"cast format {fmt!r} is not implemented yet")


def _is_lm_head(model: nn.Module, module: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get is not None and get() is module
    except Exception:
        return False


def _set_child(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weight_shape(module: nn.Module) -> tuple[int, int] | None:
    w = getattr(module, "weight", None)
    return tuple(w.shape) if w is not None and w.dim() == 2 else None


HIGH_PRECISION_KINDS = ("embedding", "lm_head", "norm")


def keep_entries_problem(model: nn.Module, entries: Iterable[str]) -> str | None:
    """What is wrong with ``cast.keep_high_precision`` for ``model``: the entries that are neither
    one of :data:`HIGH_PRECISION_KINDS` nor an fnmatch pattern matching a qualified module name
    of the model, and the valid kinds; None when every entry is valid. Checks only."""
    names = [n for n, _ in model.named_modules() if n]
    bad = [e for e in entries if e not in HIGH_PRECISION_KINDS and not any(fnmatchcase(n, e) for n in names)]
    if not bad:
        return None
    return (f"{', '.join(map(repr, bad))} is neither a module kind nor a pattern matching a module of "
            f"{type(model).__name__}; valid kinds: {', '.join(HIGH_PRECISION_KINDS)}")


def kept_by_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches ``name`` or one of its parent modules' names, or None."""
    parts = name.split(".")
    scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return next((p for p in patterns if any(fnmatchcase(s, p) for s in scopes)), None)


def _keep(report, name: str, why: str) -> None:
    """Record that ``name`` stays in high precision: appended to what an earlier step made of it
    (a unit-scaled linear), else listed as left alone."""
    done = report.converted.get(name)
    if done is None:
        report.skip(name, why)
    elif why not in done:
        report.add(name, f"{done}; {why}")


def _high_precision_reason(model: nn.Module, name: str, module: nn.Module, keep: tuple[str, ...]) -> str | None:
    """Why ``cast.keep_high_precision`` keeps this linear layer in high precision, or None."""
    if "lm_head" in keep and _is_lm_head(model, module):
        return "LM head kept in high precision (cast.keep_high_precision)"
    pattern = kept_by_pattern(name, [e for e in keep if e not in HIGH_PRECISION_KINDS])
    if pattern is not None:
        return f"kept in high precision: matches cast.keep_high_precision pattern {pattern!r}"
    return None


def apply_casts(model: nn.Module, recipe, report) -> None:
    """Give each eligible linear layer of ``model`` the GEMM backend of ``recipe.cast``, in place,
    recording every decision in ``report`` (see the module docstring)."""
    keep = tuple(recipe.cast.keep_high_precision)
    problem = keep_entries_problem(model, keep)
    if problem is not None:
        raise RecipeError(f"recipe {recipe.name!r}: key 'cast.keep_high_precision': {problem}")
    fp8 = recipe.cast.format == "fp8"
    n_converted = 0
    for name, module in list(model.named_modules()):
        if not name:
            continue
        is_linear = isinstance(module, nn.Linear) or hasattr(module, "gemm")
        if not is_linear:
            continue
        if recipe.excluded(name):
            report.skip(name, "excluded by the recipe's [exclude] patterns")
            continue
        why = _high_precision_reason(model, name, module, keep)
        if why is not None:
            _keep(report, name, why)
            continue
        if fp8:
            shape = _weight_shape(module)
            if shape is None or not fp8_eligible(shape[1], shape[0]):
                dims = f"in_features={shape[1]}, out_features={shape[0]}" if shape else "no 2-D weight"
                report.skip(name, f"kept in high precision: FP8 GEMMs need dimensions that are multiples of "
                                  f"{FP8_DIM_MULTIPLE} ({dims})")
                continue
        gemm = make_gemm(recipe, name, module)
        n_converted += 1
        if hasattr(module, "gemm"):
            module.gemm = gemm
            report.add(name, f"{type(module).__name__} with {type(gemm).__name__}({recipe.cast.format})")
        else:
            _set_child(model, name, LowPrecisionLinear.from_linear(module, gemm))
            report.add(name, f"LowPrecisionLinear with {type(gemm).__name__}({recipe.cast.format})")
    if fp8 and n_converted == 0:
        why = "; ".join(f"{n}: {w}" for n, w in list(report.skipped.items())[:5]) or "the model has no linear layers"
        raise RecipeError(f"recipe {recipe.name!r} casts matmuls to FP8, but {type(model).__name__} has no linear "
                         f"layer eligible for FP8 ({why})")
    if fp8 and recipe.cast.smooth_swiglu:
        from lowprec.matmul.smooth_swiglu import enable_smooth_swiglu

        enable_smooth_swiglu(model, report)
