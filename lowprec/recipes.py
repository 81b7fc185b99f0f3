"""Recipes: declarative descriptions of how to run a model in low precision, and ``convert``.

A recipe is data (a TOML file read with :mod:`tomllib`), never code: nothing in it is
imported or evaluated. Each shipped recipe name (``lowprec.recipes.available()``) is one
file in the repository's ``recipes/`` folder, installed as package data.

``convert(model, recipe)`` walks a model and swaps modules in place by rule:
unit scaling first (:mod:`lowprec.scaling.convert`), then matmul casts / FP8
(:mod:`lowprec.matmul.convert`), then a per-layer QAT plan (:mod:`lowprec.qat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import math
import re
import sys
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowprec import formats as _formats
from lowprec.errors import RecipeError
from lowprec.user_files import read_user_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeFieldError(RecipeError):
    """One field holds a value the schema does not allow (a wrong type, or a value out of range).

    The message is one line: ``"<source>: key '<dotted.key>' must be <what is allowed>; got <value>"``.
    ``source`` is the recipe file, ``<dict>`` for :meth:`Recipe.from_dict`, or the class name for a
    recipe or section built in code.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: key {key!r} {problem}")
        self.source, self.key, self.problem = source, key, problem

    def at(self, source: str) -> RecipeFieldError:
        """The same error reported against ``source`` (the file or dict being loaded)."""
        return RecipeFieldError(source, self.key, self.problem)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite the custom __init__
        return type(self), (self.source, self.key, self.problem)


# ----------------------------------------------------------------------------------------------
# The schema. Every section is a frozen dataclass; each field's `Rule` (allowed range, choices,
# list length, pattern kind) sits next to it in the field's metadata (`_field`). Every instance
# checks itself when it is built (`_Schema.__post_init__`): by a loader, in code, or by
# `dataclasses.replace` / `Recipe.replace`, so an invalid recipe never exists.
# ----------------------------------------------------------------------------------------------


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(float(x))


@dataclass(frozen=True)
class Range:
    """The values a number may take: finite, from ``low`` to ``high`` (``None``: no bound on that
    side); ``open_low`` / ``open_high`` leave the bound itself out."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or (x < self.high if self.open_high else x <= self.high)

    def __str__(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.open_low else '['}{_number(lo)}, {_number(hi)}{')' if self.open_high else ']'}"
        if lo is not None:
            return f"{'>' if self.open_low else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.open_high else '<='} {_number(hi)}"
        return ""


PATTERN_KINDS = ("fnmatch", "regex")


@dataclass(frozen=True)
class Rule:
    """What a recipe field accepts beyond its type.

    ``range``: numbers, and each element of a list of numbers. ``choices``: strings.
    ``length``: lists, exactly this many elements. ``pattern``: lists of strings, each a non-empty
    pattern of this kind: ``"fnmatch"`` (shell-style, matched against qualified module names) or
    ``"regex"`` (a Python regular expression, ``re.search``-ed against parameter names), which
    must compile.
    """

    range: Range | None = None
    choices: tuple[str, ...] = ()
    length: int | None = None
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.pattern is not None and self.pattern not in PATTERN_KINDS:  # pragma: no cover - schema bug
            raise ValueError(f"Rule.pattern must be one of {PATTERN_KINDS}; got {self.pattern!r}")

    def describe(self, tp: Any) -> str:
        """What the field accepts, as the end of "must be ..."."""
        bound = f" {self.range}" if self.range is not None and str(self.range) else ""
        if tp is float:
            return f"a finite number{bound}"
        if tp is int:
            return f"an integer{bound}"
        if tp is str:
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        if tp is bool:
            return "a boolean"
        count = f"exactly {self.length} " if self.length is not None else ""
        if tp == tuple[float, ...]:
            rng = self.range if self.range is not None else Range()
            bounded = rng.low is not None and rng.high is not None  # an interval says finite already
            each = str(rng) if bounded else f"finite and {rng}" if str(rng) else "finite"
            return f"a list of {count}numbers, each {each}"
        kind = {"fnmatch": "non-empty fnmatch patterns", "regex": "non-empty Python regular expressions"}
        return f"a list of {count}{kind.get(self.pattern, 'strings')}"

    def problem(self, value: Any, tp: Any) -> str | None:
        """``"must be ...; got ..."`` when ``value`` (already of type ``tp``) breaks the rule, else ``None``."""
        must = f"must be {self.describe(tp)}; got"
        if tp is bool:
            return None
        if tp in (int, float):
            return None if self.range is None or value in self.range else f"{must} {value!r}"
        if tp is str:
            return None if not self.choices or value in self.choices else f"{must} {value!r}"
        if self.length is not None and len(value) != self.length:
            return f"{must} {len(value)} element{'s' if len(value) != 1 else ''} {list(value)!r}"
        if tp == tuple[float, ...]:
            rng = self.range if self.range is not None else Range()
            return None if all(v in rng for v in value) else f"{must} {list(value)!r}"
        for i, v in enumerate(value):
            if self.pattern is not None and not v:
                return f"{must} {list(value)!r} (element {i} is empty)"
            if self.pattern == "regex":
                try:
                    re.compile(v)
                except re.error as e:
                    return f"{must} {list(value)!r} (element {i} {v!r} does not compile: {e})"
        return None


_NO_RULE = Rule()


def _field(default: Any, **rule: Any) -> Any:
    """A schema field with its :class:`Rule` next to it (``range=``, ``choices=``, ``length=``, ``pattern=``)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


