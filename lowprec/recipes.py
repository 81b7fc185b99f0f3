"""Recipes: declarative descriptions of how to run a model in low precision, and ``convert``.

A recipe is data (a TOML file read with :mod:`tomllib`), never code: nothing in it is
imported or evaluated. Each shipped recipe name (``lowprec.recipes.available()``) is one
file in the repository's ``recipes/`` folder, installed as package data.

``convert(model, recipe)`` walks a model and swaps modules in place by rule:
unit scaling first (:mod:`lowprec.scaling.convert`), then matmul casts / FP8
(:mod:`lowprec.fp8.convert`), then a per-layer QAT plan (:mod:`lowprec.qat`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe name, file or field is wrong; the message names the file, key and what was expected."""


# ----------------------------------------------------------------------------------------------
# The schema. Every section is a frozen dataclass; `_CHOICES` constrains string fields.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitScalingConfig:
    """Unit scaling (Blake et al. 2023, u-muP 2024): put the scale in the ops, weights N(0, 1)."""

    enabled: bool = False
    # "unit": re-initialise weights N(0, 1) for training from scratch;
    # "keep": keep existing weights and absorb their scale so the function is unchanged.
    init: str = "unit"
    # u-muP residual depth rule (design.md): alpha_mlp = mult*sqrt(2/(1+r^2)), alpha_attn = r*alpha_mlp.
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    # LM head forward scale: "unit" = fan_in**-0.5 (Unit Scaling 2023: unit logits at init),
    # "mup" = 1/fan_in (u-muP 2024: small logits at init, base-rate learning rate for the head).
    readout: str = "unit"


@dataclass(frozen=True)
class CastConfig:
    """What precision the matmuls run in. ``format = "none"`` leaves them in the model's dtype."""

    format: str = "none"  # none | fp16 | bf16 | fp8
    # FP8 only (TransformerEngine/torchao constants, see design.md):
    scaling: str = "current"  # current | delayed | rowwise | blockwise | none (naive cast, scale 1)
    forward: str = "e4m3"  # format of X and W in the forward GEMM
    backward: str = "e5m2"  # format of dY in the two backward GEMMs
    history_len: int = 1024  # delayed scaling amax window
    amax_reduction: str = "max"  # max | most_recent
    margin: int = 0  # scale = FP8_MAX / amax / 2**margin
    gemm: str = "auto"  # auto (scaled_mm on CUDA, emulated elsewhere) | scaled_mm (torch._scaled_mm) | emulated (widen, then matmul)
    smooth_swiglu: bool = False  # Fishman et al. 2025: per-channel scale before the down projection
    # Module kinds kept in high precision (design.md: embedding, LM head and norms by default).
    keep_high_precision: tuple[str, ...] = ("embedding", "lm_head", "norm")
    debug: bool = False  # raise on NaN/Inf in FP8 inputs instead of counting them


