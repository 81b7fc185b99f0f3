"""Hugging Face's Trainer with a converted model and a lowprec optimizer (issue 16): it trains,
saves, resumes, and the gradients at the first step are unit-scaled when the recipe is."""

from __future__ import annotations

import pytest
import torch

import lowprec
from lowprec.models import demo_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer's own requirement

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


class _Bytes(torch.utils.data.Dataset):
    """Fixed random byte sequences: each item is a causal-LM example with ``labels = input_ids``."""

    def __init__(self, n: int = 32, seq: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(model, out, steps: int):
    opt = lowprec.optim.AdamW4bit(model.parameters(), lr=1e-3, min_quant_size=1024, compile=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                          save_steps=2, save_strategy="steps", logging_steps=1, report_to=[],
                                          use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_Bytes(), optimizers=(opt, sched))


def test_trainer_trains_saves_and_resumes_a_unit_fp8_model_with_adamw4bit(tmp_path):
    torch.manual_seed(0)
    model = lowprec.convert(demo_llama(**SMALL), "unit-fp8")
    grads: list[float] = []

    def on_output(module, inputs, output) -> None:
        if len(grads) < 64:
            output.register_hook(lambda g: grads.append(g.std().item()))

    hooks = [m.register_forward_hook(on_output) for m in model.modules() if type(m).__name__ == "UnitLinear"]
    trainer = _trainer(model, tmp_path, steps=4)
    result = trainer.train()
    for h in hooks:
        h.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 4
    first_step = grads[: len(grads) // 4] or grads
    assert sum(0.5 <= s <= 2.0 for s in first_step) / len(first_step) >= 0.8, first_step
    state = trainer.optimizer.state_dict()["state"]
    assert any(v.dtype == torch.uint8 for st in state.values() for v in st.values() if torch.is_tensor(v))

    # resume from the step-2 checkpoint in a fresh process-like setup: the optimizer's quantized
    # states load through Trainer's torch.load and lowprec's checked load_state_dict
    torch.manual_seed(0)
    fresh = lowprec.convert(demo_llama(**SMALL), "unit-fp8")
    resumed = _trainer(fresh, tmp_path, steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    again = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert again[-2:] == pytest.approx(losses[-2:], rel=1e-5)