def field_rule(f: dataclasses.Field) -> Rule:
    """The :class:`Rule` of one schema field (an empty rule when only its type constrains it)."""
    return f.metadata.get("rule", _NO_RULE)


# The u-muP residual multipliers (alpha_mlp = mult*sqrt(2/(1+r^2)), alpha_attn = r*alpha_mlp) are
# O(1) hyperparameters by design; [2^-16, 2^16] admits every useful setting, while much larger
# values overflow alpha**2 (a Python OverflowError above ~1e154) and much smaller ones all but
# switch a residual branch off.
UMUP_MULTIPLIER_RANGE = Range(2.0**-16, 2.0**16)
# TransformerEngine's DelayedScaling default amax history is 1024 steps (lowprec.matmul.scaling);
# each FP8 layer keeps 3 float32 amaxes per step, so 64x that (768 KiB per layer) is the ceiling.
MAX_HISTORY_LEN = 64 * 1024
# scale = FP8_MAX / amax / 2**margin: beyond this margin the amax itself, scaled, falls below the
# smallest E5M2 subnormal (the wider FP8 format), so every operand would round to zero.
MAX_MARGIN = math.floor(math.log2(_formats.get_format("e5m2").max / _formats.get_format("e5m2").min_subnormal))
# The smallest normal float32: a smaller learning rate or Adam eps rounds to zero (or is flushed
# to zero) in the float32 optimizer arithmetic: a zero eps with a zero second moment divides 0 by
# 0, and a zero u-muP per-parameter rate divides by zero in lowprec.scaling.param_groups.
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# torch's Adam steps each weight by lr / (1 - beta1**t) times a float32 tensor, and that step size
# must be a float32. With beta1 < 1 the divisor is at least 2**-53 (the gap below 1.0 in a double),
# so any larger learning rate can overflow it.
MAX_ADAM_LR = FLOAT32_MAX * 2.0**-53


