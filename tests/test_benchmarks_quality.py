"""Smoke tests of the two quality benchmarks of issue 14 at tiny sizes: each main() runs, writes
its JSON and plots, and resumes (width_transfer reruns no point; long_run continues from its
checkpoint, and the continuation equals an uninterrupted run bit for bit)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
width_transfer = importlib.import_module("width_transfer")
long_run = importlib.import_module("long_run")

TINY_TEXT = ["--max-bytes", "300000"]


def test_width_overrides_follow_the_demo_shape():
    assert width_transfer.width_overrides(256) == dict(  # the demo Llama itself
        hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688, num_hidden_layers=4)
    assert width_transfer.width_overrides(128)["intermediate_size"] == 352  # 688/256 * 128 = 344 -> 22 x 16
    assert width_transfer.width_overrides(512)["intermediate_size"] == 1376
    assert width_transfer.width_overrides(512)["num_attention_heads"] == 8  # head dim 64
    with pytest.raises(ValueError, match="hidden size 100 must be a positive multiple of the head dim 64"):
        width_transfer.width_overrides(100)
    assert width_transfer.grid_steps(0.25, 0.125) == -1 and width_transfer.grid_steps(2.0 ** -11, 2.0 ** -9) == 2


def test_width_transfer_runs_writes_and_reruns_no_point(tmp_path, capsys):
    argv = ["--widths", "32,64", "--head-dim", "16", "--layers", "2", "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--max-points", "5", "--out", str(tmp_path), *TINY_TEXT]
    assert width_transfer.main(argv) == 0
    first = json.loads((tmp_path / "width_transfer.json").read_text())
    log = (tmp_path / "width_transfer" / "points.jsonl").read_text()
    assert first["new_points"] == 20 and len(log.splitlines()) == 20  # 2 recipes x 2 widths x 5 points
    assert (tmp_path / "width_transfer.png").is_file()
    for recipe in ("fp32", "unit"):
        d = first["recipes"][recipe]
        assert set(d["best_lr"]) == {"32", "64"} and isinstance(d["shift_grid_steps"], int)
        for w in ("32", "64"):
            points = d["sweeps"][w]["points"]
            assert len(points) == 5 and d["best_loss"][w] == min(points.values())
    # same recipe grid at every width: the lattices agree
    assert first["recipes"]["unit"]["sweeps"]["32"]["points"].keys() == \
        first["recipes"]["unit"]["sweeps"]["64"]["points"].keys()
    out = capsys.readouterr().out
    assert "unit: best lr moves" in out and "fp32: best lr moves" in out

    assert width_transfer.main([*argv, "--no-plot"]) == 0  # a rerun: every point comes from the log
    second = json.loads((tmp_path / "width_transfer.json").read_text())
    assert second["new_points"] == 0
    assert (tmp_path / "width_transfer" / "points.jsonl").read_text() == log
    assert second["recipes"] == first["recipes"]


def test_long_run_norm_lr_mult_reaches_the_unit_arms_only():
    table = long_run.arms_at_norm_lr_mult(0.25)
    assert table.keys() == long_run.ARMS.keys() and long_run.ARMS == long_run.arms_at_norm_lr_mult(None)
    for name, arm in table.items():
        recipe = arm.build_recipe()
        if recipe.unit_scaling.enabled:
            assert recipe.unit_scaling.norm_lr_mult == 0.25, name
            assert ("unit_scaling.norm_lr_mult", 0.25) in arm.overrides, name
        else:
            assert arm == long_run.ARMS[name], name  # fp32 and fp8 have no norm-gain rule to change
    # the value a recipe already carries is no override (a run's saved settings stay the same)
    own = long_run.ARMS["unit-fp8+AdamW4bit"].build_recipe().unit_scaling.norm_lr_mult
    assert long_run.arms_at_norm_lr_mult(own)["unit-fp8+AdamW4bit"] == long_run.ARMS["unit-fp8+AdamW4bit"]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(SystemExit, match="norm-lr-mult"):
            long_run.arms_at_norm_lr_mult(bad)


def _long(out: Path, *extra: str) -> dict:
    argv = ["--steps", "20", "--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "2",
            "--batch-size", "2", "--seq-len", "32", "--log-every", "5", "--checkpoint-every", "10",
            "--eval-batches", "2", "--out", str(out), *TINY_TEXT, *extra]
    assert long_run.main(argv) == 0
    return json.loads((out / "long_run.json").read_text())


def _final_digests(out: Path, arm: str) -> dict:
    from lowprec import checkpoint as ckpt

    return ckpt.read_file(ckpt.latest(out / "long_run" / arm / "checkpoints"))["digests"]


def test_long_run_resumes_bit_identical_and_reruns_nothing(tmp_path):
    arm = "unit-fp8+AdamW4bit"  # FP8 casts, Smooth-SwiGLU and 4-bit optimizer states: the most state to carry
    whole = _long(tmp_path / "a", "--arms", f"fp32+AdamW,{arm}")
    r = whole["arms"][arm]
    assert [row["step"] for row in r["log"]] == [0, 5, 10, 15, 20] and r["steps_run"] == 20
    row = r["log"][-1]
    assert len(row["down_proj_input_amax"]) == 2  # one per layer
    ops = {(o["layer"], o["tensor"]) for o in row["fp8_operands"]}
    assert ("model.layers.1.mlp.down_proj", "grad_output") in ops and len(ops) == 2 * 7 * 3  # 7 linears x 3 operands
    assert all(o.get("smoothed") for o in row["fp8_operands"] if "down_proj" in o["layer"] and o["tensor"] != "grad_output")
    assert whole["arms"]["fp32+AdamW"]["log"][-1]["fp8_operands"] == []  # no FP8 operands in fp32
    table = {t["arm"]: t for t in whole["table"]}
    gap = row["val_loss"] / whole["arms"]["fp32+AdamW"]["log"][-1]["val_loss"] - 1
    assert table[arm]["vs fp32+AdamW"] == f"{100 * gap:+.2f}%"
    assert (tmp_path / "a" / "long_run.png").is_file() and (tmp_path / "a" / "long_run_amax.png").is_file()
    merged = _long(tmp_path / "a", "--arms", "fp32+AdamW", "--no-plot")  # arms split over invocations end in one table
    assert list(merged["arms"]) == ["fp32+AdamW", arm] and merged["arms"][arm]["log"] == r["log"]
    assert merged["arms"]["fp32+AdamW"]["steps_run"] == 0

    b = tmp_path / "b"
    part = _long(b, "--arms", arm, "--stop-after", "10", "--no-plot")
    assert part["arms"][arm]["steps_run"] == 10 and [x["step"] for x in part["arms"][arm]["log"]] == [0, 5, 10]
    # a crash after logging step 15 but before the checkpoint at 20: the stray line must go
    with (b / "long_run" / arm / "log.jsonl").open("a") as f:
        f.write(json.dumps({**part["arms"][arm]["log"][-1], "step": 15}) + "\n")
    rest = _long(b, "--arms", arm, "--no-plot")
    assert rest["arms"][arm]["start_step"] == 10 and rest["arms"][arm]["steps_run"] == 10
    assert rest["arms"][arm]["log"] == r["log"]  # every logged number, bit for bit
    assert _final_digests(b, arm) == _final_digests(tmp_path / "a", arm)  # model, 4-bit states, RNG

    sparse = tmp_path / "c"  # logging only at the ends: the same run (logging changes no weight, state or RNG)
    _long(sparse, "--arms", arm, "--no-plot", "--log-every", "20", "--checkpoint-every", "20")
    assert _final_digests(sparse, arm) == _final_digests(b, arm)

    again = _long(b, "--arms", arm, "--no-plot")  # complete: nothing is retrained
    assert again["arms"][arm]["steps_run"] == 0 and again["arms"][arm]["log"] == r["log"]
    with pytest.raises(SystemExit, match="arm 'unit-fp8\\+AdamW4bit'.*'lr': \\("):
        _long(b, "--arms", arm, "--lr", f"{arm}=0.1")
    with pytest.raises(SystemExit, match="unknown arms"):
        _long(b, "--arms", "fp16+AdamW")


def test_long_run_sweep_brackets_each_arm_and_reuses_its_points(tmp_path, capsys):
    """--sweep tunes an arm at the long run's own setting: at least 5 rates by factors of 2, each a
    full long run of its own (its final validation loss is the point), and a rerun trains nothing."""
    out = tmp_path / "s"
    argv = ["--steps", "10", "--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "2",
            "--batch-size", "2", "--seq-len", "32", "--log-every", "5", "--checkpoint-every", "10",
            "--eval-batches", "2", "--out", str(out), *TINY_TEXT, "--arms", "fp32+AdamW", "--sweep",
            "--lr", "fp32+AdamW=1e-3", "--max-points", "6", "--no-plot"]
    assert long_run.main(argv) == 0
    sweep = json.loads((out / "long_run_sweep.json").read_text())["sweeps"]["fp32+AdamW"]
    assert 5 <= len(sweep["points"]) <= 6
    for lr, loss in sweep["points"].items():  # each point is the last logged loss of its own long run
        log = [json.loads(x) for x in (long_run.sweep_dir(out, float(lr), 0) / "long_run" / "fp32+AdamW" /
                                       "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 10 and log[-1]["val_loss"] == loss
    assert f"{sweep['best_lr']:.3g}" == min(sweep["points"].items(), key=lambda kv: kv[1])[0]
    ckpts = {p: p.stat().st_mtime_ns for p in out.glob("long_run_sweep/*/long_run/*/checkpoints/*.pt")}
    capsys.readouterr()
    assert long_run.main(argv) == 0  # every point is on disk: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("long_run_sweep/*/long_run/*/checkpoints/*.pt")} == ckpts
    assert json.loads((out / "long_run_sweep.json").read_text())["sweeps"]["fp32+AdamW"]["points"] == sweep["points"]
    assert "--lr fp32+AdamW=" in capsys.readouterr().out
