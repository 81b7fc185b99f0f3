"""``lowprec.export``: a converted model folded back into its original Hugging Face class.

Each case trains the converted model 3 AdamW steps at lr 1e-2 (so weights, gains and biases are
no longer at their init values) and checks that the export is an instance of the class
``convert`` received, built from plain modules with the original attention implementation, and
that its fp32 logits are within 1e-4 (max abs error over max abs logit) of the reference:

* ``unit`` and QAT plans: the converted model itself (QAT: the fake-quantized weights are exported);
* ``unit-fp8``: the converted model with its GEMM backends removed (``gemm = None``: the same
  unit-scaled forward in fp32 on the same master weights), i.e. "the casts turned off". The
  FP8 forward's own distance from the export is measured and bounded loosely.

Then: ``save_pretrained`` / ``from_pretrained`` with transformers alone (a subprocess that never
imports lowprec), a never-converted model (returned unchanged, warning), and unsupported input
named in the error.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lowprec
from lowprec import models
from lowprec.export import ExportError, export
from lowprec.scaling import UnitLinear
from lowprec.scaling.modules import UnitActivation, UnitOp

tf = pytest.importorskip("transformers")

SEQ = 128  # the small models' context length: export's default key length for the attention scale
BUILDERS = {"llama": lambda: models.demo_llama(num_hidden_layers=2), "gpt2": models.small_gpt2,
            "bert": models.small_bert}


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps at lr 1e-2 through the model's own (unit-scaled) labels= loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        ids = _ids(2, 64, seed=10 + i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@contextlib.contextmanager
def _casts_off(model: nn.Module):
    """The converted model with every GEMM backend removed (plain fp32 matmuls), restored after."""
    saved = [(m, m.gemm) for m in model.modules() if getattr(m, "gemm", None) is not None]
    for m, _ in saved:
        m.gemm = None
    try:
        yield model
    finally:
        for m, g in saved:
            m.gemm = g


def _assert_plain(exported: nn.Module, original_cls: type) -> None:
    assert type(exported) is original_cls
    assert exported.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, UnitOp) for m in exported.modules())
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in exported.modules())
    assert "forward" not in exported.__dict__  # no unit-scaled loss forward left


def _export_matching(model: nn.Module, ids: torch.Tensor, ref: torch.Tensor, what: str) -> nn.Module:
    """``export(model)``: a plain model of the original class whose logits on ``ids`` are ``ref``
    to 1e-4 relative (the figure is printed for the note)."""
    exported = export(model)
    _assert_plain(exported, type(model))
    err = _rel(_logits(exported, ids), ref)
    print(f"{what}: export vs reference {err:.2g}")
    assert err < 1e-4, f"{what}: export differs from the reference by {err:.2g} relative"
    return exported


@pytest.mark.parametrize("name", list(BUILDERS))
def test_unit_export_computes_the_same_function(name):
    model = BUILDERS[name]().eval()
    cls = type(model)
    _train(lowprec.convert(model, "unit"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    ref = _logits(model, ids)
    exported = export(model)
    _assert_plain(exported, cls)
    err = _rel(_logits(exported, ids), ref)
    print(f"{name} unit: export vs converted {err:.2g}")
    assert err < 1e-4, f"{name}: export differs from the converted model by {err:.2g} relative"
    # the converted model is untouched: same weights, still converted, same function
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.get_output_embeddings(), UnitLinear) and "forward" in model.__dict__
    assert torch.equal(_logits(model, ids), ref)
    # a plain load of the converted (N(0,1)) weights is a different function: folding matters
    naive = cls(model.config).eval()
    naive.load_state_dict(model.state_dict(), strict=False)
    assert _rel(_logits(naive, ids), ref) > 0.1


def test_seq_len_fixes_the_attention_scale():
    """Under init="unit" the attention output scale follows the key length: export at 32 matches
    the converted model on 32 tokens, not the default (128) export."""
    model = _train(lowprec.convert(BUILDERS["llama"]().eval(), "unit"))
    ids = _ids(2, 32)
    ref = _logits(model, ids)
    assert _rel(_logits(export(model, seq_len=32), ids), ref) < 1e-4
    assert _rel(_logits(export(model), ids), ref) > 1e-3
    assert export(model, seq_len=32).lowprec_export.seq_len == 32


@pytest.mark.parametrize("name", list(BUILDERS))
def test_unit_fp8_export_equals_the_model_with_its_casts_off(name):
    model = BUILDERS[name]().eval()
    _train(lowprec.convert(model, "unit-fp8"))
    assert any(getattr(m, "gemm", None) is not None for m in model.modules())
    ids = _ids()
    fp8 = _logits(model, ids)
    with _casts_off(model):
        ref = _logits(model, ids)
    exported = _export_matching(model, ids, ref, f"{name} unit-fp8 (casts off)")
    out = _logits(exported, ids)
    fp8_distance = _rel(fp8, out)
    print(f"{name}: FP8 forward vs export: {fp8_distance:.3g} relative (max abs / max |logit|)")
    assert 0 < fp8_distance < 0.2  # FP8 rounding, not a different function


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_qat_export_holds_the_quantized_weights(name):
    model = BUILDERS[name]().eval()
    layer = {"llama": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.c_fc"}[name]
    _train(lowprec.convert(model, "unit", plan={layer: 4}))
    ids = _ids()
    exported = _export_matching(model, ids, _logits(model, ids), f"{name} QAT")
    # QAT quantizes dim 0 of the stored weight (Conv1D stores (in, out)); folding scales it uniformly
    rows = exported.get_submodule(layer).weight.detach()
    # INT4 per row: each row is a multiple of one step, at most 2 * 7 + 1 = 15 levels
    assert all(len(torch.unique(r)) <= 15 for r in rows)
    step = rows.abs().amax(dim=1, keepdim=True) / 7
    assert torch.allclose(rows / step, (rows / step).round(), atol=1e-3)


FAMILY_CASES = ["qwen3", "gemma", "phi3", "olmo2", "granite"]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_families_export(name):
    from test_unit_families import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    _train(lowprec.convert(model, "unit"))
    ids = _ids()
    _export_matching(model, ids, _logits(model, ids), f"{name} unit")


LOAD_SCRIPT = """
import sys, torch, transformers
d = sys.argv[1]
saved = torch.load(d + "/expected.pt")
model = getattr(transformers, sys.argv[2]).from_pretrained(d).eval()
with torch.no_grad():
    out = model(input_ids=saved["ids"]).logits
