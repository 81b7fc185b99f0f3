"""Issue 17, items 8 and 9: sensitivity scorers on layers the loss never reaches, and training
steps skipped for non-finite gradients made visible (TrainResult, metrics.json, the summary)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lowprec.sensitivity as S
from lowprec import cli
from lowprec import training as T
from lowprec.data import text_file_corpus
from lowprec.models import demo_llama

pytestmark = pytest.mark.usefixtures("eager_quantized_adamw")

TINY_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}

# ----------------------------------------------------------------------------------------------
# item 8: a layer the loss never reaches scores 0 with every method
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    """A tiny Hugging Face BertModel (no download) and a loss on ``last_hidden_state`` only, so the
    pooler never reaches the loss."""
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = tf.BertModel(cfg)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, [ids]


def hidden_loss(model, batch):
    """Cross-entropy of the hidden states read as logits (hidden size 16) against the ids mod 16."""
    h = model(input_ids=batch).last_hidden_state
    return torch.nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]), batch.reshape(-1) % h.shape[-1])


SCORERS = {
    "measured": dict(method="measured"),
    "pqi": dict(method="pqi"),
    "hawq": dict(method="hawq"),
    "hawq-hutch++": dict(method="hawq", trace="hutch++", hutchpp_matvecs=6, eigenvalue=True),
}


def test_every_scorer_gives_zero_for_an_unreached_layer(bert):
    model, batches = bert
    layers = ["pooler.dense", "encoder.layer.0.output.dense"]
    for name, kwargs in SCORERS.items():
        rep = S.score(model, hidden_loss, batches, bits=(2, 4), layers=layers, progress=False,
                      min_probes=2, max_probes=4, **kwargs)
        assert rep.scores["pooler.dense"] == {2: 0.0, 4: 0.0}, name
        assert all(rep.scores["encoder.layer.0.output.dense"][b] != 0 for b in (2, 4)), name  # a reached layer
        if kwargs["method"] == "hawq":  # zero Hessian: trace (and top eigenvalue) exactly 0
            assert rep.extra["pooler.dense"]["trace"] == 0.0, name
            assert rep.extra["pooler.dense"].get("top_eigenvalue", 0.0) == 0.0, name


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_hvp_and_elementwise_pqi_of_unreached_layer_are_zero(bert, backend):
    model, batches = bert
    w = model.pooler.dense.weight
    hv = S.hvp(model, hidden_loss, batches[0], {"pooler.dense.weight": torch.ones_like(w)}, backend=backend)
    assert hv["pooler.dense.weight"].shape == w.shape and not hv["pooler.dense.weight"].any()
    elem = S.pqi_elementwise(model, hidden_loss, batches, 4, layers=["pooler.dense"])
    assert elem["pooler.dense"].shape == w.shape and not elem["pooler.dense"].any()


# ----------------------------------------------------------------------------------------------
# item 9: a non-finite gradient skips the step, visibly, and leaves the weights as they were
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(Path(__file__).read_bytes() * 3)
    return text_file_corpus(path)


def _nan_gradient_at(param: torch.Tensor, backward_index: int) -> None:
    """Make ``param``'s gradient NaN in the ``backward_index``-th backward pass (0-based) only."""
    calls = {"n": 0}

    def hook(g: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(g, math.nan) if calls["n"] == backward_index + 1 else g

    param.register_hook(hook)


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=1e-3)
    from lowprec.optim import AdamW4bit

    return AdamW4bit(groups, lr=1e-3, min_quant_size=0)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("opt_name", ["AdamW", "AdamW4bit"])
