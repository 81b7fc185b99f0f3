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

MXFP8 and NVFP4 (``cast.format = "mxfp8"`` / ``"nvfp4"``): each eligible layer gets its own
:class:`lowprec.matmul.block_scaled.BlockScaledGemm`, under the same dimension rule as FP8 (both
dimensions multiples of 16; MXFP8's 32-element blocks pad a remainder with zeros, see
:mod:`lowprec.matmul.block_scaled` for why). ``cast.smooth_swiglu`` works there too: the
smoothing is the same per-channel power-of-two scale inside ``down_proj``'s GEMM.

Layers kept in high precision (``cast.keep_high_precision``, ``cast.high_precision_plan``, or
dimensions the narrow GEMMs cannot take) run in the model's dtype, or with
``cast.high_precision_format = "bf16"`` through a :class:`CastGemm` in BF16, as NVIDIA keeps
its NVFP4 runs' high-precision layers in BF16.

``cast.high_precision_plan`` names a JSON file (relative to the recipe file) written by
``lowprec sensitivity --for-training FORMAT --high-precision-budget F``: the linears that sensitivity
chose to keep (:func:`load_high_precision_plan`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from torch import nn

from lowprec.errors import RecipeError
from lowprec.matmul.block_scaled import BLOCK_FORMATS, BlockScaledGemm, BlockScaling
from lowprec.matmul.fp8_gemm import FP8_DIM_MULTIPLE, Fp8Gemm, fp8_eligible
from lowprec.matmul.gemm import CastGemm
from lowprec.matmul.linear import LowPrecisionLinear
from lowprec.matmul.scaling import ScalingConfig
from lowprec.user_files import read_user_file

# Formats narrower than 16 bits: their GEMMs need the dimension rule, and a model where no layer
# gets one is an error (a silent no-op would let the user believe they train in that format).
NARROW_FORMATS = ("fp8", *BLOCK_FORMATS)
# The version of the plan file format `lowprec sensitivity --for-training` writes.
#: The plan file's format marker and version.
HIGH_PRECISION_PLAN_KEY = "lowprec_high_precision_plan"
HIGH_PRECISION_PLAN_VERSION = 1


def make_gemm(recipe, module_name: str, module: nn.Module) -> nn.Module:
    """The GEMM backend for one layer under ``recipe.cast``."""
    fmt = recipe.cast.format
    if fmt in ("fp16", "bf16"):
        return CastGemm(fmt)
    if fmt == "fp8":
        c = recipe.cast
        return Fp8Gemm(ScalingConfig.from_cast(c), backend=c.gemm, debug=c.debug, name=module_name)
    if fmt in BLOCK_FORMATS:
        c = recipe.cast
        return BlockScaledGemm(BlockScaling.from_cast(c), backend=c.gemm, debug=c.debug, name=module_name)
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


def read_high_precision_plan(path: str | Path) -> dict[str, Any]:
    """A high-precision plan file, checked: the one reader of the format (the training layer's
    ``cast.high_precision_plan`` and ``lowprec.sensitivity`` both use it).

    The file (written by ``lowprec sensitivity --for-training nvfp4 --high-precision-budget 0.1``) is
    ``{"lowprec_high_precision_plan": 1, "format": "nvfp4", "budget": 0.1, "keep": ["model.layers.3.mlp.down_proj",
    ...], ...}``; other keys are kept as they are. A file that is missing, not JSON, of another version, or
    whose ``keep`` is not a list of non-empty strings is a :class:`RecipeError` naming the file and
    the field. Whether each name is a linear layer of a model is checked by
    :func:`high_precision_plan_problem`."""
    shown = f"high-precision plan file {str(path)!r}"
    try:
        raw = read_user_file(path, "high-precision plan file", "a JSON file")
    except (OSError, ValueError) as e:
        raise RecipeError(f"{e} (key 'cast.high_precision_plan')") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{shown} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{shown} is not a high-precision plan: it must be a JSON object with "
                          f"{HIGH_PRECISION_PLAN_KEY!r} and 'keep'; got {type(data).__name__}")
    version = data.get(HIGH_PRECISION_PLAN_KEY)
    if version != HIGH_PRECISION_PLAN_VERSION or isinstance(version, bool):
        what = "has no" if HIGH_PRECISION_PLAN_KEY not in data else f"has {version!r} as"
        raise RecipeError(f"{shown} is not a high-precision plan: it {what} field {HIGH_PRECISION_PLAN_KEY!r}; this "
                          f"lowprec reads version {HIGH_PRECISION_PLAN_VERSION} (a plan written by `lowprec sensitivity "
                          f"--for-training`; a bit plan for QAT is plan.json)")
    keep = data.get("keep")
    if not isinstance(keep, list) or not all(isinstance(n, str) and n for n in keep):
        raise RecipeError(f"{shown}: field 'keep' must be a list of qualified linear-layer names (non-empty strings); "
                          f"got {json.dumps(keep)[:120] if 'keep' in data else 'nothing'}")
    fmt = data.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise RecipeError(f"{shown}: field 'format' must be a string (the training format it was chosen for); got {fmt!r}")
    return data


def load_high_precision_plan(path: str | Path) -> tuple[str, ...]:
    """The qualified names of the linear layers a high-precision plan keeps (:func:`read_high_precision_plan`)."""
    return tuple(dict.fromkeys(read_high_precision_plan(path)["keep"]))


