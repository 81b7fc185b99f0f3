"""Recipe fields in one argument (issue 16): ``convert(init=, overrides=)``, ``--init`` / ``--set``,
and commands that read the recipe a run recorded instead of asking for it again."""

from __future__ import annotations

import json

import pytest
import torch

import lowprec
from lowprec import cli
from lowprec.models import demo_llama
from lowprec.recipes import RecipeError, recipe_keys, resolve, with_overrides

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)
TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
               "max_position_embeddings": 64}


def test_convert_takes_init_and_overrides_by_dotted_name():
    model = lowprec.convert(demo_llama(**SMALL), "unit-fp8", init="keep",
                            overrides={"cast.scaling": "delayed", "optimizer.lr": 1e-4})
    r = model.lowprec_recipe
    assert (r.unit_scaling.init, r.cast.scaling, r.optimizer.lr) == ("keep", "delayed", 1e-4)
    assert r.name == "unit-fp8" and r.source == resolve("unit-fp8").source  # a plan path still resolves beside it
    # everything else is the shipped recipe's
    shipped = resolve("unit-fp8").to_dict()
    got = r.to_dict()
    for section in ("unit_scaling", "cast", "optimizer"):
        for k, v in shipped[section].items():
            if f"{section}.{k}" not in ("unit_scaling.init", "cast.scaling", "optimizer.lr"):
                assert got[section][k] == v, (section, k)


def test_keep_init_keeps_the_function():
    torch.manual_seed(0)
    model = demo_llama(**SMALL)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(x).logits
        lowprec.convert(model, "unit", init="keep")
        after = model(x).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


@pytest.mark.parametrize("overrides,match", [
    ({"cast.scalling": "delayed"}, "unknown key 'cast.scalling'; expected one of .*cast.scaling"),
    ({"cast": {"scaling": "delayed"}}, "unknown key 'cast'"),
    ({"cast.scaling": 3}, "key 'cast.scaling' must be a string"),
    ({"optimizer.lr": -1.0}, "key 'optimizer.lr' must be a finite number in"),
    ({"cast.history_len": 0}, r"key 'cast.history_len' must be an integer in \[1, "),
])
def test_bad_overrides_are_recipe_errors_and_leave_the_model(overrides, match):
    model = demo_llama(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=match):
        lowprec.convert(model, "unit-fp8", overrides=overrides)
    assert not hasattr(model, "lowprec_recipe")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RecipeError, match="unit_scaling.init' must be one of unit, keep"):
        with_overrides(resolve("unit"), init="kept")


def test_recipe_keys_are_every_field():
    keys = recipe_keys()
    assert {"cast.scaling", "optimizer.lr", "unit_scaling.init", "qat.plan", "name"} <= set(keys)
    assert "source" not in keys and "cast" not in keys