class _Schema:
    """Base of the schema's dataclasses: each instance checks its fields' types and rules when it is
    built (a list becomes a tuple, an integer a float where the field is a float)."""

    _key: ClassVar[str] = ""  # the section's TOML table ("" for the top level)

    def __init_subclass__(cls, key: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._key = key

    def __post_init__(self) -> None:
        label = type(self).__name__
        hints = _resolved_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            where = f"{self._key}.{f.name}" if self._key else f.name
            tp, value = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise RecipeFieldError(label, where, f"must be a {tp.__name__} (the [{where}] table); "
                                                         f"got {type(value).__name__} {value!r}")
                continue
            ok, value = _coerce(value, tp)
            if not ok:
                raise RecipeFieldError(label, where, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
            problem = field_rule(f).problem(value, tp)
            if problem is not None:
                raise RecipeFieldError(label, where, problem)
            object.__setattr__(self, f.name, value)
        for name, problem in self._relations():
            raise RecipeFieldError(label, f"{self._key}.{name}" if self._key else name, problem)

    def _relations(self) -> Iterator[tuple[str, str]]:
        """``(field, "must be ...; got ...")`` for each rule between fields this instance breaks
        (checked after every field on its own is valid)."""
        return iter(())


@dataclass(frozen=True)
class UnitScalingConfig(_Schema, key="unit_scaling"):
    """Unit scaling (Blake et al. 2023, u-muP 2024): put the scale in the ops, weights N(0, 1)."""

    enabled: bool = _field(False)
    # "unit": re-initialise weights N(0, 1) for training from scratch;
    # "keep": keep existing weights and absorb their scale so the function is unchanged.
    init: str = _field("unit", choices=("unit", "keep"))
    # u-muP residual depth rule (design.md): alpha_mlp = mult*sqrt(2/(1+r^2)), alpha_attn = r*alpha_mlp.
    residual_mult: float = _field(1.0, range=UMUP_MULTIPLIER_RANGE)
    residual_attn_ratio: float = _field(1.0, range=UMUP_MULTIPLIER_RANGE)
    # LM head forward scale: "unit" = fan_in**-0.5 (Unit Scaling 2023: unit logits at init),
    # "mup" = 1/fan_in (u-muP 2024: small logits at init, base-rate learning rate for the head).
    readout: str = _field("unit", choices=("unit", "mup"))
    # Multiplier on the norm gains' u-muP learning rate (lowprec.scaling.param_groups): 1 is u-muP's
    # rule; the unit recipes use 1/16, swept at the demo and the long run (README).
    norm_lr_mult: float = _field(1.0, range=UMUP_MULTIPLIER_RANGE)
    # Under init = "keep": run a probe batch before and after conversion and refuse (restoring
    # the model) if the function changed beyond float32 rounding (lowprec.scaling.verify).
    verify: bool = _field(True)


@dataclass(frozen=True)
class CastConfig(_Schema, key="cast"):
    """What precision the matmuls run in. ``format = "none"`` leaves them in the model's dtype."""

    # mxfp8: OCP MX 1x32 blocks, E8M0 scales (TransformerEngine MXFP8BlockScaling); nvfp4: E2M1 in 1x16
    # blocks with E4M3 scales and a float32 tensor scale (NVIDIA's NVFP4 pretraining recipe).
    format: str = _field("none", choices=("none", "fp16", "bf16", "fp8", "mxfp8", "nvfp4"))
    # FP8 only (TransformerEngine/torchao constants, see design.md):
    # current | delayed | rowwise | blockwise | none (naive cast, scale 1)
    scaling: str = _field("current", choices=("current", "delayed", "rowwise", "blockwise", "none"))
    # fp8: the format; mxfp8: the element format (TransformerEngine's MXFP8 recipe: e4m3 for both); nvfp4: unused (E2M1)
    forward: str = _field("e4m3", choices=("e4m3", "e5m2"))  # format of X and W in the forward GEMM
    backward: str = _field("e5m2", choices=("e4m3", "e5m2"))  # format of dY in the two backward GEMMs
    history_len: int = _field(1024, range=Range(1, MAX_HISTORY_LEN))  # delayed scaling amax window
    amax_reduction: str = _field("max", choices=("max", "most_recent"))
    margin: int = _field(0, range=Range(0, MAX_MARGIN))  # scale = FP8_MAX / amax / 2**margin
    # auto (scaled_mm on CUDA, emulated elsewhere) | scaled_mm (torch._scaled_mm) | emulated (widen, then matmul)
    gemm: str = _field("auto", choices=("auto", "scaled_mm", "emulated"))
    smooth_swiglu: bool = _field(False)  # Fishman et al. 2025: per-channel scale before the down projection
    # Module kinds kept in high precision (design.md: embedding, LM head and norms by default).
    keep_high_precision: tuple[str, ...] = _field(("embedding", "lm_head", "norm"))
    debug: bool = _field(False)  # raise on NaN/Inf in FP8 / MXFP8 / NVFP4 GEMM inputs instead of counting them
    # NVFP4 only (arXiv 2509.25149; each a switch so its effect can be ablated; MXFP8 uses none):
    rht: bool = _field(True)  # 16x16 random Hadamard transform on both weight-gradient GEMM inputs
    stochastic_rounding: bool = _field(True)  # dY rounded stochastically in both backward GEMMs
    weight_blocks_2d: bool = _field(True)  # 16x16 weight blocks: forward and backward share one quantized W
    # The GEMM of the linears kept in high precision (keep_high_precision, high_precision_plan, or
    # dimensions the narrow GEMMs cannot take): "none" = the model's dtype, "bf16" = a BF16 GEMM (NVIDIA's choice).
    high_precision_format: str = _field("none", choices=("none", "bf16"))
    # A plan file from `lowprec sensitivity --for-training FORMAT --high-precision-budget F` (relative
    # to this file): the linears sensitivity chose to keep in high precision.
    high_precision_plan: str = _field("")

    def _relations(self) -> Iterator[tuple[str, str]]:
        # Without a cast format nothing is cast, so a plan saying what to keep would silently do nothing.
        if self.high_precision_plan and self.format == "none":
            yield "high_precision_plan", (f"must be empty when cast.format is none (nothing is cast, so nothing is "
                                          f"kept in high precision); got {self.high_precision_plan!r}")


@dataclass(frozen=True)
class ExcludeConfig(_Schema, key="exclude"):
    """Qualified-name patterns (fnmatch) of modules that conversion must leave alone."""

    patterns: tuple[str, ...] = _field((), pattern="fnmatch")


@dataclass(frozen=True)
class OptimizerConfig(_Schema, key="optimizer"):
    """The optimizer a recipe trains with (used by the CLI and the demo)."""

    name: str = _field("AdamW", choices=("AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8"))
    lr: float = _field(3e-3, range=Range(FLOAT32_TINY, MAX_ADAM_LR))
    weight_decay: float = _field(0.1, range=Range(0.0))
    betas: tuple[float, ...] = _field((0.9, 0.95), length=2, range=Range(0.0, 1.0, open_high=True))
    eps: float = _field(1e-8, range=Range(FLOAT32_TINY, FLOAT32_MAX))  # a normal float32
    warmup_steps: int = _field(20, range=Range(0))
    schedule: str = _field("cosine", choices=("cosine", "constant"))
    # parameter-name regular expressions (re.search) whose parameters keep fp32 states
    fp32_state_patterns: tuple[str, ...] = _field((), pattern="regex")
    factor_second_moment: bool = _field(False)

    def _relations(self) -> Iterator[tuple[str, str]]:
        # AdamW multiplies every weight by 1 - lr * weight_decay each step (lowprec's u-muP groups
        # keep that product per parameter): above 1 the "decay" flips the weights' signs.
        if self.lr * self.weight_decay > 1:
            yield "weight_decay", (f"must be at most 1 / lr = {1 / self.lr:.6g} (AdamW multiplies each weight by "
                                   f"1 - lr * weight_decay per step); got {self.weight_decay!r} with lr {self.lr!r}")


@dataclass(frozen=True)
class QatConfig(_Schema, key="qat"):
    """Per-layer fake quantization (QAT). ``plan`` is a JSON file: qualified module name -> bits."""

    plan: str = _field("")
    format: str = _field("int", choices=("int",))  # symmetric per-output-channel INT-k


@dataclass(frozen=True)
class Recipe(_Schema):
    """A complete low-precision recipe. Build one from a shipped name, a TOML file or a dict."""

    name: str = _field("custom")
    description: str = _field("")
    unit_scaling: UnitScalingConfig = field(default_factory=UnitScalingConfig)
    cast: CastConfig = field(default_factory=CastConfig)
    exclude: ExcludeConfig = field(default_factory=ExcludeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    source: str = _field("")  # the file it was read from, if any (not a TOML key)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
        """A recipe from a mapping shaped like the TOML file; errors name ``source``, the key and what is allowed."""
        return _build(cls, data, source, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A recipe from a UTF-8 TOML file; a missing, unreadable or invalid file is a :class:`RecipeError`."""
        path = Path(path)
        shown = repr(str(path))
        try:
            raw = read_user_file(path, "recipe file", "a TOML file")
        except OSError as e:
            raise RecipeError(str(e)) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise RecipeError(f"recipe file {shown} is not valid UTF-8 TOML: byte {raw[e.start]:#04x} "
                              f"at offset {e.start} (line {line})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe file {shown} is not valid TOML: {e}") from None
        recipe = cls.from_dict(data, source=str(path))
        return dataclasses.replace(recipe, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> Recipe:
        files = _shipped_files()
        if name not in files:
            raise RecipeError(f"unknown recipe {name!r}; available recipes: {', '.join(sorted(files)) or '(none)'}")
        return cls.from_file(files[name])

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (checked like a loaded recipe)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def excluded(self, qualified_name: str) -> bool:
        """True when a module's qualified name matches one of the recipe's exclude patterns."""
        return any(fnmatch.fnmatchcase(qualified_name, p) for p in self.exclude.patterns)


def _type_name(tp: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             tuple[str, ...]: "a list of strings", tuple[float, ...]: "a list of numbers"}
    return names.get(tp, str(tp))


def _as_float(x: int | float) -> float:
    try:
        return float(x)
    except OverflowError:  # an int beyond float range: out of every range, shown as inf
        return math.inf if x > 0 else -math.inf


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """``(True, value in the field's type)`` when ``value`` has type ``tp`` (a TOML array may be a
    list; an integer is a number), else ``(False, value)``."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return (True, _as_float(value)) if _is_number(value) else (False, value)
    if tp is str:
        return isinstance(value, str), value
    if tp in (tuple[str, ...], tuple[float, ...]):
        if not isinstance(value, (list, tuple)):
            return False, value
        if tp == tuple[str, ...]:
            return all(isinstance(v, str) for v in value), tuple(value)
        if not all(_is_number(v) for v in value):
            return False, value
        return True, tuple(_as_float(v) for v in value)
    raise TypeError(tp)  # pragma: no cover - schema bug


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
        kwargs[key] = _build(tp, value, source, prefix=f"{where}.") if dataclasses.is_dataclass(tp) else value
    try:
        return cls(**kwargs)
    except RecipeFieldError as e:  # a section checks its own fields; report them against the source
        raise e.at(source) from None


@functools.cache
def _resolved_hints(cls: type) -> dict[str, Any]:
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


def recipe_keys(recipe: Recipe | None = None) -> list[str]:
    """Every recipe field by its dotted name (``cast.scaling``, ``optimizer.lr``, ...)."""
    def walk(d: Mapping[str, Any], prefix: str) -> list[str]:
        return [k for key, v in d.items()
                for k in (walk(v, f"{prefix}{key}.") if isinstance(v, Mapping) else [f"{prefix}{key}"])]

    return walk((recipe or Recipe()).to_dict(), "")


def with_overrides(recipe: Recipe, overrides: Mapping[str, Any] | None = None, *, init: str | None = None) -> Recipe:
    """``recipe`` with fields set by dotted name (``{"cast.scaling": "delayed", "optimizer.lr": 1e-4}``)
    and ``init`` (``unit_scaling.init``: "keep" keeps pretrained weights), validated exactly as a
    TOML file's fields are; an unknown name is a :class:`RecipeError` listing the valid ones."""
    changes = dict(overrides or {})
    if init is not None:
        changes["unit_scaling.init"] = init
    if not changes:
        return recipe
    source = f"overrides of recipe {recipe.name!r}"
    valid = recipe_keys(recipe)
    data = recipe.to_dict()
    for key, value in changes.items():
        if not isinstance(key, str) or key not in valid:
            raise RecipeError(f"{source}: unknown key {key!r}; expected one of {', '.join(valid)}")
        *sections, name = key.split(".")
        table = data
        for section in sections:
            table = table[section]
        table[name] = list(value) if isinstance(value, tuple) else value
    return dataclasses.replace(Recipe.from_dict(data, source=source), source=recipe.source)


def resolve(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a shipped name, a path to a TOML file, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith(".toml") or "/" in recipe)):
        return Recipe.from_file(recipe)
    if isinstance(recipe, str):
        if recipe not in _shipped_files() and Path(recipe).exists():  # a file or folder without ".toml"
            return Recipe.from_file(recipe)
        return Recipe.from_name(recipe)
    raise RecipeError(f"a recipe must be a shipped name, a path to a .toml file, or a Recipe; got {type(recipe).__name__}")


# ----------------------------------------------------------------------------------------------
# convert()
# ----------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What ``convert`` did: converted modules (name -> what they became), those left alone
    (name -> why), and the QAT plan it applied (None without one)."""

    recipe: str = ""
    converted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    plan: dict[str, int] | None = None

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


_PLAN_SHAPE = ('a JSON object mapping qualified module names to bit widths, e.g. '
               '{"model.layers.0.mlp.down_proj": 4}, or {"bits": {...}} around one')


def load_plan(plan: str | Path | Mapping[str, int]) -> dict[str, int]:
    """A QAT plan (qualified module name -> bits) from a mapping or a JSON file.

    Checks its shape and bit widths (a :class:`RecipeError` naming the file, the module and the
    valid range); whether the names exist in a model is checked by :func:`convert`."""
    return _read_plan(plan)[0]


def _read_plan(plan: str | Path | Mapping[str, int]) -> tuple[dict[str, int], str]:
    """The plan and how error messages name it (``plan file 'p.json'``, or ``plan``)."""
    if isinstance(plan, Mapping):
        data: Any = dict(plan)
        where = "plan"
    elif not isinstance(plan, (str, Path)) and not hasattr(plan, "__fspath__"):
        raise RecipeError(f"a plan is a mapping (qualified module name -> bits) or the path of a JSON file; "
                          f"got {type(plan).__name__} {_short(plan)}")
    else:
        path = Path(plan)
        where = f"plan file {str(path)!r}"
        if not path.is_file():
            raise RecipeError(f"{where} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"{where} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("bits"), dict):
            data = data["bits"]
    _check_plan_entries(data, where)
    return data, where


def _check_plan_entries(data: Any, where: str) -> None:
    """Every entry names a module (a non-empty string) and a bit width :mod:`lowprec.qat` supports."""
    from lowprec.qat import bits_problem

    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be {_PLAN_SHAPE}; got {type(data).__name__} {_short(data)}")
    for name, bits in data.items():
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}: {name!r} is not a qualified module name (a non-empty string); "
                              f"a plan is {_PLAN_SHAPE}")
        problem = bits_problem(bits)
        if problem is not None:
            raise RecipeError(f"{where}: module {name!r}: {problem}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_plan(plan: str | Path | Mapping[str, int] | None, recipe: Recipe) -> tuple[dict[str, int] | None, str]:
    """The plan to apply (the argument, else the recipe's ``qat.plan`` file relative to the
    recipe file) and its name for messages; ``(None, "")`` without one."""
    if plan is None and recipe.qat.plan:
        base = Path(recipe.source).parent if recipe.source else Path.cwd()
        plan = base / recipe.qat.plan
    return (None, "") if plan is None else _read_plan(plan)


# -- checks that run before the model is touched ----------------------------------------------

_CONVERSION_PACKAGES = ("lowprec.scaling", "lowprec.matmul", "lowprec.qat")


def _recipe_where(recipe: Recipe) -> str:
    return recipe.source or f"recipe {recipe.name!r}"


def _fresh_copy_advice() -> str:
    """What to do instead of converting a converted model (mentions lowprec.export where it exists)."""
    import importlib.util

    advice = ("convert a fresh copy of the unconverted model instead (build or load it again, or "
              "copy.deepcopy it before the first convert)")
    if importlib.util.find_spec("lowprec.export") is not None:
        advice += ", or lowprec.export(model) to get back a plain model and convert that"
    return advice


def _previous_conversion(model: nn.Module, recipe: Recipe, plan: dict[str, int] | None) -> ConversionReport | None:
    """The report of ``model``'s earlier conversion when it used the same recipe (same content,
    wherever it was read from) and the same plan: converting again is then a no-op. None when the
    model was never converted. Any other earlier conversion raises: converting a converted model
    stacks transforms (FP8 casts on unit-scaled layers while the loss switches to plain
    cross-entropy, amax histories reset), so lowprec refuses it."""
    previous = getattr(model, "lowprec_recipe", None)
    if previous is None:
        return None
    prev_report = getattr(model, "lowprec_report", None)
    prev_plan = getattr(prev_report, "plan", None)
    same_recipe = isinstance(previous, Recipe) and previous.to_dict() == recipe.to_dict()
    if same_recipe and isinstance(prev_report, ConversionReport) and (prev_plan == plan or prev_plan is None):
        return prev_report  # the same conversion, or the same one and a plan to add (QAT fine-tuning)
    name = getattr(previous, "name", previous)
    asked = "the same recipe with a different QAT plan" if same_recipe else f"recipe {recipe.name!r}"
    raise RecipeError(f"{type(model).__name__} was already converted with recipe {name!r}"
                      f"{' and a QAT plan' if prev_plan else ''}; lowprec.convert does not convert a model twice "
                      f"(asked for {asked}): {_fresh_copy_advice()}")


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run a conversion step as a transaction: on any exception the module tree is restored
    (:class:`_ModuleTreeSnapshot`) and the exception goes on."""
    snapshot = _ModuleTreeSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


def _add_plan(model: nn.Module, recipe: Recipe, plan: dict[str, int], where: str, report: ConversionReport) -> None:
    """A QAT plan on a model already converted with ``recipe`` and no plan: the last step of the
    HAWQ flow (train, score, fine-tune the trained weights with the plan), all or nothing."""
    from lowprec.qat import apply_plan

    _check_plan_fits(model, plan, where)
    with _all_or_nothing(model):
        apply_plan(model, plan, recipe, report)
    report.plan = plan


def _check_no_lowprec_modules(model: nn.Module) -> None:
    """A model converted piece by piece (``unit_scale_model``, ``apply_casts``, ``apply_plan``)
    carries no ``lowprec_recipe`` but must not be converted again either."""
    for name, module in model.named_modules():
        package = ".".join(type(module).__module__.split(".")[:2])
        if package in _CONVERSION_PACKAGES:
            raise RecipeError(f"{type(model).__name__} already holds lowprec modules ({name or 'the model'!r} is a "
                              f"{type(module).__name__} from {type(module).__module__}), so it was converted "
                              f"before, though not by lowprec.convert: {_fresh_copy_advice()}")


def _example_name(model: nn.Module) -> str:
    """A qualified name of one of ``model``'s linear-like layers (a 2-D+ weight, not an
    embedding), for messages; else of any module; "" for a model without submodules."""
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(module, nn.Embedding):
            return name
    return next((n for n, _ in model.named_modules() if n), "")


def _check_keep_high_precision(model: nn.Module, recipe: Recipe) -> None:
    """Each ``cast.keep_high_precision`` entry is a module kind or a pattern matching a module."""
    from lowprec.matmul.convert import keep_entries_problem

    problem = keep_entries_problem(model, recipe.cast.keep_high_precision)
    if problem is not None:
        example = _example_name(model)
        raise RecipeError(f"{_recipe_where(recipe)}: key 'cast.keep_high_precision': {problem}; patterns match "
                          f"qualified module names" + (f" such as {example!r}" if example else ""))


def _check_high_precision_plan(model: nn.Module, recipe: Recipe) -> None:
    """``cast.high_precision_plan`` is a readable plan file whose names are linear layers of ``model``."""
    if recipe.cast.format == "none" or not recipe.cast.high_precision_plan:
        return
    from lowprec.matmul.convert import resolve_high_precision_plan

    resolve_high_precision_plan(model, recipe)


def _check_plan_fits(model: nn.Module, plan: dict[str, int], where: str) -> None:
    """Every planned name is a module of ``model`` with a weight of 2 or more dims."""
    from lowprec.qat import plan_problems, unknown_plan_names

    unknown = unknown_plan_names(model, plan)
    if unknown:
        example = _example_name(model)
        raise RecipeError(f"{where}: {type(model).__name__} has no module {', '.join(map(repr, unknown))}"
                          + (f" (plan keys are qualified module names such as {example!r})" if example else ""))
    problems = plan_problems(model, plan)
    if problems:
        raise RecipeError(f"{where}: " + "; ".join(f"module {n!r}: {p}" for n, p in problems.items()))


# -- the transaction ---------------------------------------------------------------------------


class _ModuleTreeSnapshot:
    """The module tree of a model, by reference: each module's class, its ``__dict__`` and the
    contents of the dicts and sets in it (``_modules``, ``_parameters``, ``_buffers``, hooks).

    :meth:`restore` puts all of it back in place, so the user's model object, its modules and
    its Parameter objects are the very same ones as before, in the same places, with the same
    classes and attributes. Tensor values are not copied (no second copy of the weights): the
    conversion steps change none before they commit (see :func:`convert`)."""

    def __init__(self, model: nn.Module) -> None:
        import copy

        self._entries = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            inner = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, set))}
            self._entries.append((module, type(module), attrs, inner))

    def restore(self) -> None:
        for module, cls, attrs, inner in self._entries:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, contents in inner.items():
                attrs[key].clear()
                attrs[key].update(contents)