err = float((out - saved["logits"]).abs().max() / saved["logits"].abs().max())
assert "lowprec" not in sys.modules, "lowprec was imported"
print("ERR", err, type(model).__name__)
"""


@pytest.mark.parametrize("name,auto", [("llama", "AutoModelForCausalLM"), ("gpt2", "AutoModelForCausalLM"),
                                       ("bert", "AutoModelForMaskedLM")])
def test_save_pretrained_round_trip_without_lowprec(name, auto, tmp_path):
    model = _train(lowprec.convert(BUILDERS[name]().eval(), "unit"))
    ids = _ids()
    ref = _logits(model, ids)
    exported = export(model)
    exported.save_pretrained(tmp_path)
    torch.save({"ids": ids, "logits": ref}, tmp_path / "expected.pt")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_SCRIPT), str(tmp_path), auto],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("ERR"))
    _, err, cls = line.split()
    assert cls == type(model).__name__
    print(f"{name} reloaded without lowprec: {float(err):.2g}")
    assert float(err) < 1e-4, f"{name}: reloaded export differs from the converted model by {err}"


def test_never_converted_model_is_returned_unchanged_with_a_warning():
    model = models.small_gpt2()
    with pytest.warns(UserWarning, match="not converted by lowprec.convert; returned unchanged"):
        assert export(model) is model


def test_a_model_that_is_not_hugging_face_is_refused_by_name():
    model = lowprec.convert(models.mlp(), "unit")
    with pytest.raises(ExportError, match="Sequential is not a Hugging Face model"):
        export(model)


def test_a_converted_part_without_a_folding_rule_is_named():
    model = lowprec.convert(BUILDERS["llama"]().eval(), "unit")
    model.model.layers[1].mlp.extra_act = UnitActivation("silu")  # a unit op export has no place for
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.extra_act is a UnitActivation"):
        export(model)


def test_cli_train_export_and_export_subcommand(tmp_path, capsys):
    """``lowprec train unit ... --export DIR`` and ``lowprec export RUN --out DIR2`` write the same
    standard checkpoint, which loads with transformers into the trained converted model's function
    at the run's sequence length (the attention scale is fixed there)."""
    import json

    from lowprec import cli

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "max_position_embeddings": 64}))
    data = tmp_path / "corpus.txt"
    data.write_bytes(open(__file__, "rb").read() * 3)
    run, plain_a, plain_b = tmp_path / "run", tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", "unit", "--config", str(cfg), "--data", str(data), "--steps", "3", "--batch-size", "2",
                     "--seq-len", "32", "--no-progress", "--checkpoint-every", "0", "--out", str(run),
                     "--export", str(plain_a)]) == 0
    assert cli.main(["export", str(run), "--out", str(plain_b)]) == 0
    assert "exported LlamaForCausalLM" in capsys.readouterr().out
    model = lowprec.convert(cli.load_model(str(cfg)), "unit")
    cli.load_checkpoint(run, model)
    ids = _ids(2, 32)
    ref = _logits(model.eval(), ids)
    for d in (plain_a, plain_b):
        loaded = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        assert type(loaded) is tf.LlamaForCausalLM
        assert _rel(_logits(loaded, ids), ref) < 1e-4
