"""``apply_casts``: give every eligible linear layer the GEMM backend a recipe's ``[cast]`` asks for.

Called by :func:`lowprec.convert` after unit scaling. A module that already exposes a ``gemm``
attribute (lowprec's unit-scaled linears) gets the backend set; a plain ``nn.Linear`` is
swapped for :class:`LowPrecisionLinear` sharing its parameters. Embeddings, the LM head and
norms stay in high precision unless ``cast.keep_high_precision`` says otherwise.
"""

from __future__ import annotations

from torch import nn

from lowprec.fp8.gemm import CastGemm
from lowprec.fp8.linear import LowPrecisionLinear


def make_gemm(recipe, module_name: str, module: nn.Module) -> nn.Module:
    """The GEMM backend for one layer under ``recipe.cast``."""
    fmt = recipe.cast.format
    if fmt in ("fp16", "bf16"):
        return CastGemm(fmt)
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


def apply_casts(model: nn.Module, recipe, report) -> None:
    keep = set(recipe.cast.keep_high_precision)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        is_linear = isinstance(module, nn.Linear) or hasattr(module, "gemm")
        if not is_linear:
            continue
        if recipe.excluded(name):
            report.skip(name, "excluded by the recipe's [exclude] patterns")
            continue
        if "lm_head" in keep and _is_lm_head(model, module):
            report.skip(name, "LM head kept in high precision (cast.keep_high_precision)")
            continue
        gemm = make_gemm(recipe, name, module)
        if hasattr(module, "gemm"):
            module.gemm = gemm
            report.add(name, f"{type(module).__name__} with {type(gemm).__name__}({recipe.cast.format})")
        else:
            _set_child(model, name, LowPrecisionLinear.from_linear(module, gemm))
            report.add(name, f"LowPrecisionLinear with {type(gemm).__name__}({recipe.cast.format})")
