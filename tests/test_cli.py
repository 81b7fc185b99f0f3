"""The ``lowprec`` command line, in process (``lowprec.cli.main(argv)``) on a tiny Llama config.

Each test checks what the command promises: the files in its run directory and what is in them,
checkpoints that load and match an uninterrupted run, errors that name what is wrong.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lowprec import cli, numerics, runs

pytestmark = pytest.mark.usefixtures("eager_quantized_adamw")

TINY_CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "max_position_embeddings": 64}
SMALL = ["--batch-size", "4", "--seq-len", "32", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """A user's text file: real prose-like bytes (this test file, repeated) of a few KB."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(Path(__file__).read_bytes() * 3)
    return str(path)


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return list(sub.choices)


# ----------------------------------------------------------------------------------------------
# --help everywhere, the entry points, recipes
# ----------------------------------------------------------------------------------------------


def test_help_on_every_command(capsys):
    commands = _commands()
    assert set(commands) >= {"demo", "train", "sensitivity", "inspect", "bench", "recipes"}
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert all(c in top for c in commands)
    for command in commands:
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: lowprec {command}"), out[:200]
        assert "--help" in out
    assert cli.main([]) == cli.EXIT_USAGE  # no command: the help, and a usage exit status


def test_python_dash_m_lowprec_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "lowprec", "recipes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from lowprec.recipes import available

    assert all(name in proc.stdout for name in available())


def test_recipes_lists_and_shows(capsys):
    from lowprec.recipes import Recipe, available

    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert cli.main(["recipes", "--show", "fp32"]) == 0
    out = capsys.readouterr().out
    assert Path(Recipe.from_name("fp32").source).read_text() in out


# ----------------------------------------------------------------------------------------------
# train: run directory, metrics, plot, checkpoints, Ctrl-C
# ----------------------------------------------------------------------------------------------


def _fresh(tiny_config: str, recipe: str = "fp32"):
    model = cli.load_model(tiny_config, seed=0)
    from lowprec.recipes import convert, resolve

    recipe = resolve(recipe)
    convert(model, recipe)
    return model, recipe


def test_train_writes_metrics_plot_and_a_loadable_checkpoint(tmp_path, tiny_config, text_file, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "fp32", "--config", tiny_config, "--data", text_file, "--steps", "4",
                   "--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), *SMALL])
    assert rc == 0
    assert f"run directory: {out}" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["train_loss"]) == 4 and all(math.isfinite(v) for v in m["train_loss"])
    assert [s for s, _ in m["val_loss"]] == [2, 4]
    assert m["data"] == text_file
    model, _ = _fresh(tiny_config)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    # torch AdamW: exp_avg and exp_avg_sq in fp32 (8 B/param) and one fp32 `step` scalar per tensor
    assert m["optimizer_state_bytes"] == 8 * n_params + 4 * n_tensors
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    # The last checkpoint holds the trained weights: its validation loss is the one reported.
    step = cli.load_checkpoint(out, model)
    assert step == 4
    from lowprec.data import eval_batches, text_file_corpus
    from lowprec.training import evaluate

    corpus = text_file_corpus(text_file)
    val = evaluate(model, eval_batches(corpus.val, 8, 4, 32))
    assert val == pytest.approx(m["final_val_loss"], rel=1e-6)