@dataclass(frozen=True)
class ExcludeConfig:
    """Qualified-name patterns (fnmatch) of modules that conversion must leave alone."""

    patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer a recipe trains with (used by the CLI and the demo)."""

    name: str = "AdamW"  # AdamW | AdamW8bit | AdamW4bit | AdamWFp8
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant
    fp32_state_patterns: tuple[str, ...] = ()  # parameter-name patterns that keep fp32 states
    factor_second_moment: bool = False


@dataclass(frozen=True)
class QatConfig:
    """Per-layer fake quantization (QAT). ``plan`` is a JSON file: qualified module name -> bits."""

    plan: str = ""
    format: str = "int"  # symmetric per-output-channel INT-k


@dataclass(frozen=True)
class Recipe:
    """A complete low-precision recipe. Build one from a shipped name, a TOML file or a dict."""

    name: str = "custom"
    description: str = ""
    unit_scaling: UnitScalingConfig = field(default_factory=UnitScalingConfig)
    cast: CastConfig = field(default_factory=CastConfig)
    exclude: ExcludeConfig = field(default_factory=ExcludeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    source: str = ""  # the file it was read from, if any (not a TOML key)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
        return _build(cls, data, source, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe file {str(path)!r} is not valid TOML: {e}") from None
        recipe = cls.from_dict(data, source=str(path))
        return dataclasses.replace(recipe, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        files = _shipped_files()
        if name not in files:
            raise RecipeError(f"unknown recipe {name!r}; available recipes: {', '.join(sorted(files)) or '(none)'}")
        return cls.from_file(files[name])

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def excluded(self, qualified_name: str) -> bool:
        """True when a module's qualified name matches one of the recipe's exclude patterns."""
        return any(fnmatch.fnmatchcase(qualified_name, p) for p in self.exclude.patterns)


_CHOICES: dict[str, tuple[str, ...]] = {
    "unit_scaling.init": ("unit", "keep"),
    "unit_scaling.readout": ("unit", "mup"),
    "cast.format": ("none", "fp16", "bf16", "fp8"),
    "cast.scaling": ("current", "delayed", "rowwise", "blockwise", "none"),
    "cast.forward": ("e4m3", "e5m2"),
    "cast.backward": ("e4m3", "e5m2"),
    "cast.amax_reduction": ("max", "most_recent"),
    "cast.gemm": ("auto", "scaled_mm", "emulated"),
    "optimizer.name": ("AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8"),
    "optimizer.schedule": ("cosine", "constant"),
    "qat.format": ("int",),
}


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_value(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check one TOML value against a dataclass field type; return it in the field's type."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp in (tuple[str, ...], tuple[float, ...]):
        elem = str if tp == tuple[str, ...] else float
        ok = isinstance(value, list) and all(
            isinstance(v, elem) or (elem is float and isinstance(v, int) and not isinstance(v, bool)) for v in value
        )
        if ok:
            value = tuple(elem(v) for v in value)
        tname = "a list of strings" if elem is str else "a list of numbers"
        if not ok:
            raise RecipeError(f"{source}: key {where!r} must be {tname}, got {value!r}")
        return value
    else:  # pragma: no cover - schema bug
        raise TypeError(tp)
    if not ok:
        raise RecipeError(f"{source}: key {where!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    choices = _CHOICES.get(where)
    if choices is not None and value not in choices:
        raise RecipeError(f"{source}: key {where!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], source: str, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    hints = _resolved_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise RecipeError(
                f"{source}: unknown key {where!r}; expected one of {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, source, prefix=f"{where}.")
        else:
            kwargs[key] = _check_value(value, tp, where, source)
    return cls(**kwargs)


def _resolved_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, globalns=globals())


# ----------------------------------------------------------------------------------------------
# Shipped recipes
# ----------------------------------------------------------------------------------------------


def _shipped_files() -> dict[str, Path]:
    root = resources.files("lowprec.recipe_files")
    out: dict[str, Path] = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = Path(str(entry))
    return out


def available() -> list[str]:
    """Names of the shipped recipes (files in ``recipes/``)."""
    return sorted(_shipped_files())


def resolve(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a shipped name, a path to a TOML file, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith(".toml") or "/" in recipe)):
        return Recipe.from_file(recipe)
    if isinstance(recipe, str):
        return Recipe.from_name(recipe)
    raise RecipeError(f"a recipe must be a shipped name, a path to a .toml file, or a Recipe; got {type(recipe).__name__}")


# ----------------------------------------------------------------------------------------------
# convert()
# ----------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What ``convert`` did: converted modules (name -> what they became) and those left alone (name -> why)."""

    recipe: str = ""
    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, what: str) -> None:
        self.converted[name] = what
        self.skipped.pop(name, None)

    def skip(self, name: str, why: str) -> None:
        if name not in self.converted:
            self.skipped[name] = why

    def __str__(self) -> str:
        lines = [f"lowprec.convert with recipe {self.recipe!r}: {len(self.converted)} converted, {len(self.skipped)} left as they are"]
        lines += [f"  converted  {n:<48} {w}" for n, w in self.converted.items()]
        lines += [f"  left alone {n:<48} {w}" for n, w in self.skipped.items()]
        return "\n".join(lines)


def load_plan(plan: str | Path | Mapping[str, int]) -> dict[str, int]:
    """A QAT plan (qualified module name -> bits) from a mapping or a JSON file."""
    if isinstance(plan, Mapping):
        out = dict(plan)
    else:
        path = Path(plan)
        if not path.is_file():
            raise RecipeError(f"plan file {str(path)!r} does not exist")
        try:
            out = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        if isinstance(out, dict) and "bits" in out and isinstance(out["bits"], dict):
            out = out["bits"]
    if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in out.items()):
        raise RecipeError(f"a plan maps qualified module names (strings) to bit widths (integers); got {out!r}")
    return out


def convert(
    model: nn.Module,
    recipe: str | Path | Recipe = "unit",
    *,
    plan: str | Path | Mapping[str, int] | None = None,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Convert ``model`` in place for low-precision training and return it.

    ``recipe`` is a shipped recipe name (see :func:`available`), a path to a TOML file or a
    :class:`Recipe`. ``plan`` (qualified module name -> bits, or a JSON file) adds per-layer
    fake quantization on top. With ``report=True`` returns ``(model, ConversionReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowprec.convert expects a torch.nn.Module, got {type(model).__name__}")
    recipe = resolve(recipe)
    rep = ConversionReport(recipe=recipe.name)

    if recipe.unit_scaling.enabled:
        from lowprec.scaling.convert import unit_scale_model

        unit_scale_model(model, recipe, rep)
    if recipe.cast.format != "none":
        from lowprec.fp8.convert import apply_casts

        apply_casts(model, recipe, rep)
    if plan is None and recipe.qat.plan:
        base = Path(recipe.source).parent if recipe.source else Path.cwd()
        plan = base / recipe.qat.plan
    if plan is not None:
        from lowprec.qat import apply_plan

        apply_plan(model, load_plan(plan), recipe, rep)

    model.lowprec_recipe = recipe  # read by lowprec.training (unit-scaled loss) and the CLI
    model.lowprec_report = rep
    return (model, rep) if report else model