def high_precision_plan_path(recipe) -> Path | None:
    """The recipe's ``cast.high_precision_plan`` as a path (relative to the recipe file, like
    ``qat.plan``), or None when it is empty."""
    plan = recipe.cast.high_precision_plan
    if not plan:
        return None
    base = Path(recipe.source).parent if recipe.source else Path.cwd()
    return base / plan


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or hasattr(module, "gemm")


def high_precision_plan_problem(model: nn.Module, names: Iterable[str]) -> str | None:
    """The plan's names that are not linear layers of ``model`` (with an example of one that is), or None."""
    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules or not _is_linear(modules[n])]
    if not bad:
        return None
    example = next((n for n, m in modules.items() if n and _is_linear(m)), None)
    return (f"{', '.join(map(repr, bad[:5]))}{' ...' if len(bad) > 5 else ''} "
            f"{'is not a linear layer' if len(bad) == 1 else 'are not linear layers'} of {type(model).__name__}"
            + (f" (names are qualified module names such as {example!r})" if example else ""))


def resolve_high_precision_plan(model: nn.Module, recipe) -> tuple[tuple[str, ...], str]:
    """``(names kept, how the report names the plan)`` for ``recipe``'s ``cast.high_precision_plan``,
    checked against ``model`` (every name a linear layer of it); ``((), "")`` without a plan.
    Raises :class:`RecipeError` before anything is changed."""
    path = high_precision_plan_path(recipe)
    if path is None:
        return (), ""
    names = load_high_precision_plan(path)
    problem = high_precision_plan_problem(model, names)
    if problem is not None:
        raise RecipeError(f"high-precision plan file {str(path)!r} (key 'cast.high_precision_plan'): field 'keep': {problem}")
    return names, str(recipe.cast.high_precision_plan)


def _high_precision_gemm(recipe) -> nn.Module | None:
    """The GEMM a layer kept in high precision runs: None (the model's dtype) or BF16."""
    return CastGemm("bf16") if recipe.cast.high_precision_format == "bf16" else None


def _keep_layer(model: nn.Module, name: str, module: nn.Module, why: str, recipe, report) -> None:
    """Keep one linear in high precision: as it is, or with a BF16 GEMM (cast.high_precision_format)."""
    gemm = _high_precision_gemm(recipe)
    if gemm is None:
        _keep(report, name, why)
        return
    if hasattr(module, "gemm"):
        module.gemm = gemm
        kind = type(module).__name__
    else:
        _set_child(model, name, LowPrecisionLinear.from_linear(module, gemm))
        kind = "LowPrecisionLinear"
    report.add(name, f"{kind} with CastGemm(bf16): {why} (BF16: cast.high_precision_format)")


def apply_casts(model: nn.Module, recipe, report) -> None:
    """Give each eligible linear layer of ``model`` the GEMM backend of ``recipe.cast``, in place,
    recording every decision in ``report`` (see the module docstring). Everything that can be
    wrong (``keep_high_precision`` entries, the high-precision plan) is checked before any module
    changes."""
    keep = tuple(recipe.cast.keep_high_precision)
    problem = keep_entries_problem(model, keep)
    if problem is not None:
        raise RecipeError(f"recipe {recipe.name!r}: key 'cast.keep_high_precision': {problem}")
    plan_names, plan_file = resolve_high_precision_plan(model, recipe)
    plan_set = set(plan_names)
    fmt = recipe.cast.format
    narrow = fmt in NARROW_FORMATS
    n_converted = 0
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if not _is_linear(module):
            continue
        if recipe.excluded(name):
            report.skip(name, "excluded by the recipe's [exclude] patterns")
            continue
        why = _high_precision_reason(model, name, module, keep)
        if why is None and name in plan_set:
            why = f"kept in high precision: high_precision_plan {plan_file}"
        if why is None and narrow:
            shape = _weight_shape(module)
            if shape is None or not fp8_eligible(shape[1], shape[0]):
                dims = f"in_features={shape[1]}, out_features={shape[0]}" if shape else "no 2-D weight"
                label = "FP8" if fmt == "fp8" else fmt.upper()
                why = (f"kept in high precision: {label} GEMMs need dimensions that are multiples of "
                       f"{FP8_DIM_MULTIPLE} ({dims})")
        if why is not None:
            _keep_layer(model, name, module, why, recipe, report)
            continue
        gemm = make_gemm(recipe, name, module)
        n_converted += 1
        if hasattr(module, "gemm"):
            module.gemm = gemm
            report.add(name, f"{type(module).__name__} with {type(gemm).__name__}({fmt})")
        else:
            _set_child(model, name, LowPrecisionLinear.from_linear(module, gemm))
            report.add(name, f"LowPrecisionLinear with {type(gemm).__name__}({fmt})")
    if narrow and n_converted == 0:
        why = "; ".join(f"{n}: {w}" for n, w in list(report.skipped.items())[:5]) or "the model has no linear layers"
        label = "FP8" if fmt == "fp8" else fmt.upper()
        raise RecipeError(f"recipe {recipe.name!r} casts matmuls to {label}, but {type(model).__name__} has no linear "
                         f"layer eligible for {label} ({why})")
    if recipe.cast.smooth_swiglu and fmt == "fp8":
        from lowprec.matmul.smooth_swiglu import enable_smooth_swiglu

        enable_smooth_swiglu(model, report)
    elif recipe.cast.smooth_swiglu and fmt in BLOCK_FORMATS:
        from lowprec.matmul.smooth_swiglu import enable_smooth_swiglu

        enable_smooth_swiglu(model, report, gemm_type=BlockScaledGemm, kind="block-scaled", note_converted=True)