def test_cli_set_and_init_reach_the_run_and_sensitivity_reads_its_recipe(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    common = ["--config", str(config), "--batch-size", "2", "--seq-len", "32", "--no-progress"]
    run = tmp_path / "run"
    assert cli.main(["train", "unit-fp8", *common, "--steps", "2", "--eval-batches", "1", "--eval-every", "2",
                     "--set", "cast.scaling=delayed", "--set", "cast.history_len=16", "--init", "keep",
                     "--out", str(run)]) == 0
    recipe = json.loads((run / "metrics.json").read_text())["recipe"]
    assert recipe["cast"]["scaling"] == "delayed" and recipe["cast"]["history_len"] == 16
    assert recipe["unit_scaling"]["init"] == "keep"
    capsys.readouterr()
    # the README's flow: sensitivity on the run, without repeating its recipe (and its overrides:
    # a delayed-scaling model has amax-history buffers a current-scaling one lacks)
    out = tmp_path / "sens"
    assert cli.main(["sensitivity", *common, "--checkpoint", str(run), "--method", "measured", "--bits", "4,8",
                     "--batches", "1", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "recipe 'unit-fp8', as recorded in the checkpoint" in said
    assert (out / "plan.json").is_file()
    # a bad --set is one line, exit 2
    assert cli.main(["train", "unit-fp8", *common, "--set", "cast.scalling=delayed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'cast.scalling'" in err[0]


def test_a_plan_on_a_model_converted_with_the_same_recipe_is_qat_fine_tuning():
    model = lowprec.convert(demo_llama(**SMALL), "unit-fp8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {"model.layers.0.mlp.down_proj": 4}
    again, rep = lowprec.convert(model, "unit-fp8", plan=plan, report=True)
    assert again is model and rep.plan == plan and "model.layers.0.mlp.down_proj" in rep.converted
    assert type(model.model.layers[0].mlp.down_proj).__name__ != "Linear"
    # the trained values are kept (the weight moved under a parametrization, its value unchanged)
    w = model.state_dict()["model.layers.0.mlp.down_proj.parametrizations.weight.original"]
    assert torch.equal(w, before["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(RecipeError, match="same recipe with a different QAT plan"):
        lowprec.convert(model, "unit-fp8", plan={"model.layers.0.mlp.down_proj": 3})
    with pytest.raises(RecipeError, match="already converted with recipe 'unit-fp8'"):
        lowprec.convert(lowprec.convert(demo_llama(**SMALL), "unit-fp8"), "fp8", plan=plan)


@pytest.mark.slow
def test_train_score_then_qat_fine_tune_from_the_trained_run(tmp_path, capsys):
    """The README's HAWQ flow in three commands: the QAT run starts from the trained weights (its
    loss before training is the trained run's, not a fresh model's) and improves on them."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    data = ["--batch-size", "4", "--seq-len", "32", "--no-progress", "--eval-batches", "4"]
    run, sens, qat = tmp_path / "run", tmp_path / "sens", tmp_path / "qat"
    assert cli.main(["train", "unit-fp8", "--config", str(config), *data, "--steps", "40", "--eval-every", "40",
                     "--out", str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["final_val_loss"]
    assert cli.main(["sensitivity", *data[:-2], "--checkpoint", str(run), "--method", "measured", "--bits", "4,8",
                     "--batches", "1", "--out", str(sens)]) == 0
    assert cli.main(["train", "unit-fp8", *data, "--steps", "20", "--eval-every", "20", "--lr", "1e-3",
                     "--init-from", str(run), "--plan", str(sens / "plan.json"), "--out", str(qat)]) == 0
    m = json.loads((qat / "metrics.json").read_text())
    fresh = 5.545  # ln(256): an untrained byte model
    assert abs(m["initial_val_loss"] - trained) < 0.1 * abs(fresh - trained), (m["initial_val_loss"], trained)
    assert m["final_val_loss"] < m["initial_val_loss"]
    assert m["init_from"] == str(run) and m["recipe"]["name"] == "unit-fp8"


def test_init_from_a_hugging_face_checkpoint_keeps_its_function(tmp_path, capsys, corpus):
    from lowprec.training import eval_batches, evaluate

    torch.manual_seed(0)
    hf = demo_llama(**SMALL, max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "hf")
    want = evaluate(hf, eval_batches(corpus.val, 2, 2, 32))
    out = tmp_path / "ft"
    assert cli.main(["train", "unit", "--init-from", str(tmp_path / "hf"), "--batch-size", "2", "--seq-len", "32",
                     "--eval-batches", "2", "--steps", "1", "--eval-every", "1", "--no-progress",
                     "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"]["unit_scaling"]["init"] == "keep"  # pretrained weights are kept, not re-drawn
    assert m["initial_val_loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("make,words", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "neither a Hugging Face checkpoint directory"),
])
def test_init_from_bad_paths_exit_2_with_one_line(tmp_path, capsys, make, words):
    path = make(tmp_path)
    assert cli.main(["train", "unit", "--init-from", str(path), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]
