"""Checkpoints: exact resume, quantized states saved as they are, atomic writes, and clear errors
for truncated, corrupted or mismatched checkpoints (never a partial load)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import lowprec
from lowprec import checkpoint as ckpt
from lowprec.checkpoint import CheckpointError
from lowprec.distributed import make_optimizer
from lowprec.models import demo_llama
from lowprec.training import TrainConfig, train

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)


CFG = TrainConfig(steps=6, batch_size=8, seq_len=32, warmup_steps=2, eval_every=3, eval_batches=1)


def _have_optimizer(name: str) -> bool:
    import lowprec.optim as lo

    return name == "AdamW" or hasattr(lo, name)


def _fresh(recipe: str | None = None, opt: str = "AdamW", lr: float = 3e-3):
    model = demo_llama(**SMALL)
    rec = lowprec.recipes.resolve(recipe) if recipe else None
    if rec is not None:
        lowprec.convert(model, rec)
    return model, make_optimizer(model, rec, opt, lr, **({} if opt == "AdamW" else {"compile": False}))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


COMBOS = [
    ("fp32", "AdamW"),
    ("fp8-delayed", "AdamW"),  # amax histories live in module buffers
    ("unit-fp8", "AdamW4bit"),
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,opt", COMBOS, ids=[f"{r}+{o}" for r, o in COMBOS])
def test_stop_and_resume_is_bit_identical(recipe, opt, corpus, tmp_path):
    if recipe not in lowprec.recipes.available():
        pytest.skip(f"recipe {recipe!r} has not landed")
    if not _have_optimizer(opt):
        pytest.skip(f"optimizer {opt!r} has not landed")
    model, o = _fresh(recipe, opt)
    full = train(model, o, corpus, CFG)

    model, o = _fresh(recipe, opt)
    first = train(model, o, corpus, CFG, checkpoint_dir=tmp_path, stop_after=3)
    path = ckpt.latest(tmp_path)
    assert path is not None and path.name == "step-0000003.pt"
    # the file holds the optimizer state exactly as the optimizer keeps it (quantized codes stay codes)
    saved = ckpt.read_file(path)
    names = {id(p): n for n, p in model.named_parameters()}
    n_quantized = 0
    for p, st in o.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                s = saved["optimizer"]["state"][names[id(p)]][k]
                assert s.dtype == v.dtype and torch.equal(s, v), (names[id(p)], k)
                n_quantized += v.dtype == torch.uint8
    if opt == "AdamW4bit":
        assert n_quantized > 0, "AdamW4bit kept no uint8 states"
    assert _same(saved["model"], model.state_dict())  # buffers (FP8 amax histories) included

    model, o = _fresh(recipe, opt)
    second = train(model, o, corpus, CFG, resume_from=tmp_path)
    assert second.start_step == 3
    assert first.train_loss + second.train_loss == full.train_loss  # bit-identical
    assert second.val_loss[-1] == full.val_loss[-1]


def test_dcp_format_in_one_process_resumes_exactly(corpus, tmp_path):
    model, o = _fresh()
    full = train(model, o, corpus, CFG)
    model, o = _fresh()
    first = train(model, o, corpus, CFG, checkpoint_dir=tmp_path, stop_after=3, checkpoint_format="dcp")
    assert (ckpt.latest(tmp_path) / ckpt.META_NAME).is_file()
    model, o = _fresh()
    second = train(model, o, corpus, CFG, resume_from=tmp_path)
    assert first.train_loss + second.train_loss == full.train_loss


@pytest.fixture
def saved(tmp_path, corpus):
    model, o = _fresh()
    train(model, o, corpus, TrainConfig(steps=2, batch_size=8, seq_len=32, warmup_steps=1, eval_every=10,
                                        eval_batches=1), checkpoint_dir=tmp_path / "run")
    return ckpt.latest(tmp_path / "run"), model, o


def _assert_untouched_after_error(path, match):
    model, o = _fresh()
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=match) as e:
        ckpt.load(path, model, o)
    assert str(path) in str(e.value)
    assert _same(before, _snapshot(model)) and len(o.state) == 0  # nothing half-loaded
    return e.value


def test_truncated_file_is_named_and_nothing_loads(saved):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _assert_untouched_after_error(path, "truncated")


def test_corrupted_tensor_is_caught(saved):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    i = len(data) // 2  # the middle of the file is tensor data
    data[i : i + 4] = bytes(b ^ 0xFF for b in data[i : i + 4])
    path.write_bytes(bytes(data))
    _assert_untouched_after_error(path, "corrupted")


def test_missing_entries_are_named(saved, tmp_path):
    path, _, _ = saved
    payload = torch.load(path, weights_only=True)
    del payload["model"]["lm_head.weight"]
    torch.save(payload, tmp_path / "a.pt")
    err = _assert_untouched_after_error(tmp_path / "a.pt", "missing")
    assert "model/lm_head.weight" in str(err)
    del payload["rng"]
    torch.save(payload, tmp_path / "b.pt")
    err = _assert_untouched_after_error(tmp_path / "b.pt", "missing")
    assert "'rng'" in str(err)


def test_wrong_model_or_recipe_is_refused(saved):
    path, _, _ = saved
    other = demo_llama(**{**SMALL, "intermediate_size": 96})
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.load(path, other)
    if "fp32" in lowprec.recipes.available():
        model = lowprec.convert(demo_llama(**SMALL), "fp32")
        with pytest.raises(CheckpointError, match="recipe"):
            ckpt.load(path, model)


def test_resume_with_other_data_order_is_refused(saved, corpus):
    path, _, _ = saved
    model, o = _fresh()
    cfg = TrainConfig(steps=4, batch_size=8, seq_len=32, seed=1, warmup_steps=1, eval_every=10, eval_batches=1)
    with pytest.raises(ValueError, match="seed"):
        train(model, o, corpus, cfg, resume_from=path)


def test_crash_while_saving_leaves_previous_checkpoint(saved, monkeypatch):
    path, model, o = saved
    before = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated crash)")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(path, model, o, step=3)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", path.name]  # no temp file left
    assert ckpt.load(path, *_fresh())["step"] == 2


def test_run_directory_keeps_latest(tmp_path):
    model, o = _fresh()
    for step in (1, 2, 3):
        ckpt.save_to_run(tmp_path, model, o, step=step, keep_last=2)
    assert ckpt.latest(tmp_path).name == "step-0000003.pt"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002.pt", "step-0000003.pt"]


def test_dcp_directory_errors(tmp_path):
    model, o = _fresh()
    path = ckpt.save(tmp_path / "d", model, o, step=1, format="dcp")
    meta = json.loads((path / ckpt.META_NAME).read_text())
    data_file = next(n for n in meta["files"] if n.endswith(".distcp"))
    good = (path / data_file).read_bytes()

    (path / data_file).write_bytes(good[:-100])
    _assert_untouched_after_error(path, "truncated")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    (path / data_file).write_bytes(bytes(flipped))
    err = _assert_untouched_after_error(path, "corrupted")
    assert data_file in str(err)
    (path / data_file).write_bytes(good)
    assert ckpt.load(path, *_fresh())["step"] == 1

    # DCP's .metadata is a pickle: ours is read by an allow-list unpickler, so a checkpoint that
    # smuggles a callable in is refused even when its manifest was rewritten to match
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    meta["files"][".metadata"] = {"bytes": (path / ".metadata").stat().st_size,
                                  "sha256": ckpt._file_digest(path / ".metadata")}
    (path / ckpt.META_NAME).write_text(json.dumps(meta))
    _assert_untouched_after_error(path, "may not hold")

    (path / ckpt.META_NAME).unlink()
    _assert_untouched_after_error(path, "did not complete")