def _convert_steps(model: nn.Module, recipe: Recipe, plan: dict[str, int] | None, rep: ConversionReport) -> None:
    """Unit scaling, then matmul casts, then the QAT plan; weight re-initialisation comes last."""
    pending_init: list[nn.Module] = []
    if recipe.unit_scaling.enabled:
        from lowprec.scaling.convert import unit_scale_model

        unit_scale_model(model, recipe, rep, pending_init=pending_init)
    if recipe.cast.format != "none":
        from lowprec.matmul.convert import apply_casts

        apply_casts(model, recipe, rep)
    if plan is not None:
        from lowprec.qat import apply_plan

        apply_plan(model, plan, recipe, rep)
    if pending_init:
        from lowprec.scaling.convert import unit_init

        unit_init(pending_init)


def convert(
    model: nn.Module,
    recipe: str | Path | Recipe = "unit",
    *,
    init: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    plan: str | Path | Mapping[str, int] | None = None,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Convert ``model`` in place for low-precision training and return it.

    ``recipe`` is a shipped recipe name (see :func:`available`), a path to a TOML file or a
    :class:`Recipe`. ``init="keep"`` keeps the model's (pretrained) weights and absorbs their scale
    where the recipe unit-scales (``"unit"`` re-initialises them); ``overrides`` sets any recipe
    field by its dotted name (:func:`with_overrides`). ``plan`` (qualified module name -> bits, or
    a JSON file) adds per-layer fake quantization on top. With ``report=True`` returns
    ``(model, ConversionReport)``.

    A model is converted once. Converting it again with the same recipe and plan is a no-op
    (returns it and its first report); with anything else it is a :class:`RecipeError`, as is a
    model that already holds lowprec modules: stacking conversions mixes their transforms.

    Conversion is all or nothing. First everything that can be checked is, before the model is
    touched: the recipe, the plan (its JSON, bit widths, and that each name is a module of the
    model with a weight of 2+ dims), ``cast.keep_high_precision`` (each entry a module kind or a
    pattern matching a module), ``cast.high_precision_plan`` (a readable plan file whose names are
    linear layers of the model), and the model itself. Then the steps run as a transaction: a
    snapshot of the module tree (:class:`_ModuleTreeSnapshot`) is restored if any step raises,
    leaving the model bit-identical: the same object, modules, classes, attributes and Parameter
    objects, with their values. Values need no copy because no step writes one before the last:
    the unit-scaling weight re-initialisation is deferred to the very end. (Converting a
    ``copy.deepcopy`` and swapping it in would double the memory and hand back different module
    and Parameter objects than those the user and their optimizer hold.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowprec.convert expects a torch.nn.Module, got {type(model).__name__}")
    recipe = with_overrides(resolve(recipe), overrides, init=init)
    plan_map, plan_where = _resolve_plan(plan, recipe)
    previous = _previous_conversion(model, recipe, plan_map)
    if previous is not None and previous.plan is None and plan_map is not None:
        _add_plan(model, recipe, plan_map, plan_where, previous)
    if previous is not None:
        return (model, previous) if report else model
    _check_no_lowprec_modules(model)
    _check_keep_high_precision(model, recipe)
    _check_high_precision_plan(model, recipe)
    if plan_map is not None:
        _check_plan_fits(model, plan_map, plan_where)

    rep = ConversionReport(recipe=recipe.name, plan=plan_map)
    with _all_or_nothing(model):
        _convert_steps(model, recipe, plan_map, rep)
    model.lowprec_recipe = recipe  # read by lowprec.training (unit-scaled loss) and the CLI
    model.lowprec_report = rep
    if recipe.unit_scaling.enabled:  # HF's model(x, labels=y).loss gets the unit-scaled gradient too
        from lowprec.hf_loss import install

        install(model)
    return (model, rep) if report else model
