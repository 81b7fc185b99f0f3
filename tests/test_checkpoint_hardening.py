"""Checkpoints as hostile input, and resumes that must repeat the run they continue (issue 17).

A checkpoint directory is whatever a stranger put there: its DCP ``.metadata`` may declare
entries that DCP would unpickle with ``weights_only=False``, point storage at files outside the
manifest, or carry RNG and scheduler states of the wrong shape. Each is refused with nothing
executed and nothing loaded. A resume compares every recipe field and run setting with the
checkpoint's and lists the differences, unless the caller accepts named ones.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lowprec
from lowprec import checkpoint as ckpt
from lowprec.checkpoint import CheckpointError, ResumeMismatch
from lowprec.distributed import make_optimizer
from lowprec.models import demo_llama
from lowprec.training import TrainConfig, train

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)
CFG = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=10, eval_batches=1)


def _fresh(recipe=None, opt: str = "AdamW", lr: float = 3e-3):
    model = demo_llama(**SMALL)
    rec = lowprec.recipes.resolve(recipe) if recipe is not None else None
    if rec is not None:
        lowprec.convert(model, rec)
    return model, make_optimizer(model, rec, opt, lr, **({} if opt == "AdamW" else {"compile": False}))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# a crafted DCP directory: code would run through DCP's bytes path
# ----------------------------------------------------------------------------------------------

# Builds a one-process DCP checkpoint, then rewrites it as an attacker would: one entry re-declared
# as BytesStorageMetadata whose payload is a pickle that creates MARKER when unpickled, and the
# manifest's sizes and digests updated to match (they are integrity checks, not a signature).
# Prints the loader's refusal per case; a marker file per case tells whether any code ran.
_CRAFT = textwrap.dedent('''
    import json, pickle, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    from lowprec import checkpoint as ckpt

    def case(out, marker, key, mode):
      torch.manual_seed(0)
      model = nn.Linear(4, 4)
      opt = torch.optim.AdamW(model.parameters())
      model(torch.randn(2, 4)).sum().backward()
      opt.step()
      ckpt.save(out, model, opt, step=1, format="dcp")

      class Payload:
          def __reduce__(self):
              return (open, (marker, "w"))

      md = ckpt.safe_load_dcp_metadata((out / ".metadata").read_bytes())
      if mode == "bytes":
          md.state_dict_metadata[key] = BytesStorageMetadata()
          for index in [i for i in md.storage_data if i.fqn == key]:
              del md.storage_data[index]
          (out / "evil.distcp").write_bytes(pickle.dumps(Payload()))
          md.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, (out / "evil.distcp").stat().st_size)
      elif mode == "traversal":
          for index, info in list(md.storage_data.items()):
              if index.fqn == key:
                  md.storage_data[index] = _StorageInfo("../outside.distcp", info.offset, info.length)
      (out / ".metadata").write_bytes(pickle.dumps(md))
      meta = json.loads((out / ckpt.META_NAME).read_text())
      for f in out.iterdir():
          if f.name != ckpt.META_NAME:
              meta["files"][f.name] = {"bytes": f.stat().st_size, "sha256": ckpt._file_digest(f)}
      (out / ckpt.META_NAME).write_text(json.dumps(meta))
      try:
          ckpt.load(out, model, opt)
          print(marker, "LOADED")
      except ckpt.CheckpointError as e:
          print(marker, "REFUSED", e)

    for job in sys.argv[1:]:
        out, marker, key, mode = job.split("|")
        case(Path(out), marker, key, mode)
''')


_CASES = {"bytes-rng": ("rng.0.torch", "bytes"), "bytes-model": ("model.weight", "bytes"),
          "bytes-optim": ("optim.weight/exp_avg", "bytes"), "traversal": ("model.weight", "traversal")}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, tuple[str, bool]]:
    """Each case of :data:`_CASES` crafted and loaded in one subprocess (a crash fails the test,
    not pytest): case -> (what the loader said, whether the payload's code ran)."""
    root = tmp_path_factory.mktemp("crafted")
    script = root / "craft.py"
    script.write_text(_CRAFT)
    jobs = [f"{root / name}|{root / (name + '.code_ran')}|{key}|{mode}" for name, (key, mode) in _CASES.items()]
    r = subprocess.run([sys.executable, str(script), *jobs], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    said = {Path(line.split(" ", 1)[0]).name: line.split(" ", 1)[1] for line in r.stdout.splitlines()}
    return {name: (said.get(name + ".code_ran", "(nothing)"), (root / (name + ".code_ran")).exists())
            for name in _CASES}


@pytest.mark.parametrize("case", ["bytes-rng", "bytes-model", "bytes-optim"])
def test_dcp_bytes_entry_is_refused_and_runs_nothing(crafted, case):
    out, code_ran = crafted[case]
    assert not code_ran, "the checkpoint's pickle payload was executed"
    assert out.startswith("REFUSED") and repr(_CASES[case][0]) in out and "BytesStorageMetadata" in out, out


def test_dcp_planner_refuses_bytes_even_without_the_entry_check(tmp_path):
    """The second lock alone: the load planner never unpickles a byte payload it is handed."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner_helpers import _create_read_item_for_byteio

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    item = _create_read_item_for_byteio(MetadataIndex("rng.0.torch"), 0, MetadataIndex("rng.0.torch"), 0, 0)
    with pytest.raises(CheckpointError, match="not a tensor"):
        ckpt._tensor_only_planner().load_bytes(item, io.BytesIO(pickle.dumps(Payload())))
    assert not marker.exists()


def test_dcp_storage_outside_the_manifest_is_refused(crafted):
    out, _ = crafted["traversal"]
    assert out.startswith("REFUSED") and "../outside.distcp" in out, out


def test_dcp_entry_outside_lowprec_namespaces_is_refused(tmp_path):
    model, o = _fresh()
    path = ckpt.save(tmp_path / "d", model, o, step=1, format="dcp")
    md = ckpt.safe_load_dcp_metadata((path / ".metadata").read_bytes())
    md.state_dict_metadata["evil"] = md.state_dict_metadata["model.lm_head.weight"]
    with pytest.raises(CheckpointError, match="'evil' outside"):
        ckpt._check_dcp_entries(path, md, json.loads((path / ckpt.META_NAME).read_text())["files"])


def test_dcp_state_of_another_dtype_is_refused_before_loading(tmp_path):
    model, o = _fresh()
    path = ckpt.save(tmp_path / "d", model, o, step=1, format="dcp")
    md = ckpt.safe_load_dcp_metadata((path / ".metadata").read_bytes())
    entry = md.state_dict_metadata["model.lm_head.weight"]
    entry.properties.dtype = torch.float16
    (path / ".metadata").write_bytes(pickle.dumps(md))
    meta = json.loads((path / ckpt.META_NAME).read_text())
    meta["files"][".metadata"] = {"bytes": (path / ".metadata").stat().st_size,
                                  "sha256": ckpt._file_digest(path / ".metadata")}
    (path / ckpt.META_NAME).write_text(json.dumps(meta))
    fresh, o2 = _fresh()
    before = _snapshot(fresh)
    with pytest.raises(CheckpointError, match="torch.float16"):
        ckpt.load(path, fresh, o2)
    assert _same(before, _snapshot(fresh)) and len(o2.state) == 0


# ----------------------------------------------------------------------------------------------
# states restored last are checked first: RNG, scheduler, hyperparameters
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved_file(tmp_path, corpus):
    model, o = _fresh()
    train(model, o, corpus, CFG, checkpoint_dir=tmp_path / "run", stop_after=2)
    return ckpt.latest(tmp_path / "run")


def _rewrite(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["digests"] = {k: ckpt._tensor_digest(t) for k, t in ckpt._walk_tensors(
        {"model": payload["model"], "optimizer": payload["optimizer"], "rng": payload["rng"]})}
    torch.save(payload, path)


@pytest.mark.parametrize("what,edit,match", [
    ("torch rng", lambda p: p["rng"].__setitem__("torch", p["rng"]["torch"][:100]), "RNG state 'torch'"),
    ("python rng", lambda p: p["rng"]["python"].__setitem__("state", torch.zeros(3, dtype=torch.int64)),
     "RNG state 'python/state'"),
    ("scheduler", lambda p: p["scheduler"].__setitem__("lr_lambdas", [{"__code__": 1}]),
     "LR scheduler state 'lr_lambdas/0'"),
    ("scheduler type", lambda p: p["scheduler"].__setitem__("last_epoch", "2"), "LR scheduler state 'last_epoch'"),
    ("lr", lambda p: p["optimizer"]["param_groups"][0].__setitem__("lr", "0.1"), "param_groups/0/lr"),
])
def test_tampered_rng_scheduler_and_hyperparameters_are_refused_before_loading(saved_file, what, edit, match):
    _rewrite(saved_file, edit)
    model, o = _fresh()
    sched = torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)
    before, rng_before = _snapshot(model), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=match):
        ckpt.load(saved_file, model, o, scheduler=sched)
    assert _same(before, _snapshot(model)) and len(o.state) == 0
    assert torch.equal(rng_before, torch.get_rng_state())


# ----------------------------------------------------------------------------------------------
# a resume repeats the run: recipe fields and settings compared one by one
# ----------------------------------------------------------------------------------------------


def _edited_unit_fp8(tmp_path: Path) -> Path:
    """A copy of the shipped unit-fp8 recipe, still named unit-fp8, with two fields changed."""
    text = lowprec.recipes._shipped_files()["unit-fp8"].read_text()
    data = lowprec.recipes.Recipe.from_name("unit-fp8").to_dict()
    assert data["cast"]["forward"] == "e4m3"
    edited = text.replace('forward = "e4m3"', 'forward = "e5m2"')
    assert edited != text, "the shipped unit-fp8 recipe no longer spells its forward format as expected"
    out = tmp_path / "unit-fp8.toml"
    out.write_text(edited)
    return out


@pytest.mark.slow
def test_resume_with_an_edited_recipe_of_the_same_name_is_refused(tmp_path, corpus):
    model, o = _fresh("unit-fp8")
    train(model, o, corpus, CFG, checkpoint_dir=tmp_path / "run", stop_after=2)
    edited = lowprec.recipes.Recipe.from_file(_edited_unit_fp8(tmp_path))
    assert edited.name == "unit-fp8"
    model, o = _fresh(edited)
    before = _snapshot(model)
    with pytest.raises(ResumeMismatch) as e:
        train(model, o, corpus, CFG, resume_from=tmp_path / "run")
    assert "recipe.cast.forward: 'e4m3' in the checkpoint, 'e5m2' now" in str(e.value)
    assert set(e.value.differences) == {"recipe.cast.forward"}
    assert _same(before, _snapshot(model)) and len(o.state) == 0


def test_resume_with_other_settings_lists_every_difference(saved_file, corpus):
    model, o = _fresh(lr=1e-3)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=10, eval_batches=1)
    with pytest.raises(ResumeMismatch) as e:
        train(model, o, corpus, cfg, resume_from=saved_file)
    assert set(e.value.differences) == {"steps", "optimizer.lr"}
    assert e.value.differences["steps"] == (4, 6)
    assert "steps: 4 in the checkpoint, 6 now" in str(e.value)


def test_resume_with_another_optimizer_is_refused(saved_file, corpus):
    model, o = _fresh(opt="AdamW4bit")
    with pytest.raises(ResumeMismatch, match="optimizer: 'AdamW' in the checkpoint, 'AdamW4bit' now"):
        train(model, o, corpus, CFG, resume_from=saved_file)


def test_allowed_changes_take_effect(saved_file, corpus):
    model, o = _fresh(lr=1e-3)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=10, eval_batches=1)
    with pytest.raises(CheckpointError, match="neither recipe fields nor run settings"):
        train(model, o, corpus, cfg, resume_from=saved_file, allow_changes=["step"])
    model, o = _fresh(lr=1e-3)
    seen = []
    result = train(model, o, corpus, cfg, resume_from=saved_file, allow_changes=["steps", "optimizer.lr"],
                   on_step=lambda step, loss: seen.append(o.param_groups[0]["lr"]))
    assert result.start_step == 2 and len(result.train_loss) == 4
    # this run's base rate and schedule, not the checkpoint's 3e-3: step 2 of 6 after 1 warm-up step
    from lowprec.training import lr_lambda

    f = lr_lambda(1, 6, "cosine")
    assert seen[0] == pytest.approx(1e-3 * f(3))


def test_cli_resume_with_other_steps_exits_2_naming_the_difference(tmp_path, capsys):
    from lowprec import cli

    common = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--eval-every", "10",
              "--no-progress", "--config", str(_tiny_config(tmp_path))]
    run = tmp_path / "run"
    assert cli.main(["train", "fp32", "--steps", "2", "--checkpoint-every", "1", "--out", str(run), *common]) == 0
    capsys.readouterr()
    assert cli.main(["train", "fp32", "--steps", "5", "--resume", str(run), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps: 2 in the checkpoint, 5 now" in err[0] and "Traceback" not in err[0]
    assert cli.main(["train", "fp32", "--steps", "3", "--resume", str(run), "--allow-change", "steps",
                     "--allow-change", "warmup_steps", *common]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["start_step"] == 2 and len(metrics["train_loss"]) == 1


def _tiny_config(tmp_path: Path) -> Path:
    cfg = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 64}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_refused_optimizer_state_leaves_the_model_untouched(tmp_path, fmt):
    """AdamW8bit and AdamWFp8 keep states of the same dtypes and shapes; only the recorded state
    format tells them apart. The optimizer's refusal comes before the model is loaded."""
    model, o = _fresh(opt="AdamW8bit")
    model(torch.randint(0, 256, (2, 16))).logits.sum().backward()
    o.step()
    path = ckpt.save(tmp_path / "c", model, o, step=1, format=fmt)
    other, o2 = _fresh(opt="AdamWFp8")
    before = _snapshot(other)
    with pytest.raises(CheckpointError, match="AdamWFp8"):
        ckpt.load(path, other, o2)
    assert _same(before, _snapshot(other)) and len(o2.state) == 0
