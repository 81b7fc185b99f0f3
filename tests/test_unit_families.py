"""Unit scaling for any transformer built from known parts (issue 18): one description-driven
conversion, checked per family on tiny configs (2 layers, hidden 64, 4 heads, GQA with 2 KV heads
where the family has it, vocab 256).

For each family: ``init="keep"`` reproduces the logits (fp32) with >= 90% of linears converted;
``init="unit"`` has every op output std in [0.5, 2] and >= 80% of activation gradients there at
init; ``unit-fp8`` trains (slow). Then: the keep-mode probe refuses a broken rule, naming the
module, and leaves the model untouched; parts without a rule are named in the report.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowprec
from lowprec.inspect import inspect
from lowprec.recipes import Recipe, RecipeError
from lowprec.scaling import UnitLinear, param_groups
from lowprec.scaling.verify import UnitScalingMismatch

tf = pytest.importorskip("transformers")

KEEP = Recipe.from_dict({"unit_scaling": {"enabled": True, "init": "keep"}}, source="<test>")
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def _causal(cls: str, **overrides):
    def build():
        cfg = getattr(tf, f"{cls}Config")(**{**TINY, **overrides})
        return getattr(tf, f"{cls}ForCausalLM")(cfg)
    return build


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128))


def _bert():
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=128))


FAMILIES = {
    "llama": _causal("Llama"),
    "qwen2": _causal("Qwen2"),
    "qwen3": _causal("Qwen3"),  # q/k RMSNorm per head
    "mistral": _causal("Mistral", sliding_window=16),
    "gemma": _causal("Gemma"),  # GeGLU (tanh), (1 + w) RMSNorm, embedding x sqrt(hidden), tied embeddings
    "phi3": _causal("Phi3"),  # fused qkv and gate_up
    "gpt2": _gpt2,  # Conv1D, fused c_attn, learned positions, LayerNorm with bias, tied embeddings
    "bert": _bert,  # post-norm encoder, three summed embedding tables, MLM transform before the readout
    # not named anywhere in lowprec: built from the same parts
    "olmo2": _causal("Olmo2"),  # norms after each branch, q/k norm over all heads
    "granite": _causal("Granite", embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078,
                       logits_scaling=8.0),  # multipliers in the model's own forward
    "stablelm": _causal("StableLm"),  # LayerNorm with bias, partial rotary
}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name]().eval()


def _ids(shape=(2, 32), seed=1) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _linears(model) -> tuple[int, int]:
    """(converted, all) linear layers, Conv1D included."""
    kinds = [m for m in model.modules()
             if isinstance(m, (nn.Linear, UnitLinear)) or type(m).__name__ == "Conv1D"]
    return sum(isinstance(m, UnitLinear) for m in kinds), len(kinds)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_keep_mode_reproduces_the_logits(name):
    ids = _ids()
    ref = _logits(_build(name), ids)
    model, report = lowprec.convert(_build(name), KEEP, report=True)
    converted, total = _linears(model)
    assert converted >= 0.9 * total, report
    got = _logits(model, ids)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert report.unit_scaling_check.startswith("same function")
    assert not [n for n, why in report.skipped.items() if "left as it is" in why]


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_keep_mode_generates_the_same_tokens_through_the_kv_cache(name):
    ids = _ids((1, 8))
    ref = _build(name).generate(ids, max_new_tokens=8, do_sample=False)
    got = lowprec.convert(_build(name), KEEP).generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unit_mode_is_unit_at_init(name):
    ids = _ids(seed=2)
    model = lowprec.convert(_build(name), "unit")
    rep = inspect(model, (ids[:, :-1], ids[:, 1:]), formats=())
    assert len(rep.where("output")) >= 20
    # Granite divides the logits by its config's logits_scaling after the readout: the readout
    # op carries that factor so that the logits the model returns are unit
    divisor = getattr(model.config, "logits_scaling", 1.0)
    outside = [(r["name"], r["std"]) for r in rep.outside("output", 0.5, 2.0)
               if not (r["name"] == "lm_head" and 0.5 <= r["std"] / divisor <= 2.0)]
    assert outside == []
    assert rep.fraction_within("input_grad", 0.5, 2.0) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_unit_fp8_trains(name, corpus):
    from lowprec.training import TrainConfig, train

    model = lowprec.convert(_build(name).train(), "unit-fp8")
    opt = torch.optim.AdamW(param_groups(model, 0.3), lr=0.3, betas=(0.9, 0.95))
    res = train(model, opt, corpus, TrainConfig(steps=100, batch_size=4, seq_len=32, warmup_steps=10,
                                                eval_every=100, eval_batches=1))
    assert res.diverged_at is None
    start, end = sum(res.train_loss[:5]) / 5, sum(res.train_loss[-10:]) / 10
    assert end < start - 1.0, (start, end)


def test_probe_refuses_a_broken_rule_and_leaves_the_model_untouched(monkeypatch):
    from lowprec.scaling import convert as C

    model = _build("qwen3")
    ids = _ids()
    ref = _logits(model, ids)
    before = {n: (type(m), dict(m.__dict__)) for n, m in model.named_modules()}
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    real_sdpa = C._sdpa
    calls = []

    def off_by_two(*args, **kw):  # the second attention's logit scale doubled
        sdpa = real_sdpa(*args, **kw)
        calls.append(sdpa)
        if len(calls) == 2:
            sdpa.logit_scale *= 2.0
        return sdpa

    monkeypatch.setattr(C, "_sdpa", off_by_two)
    with pytest.raises(UnitScalingMismatch, match=r"model\.layers\.1\.self_attn") as e:
        lowprec.convert(model, KEEP)
    assert isinstance(e.value, RecipeError) and e.value.module.startswith("model.layers.1.self_attn")
    assert "verify = false" in str(e.value)
    # rolled back: same classes, attributes, Parameter objects and values; same function
    assert {n: type(m) for n, m in model.named_modules()} == {n: t for n, (t, _) in before.items()}
    assert all(model.get_submodule(n).__dict__.keys() == d.keys() for n, (_, d) in before.items())
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1])
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)
    assert not hasattr(model, "lowprec_recipe")

    # the check can be switched off: the broken rule then goes through
    calls.clear()
    off = Recipe.from_dict({"unit_scaling": {"enabled": True, "init": "keep", "verify": False}}, source="<test>")
    model, report = lowprec.convert(_build("qwen3"), off, report=True)
    assert "not checked" in report.unit_scaling_check
    assert float((_logits(model, ids) - ref).abs().max() / ref.abs().max()) > 1e-3


def test_verify_field_is_checked():
    with pytest.raises(RecipeError, match=r"unit_scaling\.verify' must be a boolean"):
        Recipe.from_dict({"unit_scaling": {"enabled": True, "verify": "yes"}}, source="<test>")


@pytest.mark.parametrize("cls,part", [("GPTNeoX", "parallel residual"), ("Cohere", "no known norm layout")])
def test_a_part_without_a_rule_is_named_and_the_model_left_working(cls, part):
    model = _causal(cls)().eval()
    ids = _ids()
    ref = _logits(model, ids)
    model, report = lowprec.convert(model, KEEP, report=True)
    assert any(part in why for why in report.skipped.values()), report
    assert any("layers.0" in why for why in report.skipped.values())
    torch.testing.assert_close(_logits(model, ids), ref)


def test_the_rest_of_a_model_still_converts_around_an_unknown_stack():
    stack = _causal("GPTNeoX")()
    net = nn.ModuleDict({"lm": stack, "probe_head": nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))})
    _, report = lowprec.convert(net, KEEP, report=True)
    assert "probe_head.0" in report.converted and "probe_head.2" in report.converted
    assert any("parallel residual" in why for why in report.skipped.values())
