"""A small, deterministic language-model training loop shared by benchmarks, the demo and the CLI.

Same seed, same data order and same step count for every side-by-side comparison
(design.md, "The shared test bed"): batches come from :func:`lowprec.data.batch_at`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.data import TextCorpus, batch_at, eval_batches


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits from a Hugging Face causal LM (``.logits``) or a module that returns a tensor."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. A unit-scaled model uses the unit-scaled cross-entropy,
    whose forward value is the same mean but whose logit gradient is unit (no loss scaling)."""
    logits = logits_of(model, inputs).float()
    recipe = getattr(model, "lowprec_recipe", None)
    if recipe is not None and recipe.unit_scaling.enabled:
        from lowprec.scaling.functional import cross_entropy as unit_cross_entropy

        return unit_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation cross-entropy (nats per byte) over fixed batches."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        logits = logits_of(model, x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    return total / max(n, 1)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak (or constant)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    warmup_steps: int = 20
    schedule: str = "cosine"
    eval_every: int = 50
    eval_batches: int = 8
    grad_clip: float | None = 1.0


@dataclass
class TrainResult:
    train_loss: list[float] = field(default_factory=list)  # one per step
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    step_time_s: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1][1] if self.val_loss else float("nan")

    @property
    def median_step_time_s(self) -> float:
        t = sorted(self.step_time_s[3:] or self.step_time_s)
        return t[len(t) // 2] if t else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(train_loss=self.train_loss, val_loss=self.val_loss, step_time_s=self.step_time_s,
                    diverged_at=self.diverged_at, final_val_loss=self.final_val_loss,
                    median_step_time_s=self.median_step_time_s)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: TextCorpus,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = False,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on ``corpus`` and return the curves.

    Stops early (recording ``diverged_at``) when the training loss is not finite.
    """
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.steps, config.schedule))
    val = eval_batches(corpus.val, config.eval_batches, config.batch_size, config.seq_len)
    result = TrainResult()
    steps: Iterable[int] = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    model.train()
    for step in steps:
        x, y = batch_at(corpus.train, step, config.batch_size, config.seq_len, config.seed)
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        result.step_time_s.append(time.perf_counter() - t0)
        value = loss.item()
        result.train_loss.append(value)
        if on_step is not None:
            on_step(step, value)
        if not math.isfinite(value):
            result.diverged_at = step
            break
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            result.val_loss.append((step + 1, evaluate(model, val)))
    return result
