"""The unit-scaled loss through a Hugging Face model's own forward (issue 16).

``model(x, labels=y).loss`` is how HF users and HF's Trainer compute the loss. After a unit-scaling
conversion it must report HF's value (the mean over non-ignored tokens) and carry the unit-scaled
gradient, so activation gradients stay near 1 as with ``lowprec.training.lm_loss``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lowprec
from lowprec.models import demo_llama, small_bert, small_gpt2

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


def _output_grad_stds(model, kind: type | str, *args, **kwargs) -> list[float]:
    """The std of the gradient reaching the output of every module of ``kind`` (a class, or a
    class name), after ``model(*args, **kwargs).loss.backward()``."""
    stds: list[float] = []

    def on_output(module, inputs, output) -> None:
        output.register_hook(lambda g: stds.append(g.std().item()))

    hooks = [m.register_forward_hook(on_output) for m in model.modules()
             if (type(m).__name__ == kind if isinstance(kind, str) else isinstance(m, kind))]
    try:
        model(*args, **kwargs).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return stds


@pytest.mark.parametrize("build,seq", [(lambda: demo_llama(seed=0), 128), (small_gpt2, 32)], ids=["llama", "gpt2"])
def test_labels_loss_of_a_unit_model_has_unit_gradients(build, seq):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, seq))
    model = lowprec.convert(build(), "unit")
    stds = _output_grad_stds(model, "UnitLinear", x, labels=x)
    assert len(stds) >= 8
    assert sum(0.5 <= s <= 2.0 for s in stds) / len(stds) >= 0.8, sorted(stds)
    # HF's own mean loss on the unconverted model: the gradients it gives are far from unit
    plain_stds = _output_grad_stds(build(), torch.nn.Linear, x, labels=x)
    assert plain_stds and max(plain_stds) < 0.1


def test_labels_loss_value_is_hf_mean_with_ignore_index():
    torch.manual_seed(0)
    model = lowprec.convert(demo_llama(**SMALL), "unit")
    x = torch.randint(0, 256, (3, 24))
    labels = x.clone()
    labels[:, :7] = -100  # a prompt that gets no loss
    labels[2, -5:] = -100  # padding
    out = model(x, labels=labels)
    logits = out.logits.detach().float()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    # the gradient of ignored positions' logits is exactly zero
    out = model(x, labels=labels)
    out.logits.retain_grad()
    out.loss.backward()
    g = out.logits.grad
    assert torch.count_nonzero(g[:, :6]) == 0 and torch.count_nonzero(g[2, -6:]) == 0
    assert torch.count_nonzero(g[0, 6:-1]) > 0
    # Trainer's gradient accumulation passes num_items_in_batch: the value is the sum over it
    n = int((labels[:, 1:] != -100).sum())
    out2 = model(x, labels=labels, num_items_in_batch=torch.tensor(2 * n))
    assert out2.loss.item() == pytest.approx(want.item() / 2, rel=1e-6)


def test_masked_lm_labels_loss():
    torch.manual_seed(0)
    model = lowprec.convert(small_bert(), "unit")
    x = torch.randint(5, 256, (2, 16))
    labels = torch.full_like(x, -100)
    labels[:, 3] = x[:, 3]
    labels[:, 9] = x[:, 9]
    out = model(x, labels=labels)
    want = F.cross_entropy(out.logits.detach().reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    stds = _output_grad_stds(model, "UnitLinear", x, labels=labels)
    assert stds and all(s > 0 for s in stds)


def test_tuple_outputs_copies_and_models_left_alone():
    torch.manual_seed(0)
    model = lowprec.convert(demo_llama(**SMALL), "unit")
    x = torch.randint(0, 256, (2, 16))
    as_tuple = model(x, labels=x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(x, labels=x).loss)
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin  # the copy computes with its own weights
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    assert not torch.equal(twin(x).logits, model(x).logits)
    # without unit scaling the model's loss stays HF's
    fp8 = lowprec.convert(demo_llama(**SMALL), "fp8")
    assert "forward" not in vars(fp8)
