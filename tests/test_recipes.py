"""Every shipped recipe works end to end, and bad recipe files get errors that say what is wrong.

Parametrized over ``lowprec.recipes.available()``, so a recipe file added later is covered.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import lowprec
from lowprec import runs
from lowprec.recipes import Recipe, RecipeError, available, convert
from lowprec.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("eager_quantized_adamw")

# Small enough to train in a fraction of a second, with every matmul dimension a multiple of 16
# (FP8 GEMMs leave other layers in high precision, which would hide what a recipe does).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64)
STEPS = 5


def tiny_llama(seed: int = 0):
    from lowprec.models import demo_llama

    return demo_llama(seed=seed, **TINY)


def test_available_lists_the_shipped_files():
    names = available()
    assert "fp32" in names
    for name in names:
        r = Recipe.from_name(name)
        assert r.source.endswith(f"{name}.toml")
        assert r.name == name, f"recipe file {r.source} declares name {r.name!r}; its file name says {name!r}"


@pytest.mark.parametrize("name", available())
def test_every_recipe_converts_and_trains_without_nan(name, corpus):
    recipe = Recipe.from_name(name)
    model, report = convert(tiny_llama(), name, report=True)
    if recipe.unit_scaling.enabled or recipe.cast.format != "none":
        assert report.converted, f"recipe {name!r} converted nothing in a Llama:\n{report}"
    assert model.lowprec_recipe == recipe
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = runs.build_optimizer(model, recipe)
    result = train(model, opt, corpus, TrainConfig(steps=STEPS, batch_size=4, seq_len=32, warmup_steps=1,
                                                   eval_every=STEPS, eval_batches=1))
    assert result.diverged_at is None, f"{name}: loss not finite at step {result.diverged_at}: {result.train_loss}"
    assert len(result.train_loss) == STEPS and all(math.isfinite(v) for v in result.train_loss)
    assert math.isfinite(result.final_val_loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{name}: {STEPS} optimizer steps left every parameter unchanged"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Bad recipe files: the error names the file, the key (and the line, where TOML reports it),
# and what was expected.
# ----------------------------------------------------------------------------------------------


def _write(tmp_path, text: str, name: str = "bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, 'name = "x"\n\n[cast]\nformat = "fp8\n')
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert str(path) in msg
    assert re.search(r"line 4\b", msg), msg


def test_unknown_key_names_file_key_and_expected_keys(tmp_path):
    path = _write(tmp_path, '[cast]\nformat = "fp8"\nscalling = "delayed"\n')
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert str(path) in msg and "'cast.scalling'" in msg
    assert "scaling" in msg.split("expected", 1)[1]  # the valid keys are listed


def test_unknown_section_is_an_unknown_key(tmp_path):
    path = _write(tmp_path, '[optimiser]\nname = "AdamW"\n')
    with pytest.raises(RecipeError, match=r"unknown key 'optimiser'.*optimizer"):
        Recipe.from_file(path)


@pytest.mark.parametrize(
    "body, key, expected",
    [
        ("[optimizer]\nlr = \"fast\"\n", "optimizer.lr", "a number"),
        ("[cast]\nmargin = 1.5\n", "cast.margin", "an integer"),
        ("[unit_scaling]\nenabled = \"yes\"\n", "unit_scaling.enabled", "a boolean"),
        ("[exclude]\npatterns = \"lm_head\"\n", "exclude.patterns", "a list of strings"),
        ("[cast]\nformat = \"fp4\"\n", "cast.format", "one of none, fp16, bf16, fp8"),
        ("cast = 3\n", "cast", "a table"),
    ],
)
def test_wrong_type_names_file_key_and_expected_type(tmp_path, body, key, expected):
    path = _write(tmp_path, body)
    with pytest.raises(RecipeError) as e:
        Recipe.from_file(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and expected in msg, msg


def test_unknown_recipe_name_lists_the_available_ones():
    with pytest.raises(RecipeError) as e:
        lowprec.convert(torch.nn.Linear(16, 16), "unit-fp9")
    msg = str(e.value)
    assert "'unit-fp9'" in msg
    assert all(n in msg for n in available())


def test_missing_recipe_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(RecipeError, match=re.escape(str(missing))):
        lowprec.recipes.resolve(str(missing))


def test_a_copied_and_edited_recipe_file_loads(tmp_path):
    """The README's advice: copy a shipped file, edit it, pass its path."""
    src = Recipe.from_name("fp32").source
    text = open(src).read().replace('name = "fp32"', 'name = "mine"').replace("lr = 5e-4", "lr = 1e-3")
    path = _write(tmp_path, text, "mine.toml")
    r = lowprec.recipes.resolve(str(path))
    assert (r.name, r.optimizer.lr, r.source) == ("mine", 1e-3, str(path))