def test_nan_gradient_skips_the_whole_step_bit_exactly(small_corpus, opt_name):
    model = demo_llama(0, **TINY_LLAMA, attn_implementation="eager")
    # One weight of the LAST group only: clipping first would have spread it to every group.
    _nan_gradient_at(model.model.norm.weight, backward_index=1)
    opt = _optimizer(opt_name, model)
    after: dict[int, dict[str, torch.Tensor]] = {}
    lrs: list[float] = []

    def on_step(step: int, loss: float) -> None:
        after[step] = _snapshot(model)
        lrs.append(opt.param_groups[0]["lr"])

    config = T.TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=2, eval_every=4, eval_batches=1)
    result = T.train(model, opt, small_corpus, config, on_step=on_step)

    assert result.skipped_steps == [1]
    assert result.nonfinite_grads == [0, 1, 0, 0]
    assert result.diverged_at is None and all(math.isfinite(v) for v in result.train_loss)
    assert len(result.grad_norm) == 4 and math.isnan(result.grad_norm[1])
    for name, w in after[1].items():
        assert torch.equal(w, after[0][name]), name  # the skipped step left every weight bit-exact
    assert all(not torch.equal(after[2][n], after[1][n]) for n in ("model.norm.weight", "lm_head.weight"))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # The LR schedule still advanced on the skipped step: warm-up 1/2 -> 2/2, then cosine.
    sched = T.lr_lambda(2, 4, config.schedule)
    assert lrs == pytest.approx([1e-3 * sched(s + 1) for s in range(4)])
    d = result.to_dict()
    assert d["skipped_steps"] == [1] and d["nonfinite_grads"] == [0, 1, 0, 0] and d["nonfinite_inputs"] == 0


def test_cli_train_reports_skipped_steps_and_fp8_nonfinite_inputs(tmp_path, small_corpus, monkeypatch, capsys):
    """Through ``lowprec train`` with an FP8 recipe: a NaN loss gradient at step 1 (the loss value
    stays finite) reaches the FP8 GEMMs as a non-finite output gradient and every weight."""
    calls = {"n": 0}
    real_loss = T.lm_loss

    def loss_with_nan_gradient_at_step_1(model, x, y):
        loss = real_loss(model, x, y)
        calls["n"] += 1
        if calls["n"] == 2:
            loss.register_hook(lambda g: torch.full_like(g, math.nan))
        return loss

    monkeypatch.setattr(T, "lm_loss", loss_with_nan_gradient_at_step_1)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", **TINY_LLAMA}))
    data = tmp_path / "corpus.txt"
    data.write_bytes(Path(__file__).read_bytes() * 3)
    out = tmp_path / "run"
    rc = cli.main(["train", "fp8", "--optimizer", "AdamW4bit", "--config", str(config), "--data", str(data),
                   "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
                   "--eval-every", "3", "--checkpoint-every", "0", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped_steps"] == [1] and m["nonfinite_grads"][1] > 0 and m["nonfinite_grads"][::2] == [0, 0]
    assert m["nonfinite_inputs"] > 0  # the FP8 GEMMs saw the NaN output gradient
    assert "skipped steps 1 (non-finite gradients at step 1)" in printed
    assert f"FP8 non-finite inputs {m['nonfinite_inputs']}" in printed
    model = cli.load_model(str(config), seed=0)
    model, _ = _converted(model)
    assert cli.load_checkpoint(out, model) == 3
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _converted(model):
    from lowprec.recipes import convert, resolve

    return convert(model, resolve("fp8"), report=True)


def test_progress_bar_shows_skipped_steps(small_corpus, monkeypatch):
    model = demo_llama(0, **TINY_LLAMA, attn_implementation="eager")
    _nan_gradient_at(model.lm_head.weight, backward_index=0)
    postfixes: list[dict] = []
    import tqdm

    real = tqdm.std.tqdm.set_postfix

    def record(self, ordered_dict=None, refresh=True, **kwargs):
        postfixes.append(dict(kwargs))
        return real(self, ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "set_postfix", record)
    config = T.TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2, eval_batches=1)
    T.train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), small_corpus, config, progress=True)
    assert postfixes and postfixes[-1] == {"skipped": 1, "nonfinite_inputs": 0}