def test_ctrl_c_leaves_the_last_completed_checkpoint_and_resume_continues_exactly(
        tmp_path, tiny_config, text_file, monkeypatch, capsys):
    """Ctrl-C during step 6 of 10 (checkpoints every 2 steps): exit status 130 and a step-4
    checkpoint that loads with ``weights_only``; ``--resume`` from it then ends bit-identical to
    an uninterrupted run, with the same losses for steps 5 to 10."""
    real_build = runs.build_optimizer

    def build_interrupting(*args, **kwargs):
        opt = real_build(*args, **kwargs)
        calls = {"n": 0}
        real_step = opt.step

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return real_step(*a, **k)

        opt.step = types.MethodType(step, opt)  # a bound method, as LR schedulers expect
        return opt

    common = ["fp32", "--config", tiny_config, "--data", text_file, "--steps", "10", "--eval-every", "5",
              "--checkpoint-every", "2", *SMALL]
    monkeypatch.setattr(runs, "build_optimizer", build_interrupting)
    stopped = tmp_path / "stopped"
    assert cli.main(["train", *common, "--out", str(stopped)]) == cli.EXIT_INTERRUPTED
    assert "last completed checkpoint (step 4)" in capsys.readouterr().err
    ckpt = cli.find_checkpoint(stopped)
    torch.load(ckpt, map_location="cpu", weights_only=True)  # loads safely
    model, _ = _fresh(tiny_config)
    assert cli.load_checkpoint(stopped, model) == 4
    monkeypatch.setattr(runs, "build_optimizer", real_build)

    assert cli.main(["train", *common, "--resume", str(stopped)]) == 0
    whole = tmp_path / "whole"
    assert cli.main(["train", *common, "--out", str(whole)]) == 0
    resumed_m = json.loads((stopped / "metrics.json").read_text())
    whole_m = json.loads((whole / "metrics.json").read_text())
    assert resumed_m["start_step"] == 4
    assert resumed_m["train_loss"] == whole_m["train_loss"][4:]
    a, _ = _fresh(tiny_config)
    b, _ = _fresh(tiny_config)
    assert cli.load_checkpoint(stopped, a) == cli.load_checkpoint(whole, b) == 10
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_missing_data_file_error_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    assert cli.main(["train", "fp32", "--data", str(missing), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_bad_inputs_get_clear_errors(tmp_path, tiny_config, capsys):
    assert cli.main(["train", "no-such-recipe", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'no-such-recipe'" in err and "fp32" in err
    missing = tmp_path / "cfg.json"
    assert cli.main(["train", "fp32", "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    small_vocab = tmp_path / "small.json"
    small_vocab.write_text(json.dumps({**TINY_CONFIG, "vocab_size": 100}))
    assert cli.main(["train", "fp32", "--config", str(small_vocab)]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert cli.main(["train", "fp32", "--config", tiny_config, "--seq-len", "128"]) == 2
    assert "max_position_embeddings 64" in capsys.readouterr().err
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[cast]\nformat = 8\n")
    assert cli.main(["train", str(bad_toml)]) == 2
    err = capsys.readouterr().err
    assert str(bad_toml) in err and "cast.format" in err and "a string" in err


def test_nproc_is_stripped_for_the_workers():
    assert cli._strip_nproc(["train", "fp8", "--nproc", "2", "--steps", "3"]) == ["train", "fp8", "--steps", "3"]
    assert cli._strip_nproc(["train", "--nproc=4", "fp8"]) == ["train", "fp8"]


# ----------------------------------------------------------------------------------------------
# inspect: the numerics table
# ----------------------------------------------------------------------------------------------


def test_tensor_stats_counts_saturation_and_underflow_exactly():
    x = torch.tensor([[1000.0, 1.0, 1e-12, 0.0, -500.0]])
    s = numerics.tensor_stats(x, "e4m3", "none")  # E4M3 max 448: 1000 and -500 clip; 1e-12 rounds to 0
    assert (s["saturated"], s["underflowed"], s["amax"]) == (2 / 5, 1 / 5, 1000.0)
    s = numerics.tensor_stats(x, "e4m3", "current")  # scale 448/1000: nothing clips by construction
    assert (s["saturated"], s["underflowed"]) == (0.0, 1 / 5)
    # E5M2's smallest subnormal is 2**-16: half of it rounds to zero (ties to even), just above does not
    y = torch.tensor([2.0**-17, 2.0**-17 * 1.01, 1.0])
    assert numerics.tensor_stats(y, "e5m2", "none")["underflowed"] == 1 / 3
    assert float(y[1].to(torch.float8_e5m2).float()) > 0 and float(y[0].to(torch.float8_e5m2).float()) == 0
    # row-wise and block-wise scales fit each row / 128-wide block: no saturation, ragged widths padded
    z = torch.randn(3, 200) * torch.tensor([[1.0], [1e3], [1e-3]])
    for scaling in ("rowwise", "blockwise"):
        assert numerics.tensor_stats(z, "e4m3", scaling)["saturated"] == 0.0


def test_inspect_writes_a_row_per_matmul_operand(tmp_path, tiny_config, capsys):
    out = tmp_path / "inspect"
    assert cli.main(["inspect", "fp8", "--config", tiny_config, "--batch-size", "2", "--seq-len", "32",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert (m["forward_format"], m["backward_format"], m["scaling"]) == ("e4m3", "e5m2", "current")
    model = cli.load_model(tiny_config)
    linears = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert {(r["layer"], r["tensor"]) for r in m["rows"]} == {
        (n, t) for n in linears for t in ("input", "weight", "grad_output")}
    # fp8 uses per-tensor current scaling: nothing saturates by construction
    assert all(r["saturated"] == 0.0 and math.isfinite(r["std"]) and r["std"] > 0 for r in m["rows"])
    # the LM head stays in high precision under the fp8 recipe; every other linear runs in FP8
    assert {r["layer"] for r in m["rows"] if not r["cast"]} == {"lm_head"}
    assert "model.layers.0.mlp.down_proj" in printed and f"run directory: {out}" in printed
    assert (out / "numerics.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------


def test_bench_runs_a_benchmark_into_the_run_directory(tmp_path, monkeypatch, capsys):
    bdir = tmp_path / "benchmarks"
    bdir.mkdir()
    (bdir / "bench_fake.py").write_text(
        '"""A fake benchmark that writes its JSON where lowprec bench asks."""\n'
        "import json, os, pathlib\n"
        "d = pathlib.Path(os.environ['LOWPREC_BENCH_DIR'])\n"
        "(d / 'bench_fake.json').write_text(json.dumps({'ok': 1}))\n"
        "print('fake table')\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: bdir)
    assert cli.main(["bench", "--list"]) == 0
    assert "A fake benchmark" in capsys.readouterr().out
    out = tmp_path / "b"
    assert cli.main(["bench", "fake", "--out", str(out)]) == 0
    assert json.loads((out / "bench_fake.json").read_text()) == {"ok": 1}
    m = json.loads((out / "metrics.json").read_text())
    assert [r["benchmark"] for r in m["runs"]] == ["bench_fake"] and m["runs"][0]["exit_status"] == 0
    assert cli.main(["bench", "nope", "--out", str(out)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_the_real_benchmarks_are_listed(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for path in sorted(Path(cli.benchmarks_dir()).glob("bench_*.py")):
        assert path.stem.removeprefix("bench_") in out


# ----------------------------------------------------------------------------------------------
# sensitivity (lowprec.sensitivity, issue 6)
# ----------------------------------------------------------------------------------------------


def _has(module: str, attr: str) -> bool:
    try:
        return hasattr(__import__(module, fromlist=[attr]), attr)
    except ImportError:
        return False


@pytest.mark.skipif(not _has("lowprec.sensitivity", "select_bits"), reason="lowprec.sensitivity not in this build")
def test_sensitivity_writes_report_and_a_plan_within_budget(tmp_path, tiny_config, capsys):
    out = tmp_path / "sens"
    assert cli.main(["sensitivity", "--config", tiny_config, "--method", "measured", "--bits", "2,8",
                     "--avg-bits", "5", "--batches", "1", "--out", str(out), *SMALL]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan and set(plan.values()) <= {2, 8}
    model = cli.load_model(tiny_config)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in plan}
    assert set(sizes) == set(plan)
    assert sum(plan[n] * sizes[n] for n in plan) / sum(sizes.values()) <= 5 + 1e-9
    assert (out / "plan.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "sensitivity.json").is_file()


@pytest.mark.skipif(not _has("lowprec.qat", "apply_plan") or not _has("lowprec.sensitivity", "select_bits"),
                    reason="lowprec.qat / lowprec.sensitivity not in this build")
def test_a_sensitivity_plan_feeds_train_plan(tmp_path, tiny_config, capsys):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"model.layers.0.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 4}))
    out = tmp_path / "qat"
    assert cli.main(["train", "fp32", "--config", tiny_config, "--plan", str(plan_path), "--steps", "2",
                     "--out", str(out), *SMALL]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"} <= set(m["converted"])
    assert all(math.isfinite(v) for v in m["train_loss"])


@pytest.mark.slow
@pytest.mark.skipif(not _has("lowprec.optim", "AdamW4bit"), reason="lowprec.optim.AdamW4bit not in this build")
def test_demo_runs_both_sides_and_writes_its_files(tmp_path, capsys):
    """The demo's machinery on a tiny Llama and 3 steps (the real demo is `lowprec demo`)."""
    from lowprec.demo import run_demo

    tiny = {k: v for k, v in TINY_CONFIG.items() if k not in ("model_type",)}
    m = run_demo(steps=3, batch_size=2, out=tmp_path / "demo", seq_len=32, model_overrides=tiny,
                 sensitivity=_has("lowprec.sensitivity", "select_bits"), progress=False)
    printed = capsys.readouterr().out
    assert "fp32 + AdamW" in printed and "unit-fp8 + AdamW4bit" in printed and "vs fp32" in printed
    fp32, lp = m["runs"]["fp32 + AdamW"], m["runs"]["unit-fp8 + AdamW4bit"]
    assert len(fp32["train_loss"]) == len(lp["train_loss"]) == 3
    assert lp["optimizer_state_bytes"] < fp32["optimizer_state_bytes"]
    assert m["state_ratio"] == pytest.approx(fp32["optimizer_state_bytes"] / lp["optimizer_state_bytes"])
    assert m["loss_gap"] == pytest.approx(lp["final_val_loss"] / fp32["final_val_loss"] - 1)
    assert (tmp_path / "demo" / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    if "sensitivity" in m:
        plan = json.loads((tmp_path / "demo" / "plan.json").read_text())
        assert plan == m["sensitivity"]["plan"] and set(plan.values()) <= {2, 3, 4, 8}

