"""Every recipe field's value range is checked when a recipe is built, and recipe and data paths
that are directories, unreadable, not UTF-8 or too small get one-line errors naming the file.

The schema's rules (``lowprec.recipes.field_rule``) drive both the checks and the fuzz test at the
end, which draws recipe dictionaries from the schema itself (valid and invalid types, boundary and
out-of-range numbers, NaN/inf, unknown keys, choices and non-choices) and requires that each one
either fails to load with a ``RecipeError`` or converts, trains one step and builds its optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import typing

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from lowprec import cli
from lowprec.recipes import (
    CastConfig,
    OptimizerConfig,
    Recipe,
    RecipeError,
    UnitScalingConfig,
)

# ----------------------------------------------------------------------------------------------
# Out-of-range values in a TOML file: RecipeError naming the file, the dotted key and the range
# ----------------------------------------------------------------------------------------------

LR_RANGE = "in [1.1754943508222875e-38, 3.777892961115735e+22]"  # normal float32 .. float32 max * 2**-53
EPS_RANGE = "in [1.1754943508222875e-38, 3.4028234663852886e+38]"  # a normal float32
# (section, key, TOML value, text of the allowed range the message must state)
BAD_VALUES = [
    ("cast", "history_len", "-3", "[1, 65536]"),
    ("cast", "history_len", "0", "[1, 65536]"),
    ("cast", "history_len", "65537", "[1, 65536]"),
    ("cast", "margin", "-5", "[0, 31]"),
    ("cast", "margin", "32", "[0, 31]"),
    ("optimizer", "lr", "-1", LR_RANGE),
    ("optimizer", "lr", "0", LR_RANGE),
    ("optimizer", "lr", "1e-323", LR_RANGE),  # zero once scaled per u-muP parameter
    ("optimizer", "lr", "nan", LR_RANGE),
    ("optimizer", "lr", "inf", LR_RANGE),
    ("optimizer", "lr", "1e30", LR_RANGE),  # lr / (1 - beta1) overflows float32 in torch's Adam step
    ("optimizer", "eps", "-1", EPS_RANGE),
    ("optimizer", "eps", "0.0", EPS_RANGE),
    ("optimizer", "eps", "1e-40", EPS_RANGE),  # rounds to zero in float32 arithmetic
    ("optimizer", "eps", "1e39", EPS_RANGE),
    ("optimizer", "weight_decay", "-0.1", ">= 0"),
    ("optimizer", "weight_decay", "-inf", ">= 0"),
    ("optimizer", "betas", "[1.5, 0.9]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "betas", "[0.9]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "betas", "[0.9, 0.95, 0.99]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "betas", "[0.9, 1.0]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "betas", "[-0.1, 0.9]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "betas", "[0.9, nan]", "exactly 2 numbers, each in [0, 1)"),
    ("optimizer", "warmup_steps", "-5", ">= 0"),
    ("unit_scaling", "residual_mult", "0", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "residual_mult", "-1.0", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "residual_mult", "1e200", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "residual_attn_ratio", "0.0", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "residual_attn_ratio", "inf", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "norm_lr_mult", "0.0", "in [1.52587890625e-05, 65536]"),
    ("unit_scaling", "norm_lr_mult", "nan", "in [1.52587890625e-05, 65536]"),
    ("optimizer", "fp32_state_patterns", '["embed_tokens", "norm("]', "regular expressions"),
    ("optimizer", "fp32_state_patterns", '[""]', "non-empty"),
    ("exclude", "patterns", '["model.layers.0.*", ""]', "non-empty fnmatch patterns"),
]


def _write(tmp_path, text: str | bytes, name: str = "bad.toml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@pytest.mark.parametrize("section, key, value, allowed", BAD_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES])
def test_out_of_range_value_names_file_key_value_and_range(tmp_path, section, key, value, allowed):
    path = _write(tmp_path, f'name = "bad"\n\n[{section}]\n{key} = {value}\n')
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert f"'{section}.{key}'" in msg and allowed in msg, msg


def test_weight_decay_times_lr_above_one_names_both(tmp_path):
    """AdamW multiplies each weight by 1 - lr*weight_decay per step: a product above 1 is refused."""
    path = _write(tmp_path, "[optimizer]\nlr = 0.5\nweight_decay = 2.5\n")
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: key 'optimizer.weight_decay' must be at most 1 / lr = 2 "), msg
    assert "got 2.5 with lr 0.5" in msg
    assert Recipe.from_dict({"optimizer": {"lr": 0.5, "weight_decay": 2.0}}).optimizer.weight_decay == 2.0


def test_every_numeric_and_pattern_field_has_a_rule():
    """The schema is complete: every number has a range, every list of patterns a pattern kind,
    every string either choices or is free text by design."""
    from lowprec.recipes import field_rule

    free_text = {"name", "description", "source", "plan", "high_precision_plan"}
    plain_lists = {"keep_high_precision"}  # its meaning is checked by convert (module kinds)
    sections = [tp for tp in typing.get_type_hints(Recipe).values() if dataclasses.is_dataclass(tp)]
    for cls in (Recipe, *sections):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, rule = hints[f.name], field_rule(f)
            where = f"{cls.__name__}.{f.name}"
            if tp in (int, float, tuple[float, ...]):
                assert rule.range is not None, f"{where} has no range"
            elif tp is str and f.name not in free_text:
                assert rule.choices, f"{where} has no choices"
            elif tp == tuple[str, ...] and f.name not in plain_lists:
                assert rule.pattern is not None, f"{where} has no pattern kind"
            if not dataclasses.is_dataclass(tp):  # the default itself obeys the rule
                assert rule.problem(getattr(cls(), f.name), tp) is None, where


# ----------------------------------------------------------------------------------------------
# The same checks for dicts, objects built in code and dataclasses.replace
# ----------------------------------------------------------------------------------------------


def test_from_dict_names_dict_key_value_and_range():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"optimizer": {"lr": -1}})
    assert str(e.value) == f"<dict>: key 'optimizer.lr' must be a finite number {LR_RANGE}; got -1.0"


@pytest.mark.parametrize("build", [
    lambda: OptimizerConfig(lr=float("nan")),
    lambda: dataclasses.replace(Recipe().cast, history_len=-3),
    lambda: CastConfig(margin=-5),
    lambda: Recipe().replace(optimizer=OptimizerConfig(betas=(0.9,))),
    lambda: UnitScalingConfig(residual_mult=0.0),
    lambda: Recipe().replace(name=3),
    lambda: Recipe(cast={"format": "fp8"}),
    lambda: Recipe.from_name("fp32").replace(optimizer=OptimizerConfig(warmup_steps=-5)),
], ids=["lr-nan", "replace-history", "margin", "betas-len", "residual", "name-type", "section-dict", "warmup"])
def test_an_invalid_recipe_cannot_be_built_in_code(build):
    """No Recipe or section object exists in an invalid state: the constructor, Recipe.replace and
    dataclasses.replace all check, and the message names the class and the dotted key."""
    with pytest.raises(RecipeError, match=r"^(Recipe|OptimizerConfig|CastConfig|UnitScalingConfig): key '"):
        build()


def test_code_built_values_are_normalised_like_loaded_ones():
    o = OptimizerConfig(lr=1, betas=[0.5, 0])
    assert (o.lr, o.betas) == (1.0, (0.5, 0.0)) and isinstance(o.lr, float)
    assert Recipe(optimizer=o) == Recipe.from_dict({"optimizer": {"lr": 1, "betas": [0.5, 0]}})
    hash(Recipe(optimizer=o))  # frozen and hashable: lists became tuples


# ----------------------------------------------------------------------------------------------
# Recipe files that are not readable TOML
# ----------------------------------------------------------------------------------------------


def test_non_utf8_recipe_names_the_file(tmp_path):
    path = _write(tmp_path, b'name = "caf\xe9"\n[optimizer]\nlr = 0.1\n')
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert str(path) in msg and "not valid UTF-8" in msg and "0xe9" in msg and "line 1" in msg, msg


def test_directory_as_recipe_says_it_is_a_directory(tmp_path):
    with pytest.raises(RecipeError, match=r"is a directory") as e:
        Recipe.from_file(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_recipe_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(RecipeError, match=re.escape(f"recipe file {str(fifo)!r} is not a regular file")):
        Recipe.from_file(fifo)  # without the check, reading would block


def test_unreadable_recipe_is_a_recipe_error(tmp_path, monkeypatch):
    path = _write(tmp_path, 'name = "x"\n', "locked.toml")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(RecipeError, match=re.escape(f"recipe file {str(path)!r} cannot be read: Permission denied")):
        Recipe.from_file(path)


# ----------------------------------------------------------------------------------------------
# The CLI: exit status 2 and exactly one line on stderr, no traceback
# ----------------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("section, key, value, allowed", [
    ("optimizer", "lr", "-1", LR_RANGE),
    ("optimizer", "betas", "[0.9]", "exactly 2 numbers"),
    ("cast", "history_len", "-3", "[1, 65536]"),
    ("optimizer", "warmup_steps", "-5", ">= 0"),
    ("cast", "margin", "-5", "[0, 31]"),
])
def test_cli_train_with_out_of_range_value_exits_2_with_one_line(tmp_path, capsys, section, key, value, allowed):
    path = _write(tmp_path, f'name = "bad"\n\n[{section}]\n{key} = {value}\n')
    assert cli.main(["train", str(path), "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and f"'{section}.{key}'" in line and allowed in line, line


def test_cli_subprocess_bad_recipe_one_line_no_traceback(tmp_path):
    path = _write(tmp_path, "[optimizer]\nlr = nan\n")
    p = subprocess.run([sys.executable, "-m", "lowprec", "train", str(path), "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert str(path) in p.stderr and "'optimizer.lr'" in p.stderr and LR_RANGE in p.stderr


def test_cli_non_utf8_and_directory_recipes(tmp_path, capsys):
    bad = _write(tmp_path, b"name = \"\xff\"\n")
    assert cli.main(["train", str(bad), "--steps", "1"]) == 2
    assert "not valid UTF-8" in _one_error_line(capsys)
    folder = tmp_path / "recipes.toml"  # a directory whose name looks like a recipe file
    folder.mkdir()
    assert cli.main(["train", str(folder), "--steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(folder) in line and "is a directory" in line and "does not exist" not in line, line


# ----------------------------------------------------------------------------------------------
# --data: directories, and the smallest file that trains
# ----------------------------------------------------------------------------------------------

# A model that takes the CLI's default --seq-len (128) and trains a step in a fraction of a second.
TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
               "max_position_embeddings": 128}
FAST = ["--steps", "1", "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def _text(n: int) -> bytes:
    return (b"The quick brown fox jumps over the lazy dog. " * (n // 45 + 1))[:n]


def test_cli_data_directory_says_it_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    assert cli.main(["train", "fp32", "--data", str(folder), *FAST, "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert str(folder) in line and "is a directory" in line and "does not exist" not in line, line


def test_cli_data_of_exactly_the_stated_minimum_trains(tmp_path, tiny_config, capsys):
    """A 1,024-byte file at the default --seq-len 128 is too small for a validation window; the
    error states the true minimum, a file of exactly that size trains, one byte less does not."""
    small = _write(tmp_path, _text(1024), "small.txt")
    assert cli.main(["train", "fp32", "--config", tiny_config, "--data", str(small), *FAST,
                     "--out", str(tmp_path / "r0")]) == 2
    line = _one_error_line(capsys)
    assert str(small) in line and "1,024 bytes" in line, line
    minimum = int(re.search(r"at least ([\d,]+)", line).group(1).replace(",", ""))
    assert minimum > 1024

    exact = _write(tmp_path, _text(minimum), "exact.txt")
    out = tmp_path / "r1"
    assert cli.main(["train", "fp32", "--config", tiny_config, "--data", str(exact), *FAST, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["train_loss"]) == 1 and math.isfinite(m["final_val_loss"])

    short = _write(tmp_path, _text(minimum - 1), "short.txt")
    assert cli.main(["train", "fp32", "--config", tiny_config, "--data", str(short), *FAST,
                     "--out", str(tmp_path / "r2")]) == 2
    assert f"at least {minimum:,}" in _one_error_line(capsys)
    # and the 1,024-byte file trains at a sequence length it holds
    assert cli.main(["train", "fp32", "--config", tiny_config, "--data", str(small), "--seq-len", "32", *FAST,
                     "--out", str(tmp_path / "r3")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("seq_len", [1, 7, 32, 127, 128, 500])
@pytest.mark.parametrize("val_fraction", [0.1, 0.5, 0.03])
def test_min_text_bytes_is_exactly_what_batches_need(tmp_path, seq_len, val_fraction):
    """At min_text_bytes both splits give training and validation batches of seq_len; one byte
    less is refused with a message naming the file and the minimum."""
    from lowprec.data import batch_at, eval_batches, min_text_bytes, text_file_corpus

    n = min_text_bytes(seq_len, val_fraction)
    corpus = text_file_corpus(_write(tmp_path, _text(n), "ok.txt"), val_fraction, seq_len=seq_len)
    assert corpus.train.numel() + corpus.val.numel() == n
    x, y = batch_at(corpus.train, 0, 3, seq_len)
    assert x.shape == y.shape == (3, seq_len)
    [(vx, vy)] = eval_batches(corpus.val, 1, 3, seq_len)
    assert vx.shape == vy.shape == (3, seq_len)
    short = _write(tmp_path, _text(n - 1), "short.txt")
    with pytest.raises(ValueError, match=re.escape(f"{str(short)!r} has {n - 1:,} bytes; at least {n:,}")):
        text_file_corpus(short, val_fraction, seq_len=seq_len)


# ----------------------------------------------------------------------------------------------
# Fuzz: any recipe dict either fails with RecipeError, or converts, trains a step and builds
# its optimizer
# ----------------------------------------------------------------------------------------------

FUZZ_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)
WRONG_TYPES = st.sampled_from([None, "3", True, [], {}, 1.5, 7])
ODD_TEXT = st.text(max_size=8)


def _number_strategy(tp, rng):
    """``(inside, outside)`` for a Range: inside draws from the whole range (up to the largest
    finite float where it is unbounded) and its closed bounds; outside holds the values just past
    each bound, the open bounds themselves, and (for floats) NaN and the infinities."""
    ends = [(b, is_open) for b, is_open in ((rng.low, rng.open_low), (rng.high, rng.open_high)) if b is not None]
    closed = [b for b, is_open in ends if not is_open]
    past = ([rng.low - 1] if rng.low is not None else []) + ([rng.high + 1] if rng.high is not None else [])
    past += [b for b, is_open in ends if is_open]
    if tp is int:
        inside = st.integers(rng.low, rng.high) | st.sampled_from(closed)
        return inside, st.sampled_from(past + [1.0])  # 1.0: a float where an integer is expected
    inside = st.floats(rng.low, rng.high, exclude_min=rng.open_low, exclude_max=rng.open_high,
                       allow_nan=False, allow_infinity=False)
    small_ints = [v for v in (1, 2, 3) if v in rng]  # TOML integers where a float is expected
    return inside | st.sampled_from(closed + small_ints), st.sampled_from([math.nan, math.inf, -math.inf] + past)


def _value_strategy(tp, rule, name):
    """(valid, invalid) strategies for one schema field, derived from its type and Rule."""
    if tp is bool:
        return st.booleans(), WRONG_TYPES
    if tp in (int, float):
        inside, outside = _number_strategy(tp, rule.range)
        return inside, outside | WRONG_TYPES
    if tp is str:
        if rule.choices:
            return st.sampled_from(rule.choices), st.sampled_from([c.upper() for c in rule.choices] + [""]) | ODD_TEXT | WRONG_TYPES
        if name in ("plan", "high_precision_plan"):  # a plan file that is not there must be a RecipeError at convert
            return st.sampled_from(["", "no-such-plan.json"]), WRONG_TYPES
        return ODD_TEXT, WRONG_TYPES
    if tp == tuple[float, ...]:
        inside, outside = _number_strategy(float, rule.range)
        n = rule.length
        wrong_length = st.sampled_from([k for k in range(5) if k != n]).flatmap(
            lambda k: st.lists(inside, min_size=k, max_size=k))
        return (st.lists(inside, min_size=n, max_size=n),
                wrong_length | st.lists(inside | outside, min_size=n, max_size=n) | WRONG_TYPES)
    if tp == tuple[str, ...]:
        valid_items = {"fnmatch": st.sampled_from(["model.layers.0.*", "*mlp*", "lm_head", "*.q_proj"]),
                       "regex": st.sampled_from(["embed", r"^model\.embed_tokens", "norm$", r"layers\.\d+\.mlp"]),
                       None: st.sampled_from(["embedding", "lm_head", "norm"]) | ODD_TEXT}[rule.pattern]
        bad_items = st.sampled_from(["", "(", "[a-", "*x"]) if rule.pattern else st.just(3)
        return (st.lists(valid_items, max_size=3),
                st.lists(valid_items | bad_items, min_size=1, max_size=3) | st.lists(st.just(5), min_size=1, max_size=1)
                | WRONG_TYPES)
    raise AssertionError(f"no strategy for {name}: {tp}")


def _toml_like(value):
    return [_toml_like(v) for v in value] if isinstance(value, (list, tuple)) else \
        {k: _toml_like(v) for k, v in value.items()} if isinstance(value, dict) else value


def _rarely(draw, one_in: int) -> bool:
    """True about once in ``one_in`` draws (the rare case is the largest integer: hypothesis
    favours small ones)."""
    return draw(st.integers(1, one_in)) == one_in


@st.composite
def recipe_dicts(draw):
    """A recipe dict drawn from the schema: a shipped recipe (or an empty one) with some fields
    replaced, mostly by valid values, and now and then a section that is not a table or an
    unknown key."""
    from lowprec.recipes import available, field_rule

    base = draw(st.sampled_from([None, *available()]))
    d = _toml_like(Recipe.from_name(base).to_dict()) if base else {}
    top = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        tp = top[f.name]
        if f.name == "source" or not draw(st.booleans()):
            continue
        if not dataclasses.is_dataclass(tp):
            valid, invalid = _value_strategy(tp, field_rule(f), f.name)
            d[f.name] = draw(invalid if _rarely(draw, 25) else valid)
        elif _rarely(draw, 100):
            d[f.name] = draw(WRONG_TYPES)  # a section that is not a table
        else:
            hints, section = typing.get_type_hints(tp), d.setdefault(f.name, {})
            for sf in dataclasses.fields(tp):
                if _rarely(draw, 3):
                    valid, invalid = _value_strategy(hints[sf.name], field_rule(sf), sf.name)
                    section[sf.name] = draw(invalid if _rarely(draw, 25) else valid)
            if _rarely(draw, 100):
                section[draw(st.sampled_from(["bogus", "Lr", "scalling", ""]))] = 1
    if _rarely(draw, 100):
        d["optimiser"] = {}
    return d


@pytest.mark.usefixtures("eager_quantized_adamw")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(recipe_dicts())
def test_fuzz_every_recipe_dict_loads_and_trains_or_is_a_recipe_error(data):
    """A recipe dict either fails to load with a one-line RecipeError naming a key it holds, or
    converts the demo Llama (a RecipeError there is allowed too, e.g. a missing plan file), runs a
    forward and backward pass, builds its optimizer and steps it: never another exception."""
    from lowprec import runs
    from lowprec.models import demo_llama
    from lowprec.recipes import RecipeFieldError, convert
    from lowprec.training import lm_loss

    note(repr(data))
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError as e:
        assert str(e).startswith("<dict>: ") and "\n" not in str(e), str(e)
        if isinstance(e, RecipeFieldError):  # it names a key of a section the dict holds
            section, _, key = e.key.rpartition(".")
            assert (section in data if section else key in data), (e.key, data)
        event("RecipeError at load")
        return
    model = demo_llama(**FUZZ_LLAMA)
    try:
        convert(model, recipe)
    except RecipeError:
        event("RecipeError at convert")
        return
    x = torch.randint(0, 256, (2, 16))
    loss = lm_loss(model, x, torch.roll(x, -1, 1))
    loss.backward()
    opt = runs.build_optimizer(model, recipe)
    opt.step()
    event(f"trained: {recipe.cast.format}, unit={recipe.unit_scaling.enabled}, {recipe.optimizer.name}")


def test_fp8_recipe_excluding_every_linear_is_a_recipe_error():
    """Found by the fuzz: it was a plain ValueError, so `lowprec train` showed a traceback."""
    from lowprec.models import demo_llama
    from lowprec.recipes import convert

    recipe = Recipe.from_dict({"cast": {"format": "fp8"}, "exclude": {"patterns": ["*"]}})
    with pytest.raises(RecipeError):
        convert(demo_llama(**FUZZ_LLAMA), recipe)
