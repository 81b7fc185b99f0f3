"""A small, deterministic language-model training loop shared by benchmarks, the demo and the CLI.

Same seed, same data order and same step count for every side-by-side comparison
(design.md, "The shared test bed"): batches come from :func:`lowprec.data.batch_at`.

The loop is resumable and distributed-aware (issue 8):

* ``train(..., checkpoint_dir=DIR)`` saves a checkpoint (:mod:`lowprec.checkpoint`) every
  ``checkpoint_every`` steps and at the last step it runs; ``resume_from=PATH_OR_DIR`` continues
  from one, so a run stopped at step 10 (``stop_after=10``) and resumed to 20 gives the losses of
  the uninterrupted run. The step is the data position: batches depend only on ``(seed, step)``.
* Under ``torch.distributed`` (DDP or FSDP2, see :mod:`lowprec.distributed`) each rank trains on
  its slice of the same global batch, and the logged loss and the validation loss are averaged
  over ranks, so the numbers mean what they mean in one process.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.data import TextCorpus, batch_at, eval_batches


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a ``DistributedDataParallel`` wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits from a Hugging Face causal LM (``.logits``) or a module that returns a tensor."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. A unit-scaled model uses the unit-scaled cross-entropy,
    whose forward value is the same mean but whose logit gradient is unit (no loss scaling)."""
    logits = logits_of(model, inputs).float()
    recipe = getattr(unwrap(model), "lowprec_recipe", None)
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if recipe is not None and recipe.unit_scaling.enabled:
        from lowprec.hf_loss import unit_scaled_loss

        return unit_scaled_loss(flat, tgt)
    return F.cross_entropy(flat, tgt)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation cross-entropy (nats per byte) over fixed batches.

    Under ``torch.distributed`` every rank must call it with the same batches: each rank
    evaluates its slice of every batch (when the batch divides by the world size) and the sums
    are all-reduced, so all ranks return the one-process value (up to summation order)."""
    rank, world = _world()
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        if world > 1 and x.shape[0] % world == 0:
            per = x.shape[0] // world
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        elif world > 1:  # cannot split evenly: every rank evaluates the whole batch, counted once
            x, y = (x, y) if rank == 0 else (x, y[:0])
        logits = logits_of(model, x).float()
        if y.numel():
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([total, float(n)], dtype=torch.float64)
        dist.all_reduce(t)
        total, n = t[0].item(), int(t[1].item())
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


# TrainConfig fields that only decide what is measured, not what is trained: free to change on resume
_MEASUREMENT_ONLY = ("eval_every", "eval_batches")


def run_settings(config: TrainConfig, optimizer: torch.optim.Optimizer,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must repeat to continue the same run: the ``config`` fields that shape
    training, the optimizer's class and its constructor hyperparameters, and ``extra``."""
    out: dict[str, Any] = {k: v for k, v in vars(config).items() if k not in _MEASUREMENT_ONLY}
    out["optimizer"] = type(optimizer).__name__
    for k in ("lr", "betas", "eps", "weight_decay"):
        if k in optimizer.defaults:
            v = optimizer.defaults[k]
            out[f"optimizer.{k}"] = float(v) if isinstance(v, torch.Tensor) else v
    out.update(extra or {})
    return out


def _apply_allowed_changes(optimizer: torch.optim.Optimizer, sched: Any, wanted: list[dict[str, Any]],
                           allow_changes: Iterable[str]) -> None:
    """Loading a checkpoint restores its hyperparameters; put back the ones the caller changed on
    purpose (``optimizer.lr`` and friends in ``allow_changes``), the learning rate at this run's
    base rate and the schedule's current point."""
    names = {n.split(".", 1)[1] for n in allow_changes if n.startswith("optimizer.")}
    for group, want in zip(optimizer.param_groups, wanted):
        for k in names - {"lr"}:
            if k in want:
                group[k] = want[k]
    if "lr" in names:
        sched.base_lrs = [w.get("initial_lr", w["lr"]) for w in wanted]
        for group, base, fn in zip(optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]


@dataclass
class TrainResult:
    train_loss: list[float] = field(default_factory=list)  # one per step
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    step_time_s: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    grad_norm: list[float] = field(default_factory=list)  # total gradient norm before clipping, per step
    start_step: int = 0  # > 0 when the run resumed from a checkpoint: train_loss[i] is step start_step + i
    checkpoints: list[str] = field(default_factory=list)  # paths written, oldest first
    skipped_steps: list[int] = field(default_factory=list)  # steps not applied: a gradient held NaN or Inf
    nonfinite_grads: list[int] = field(default_factory=list)  # per step: parameters whose gradient held NaN/Inf
    nonfinite_inputs: int = 0  # FP8 GEMM operands with NaN/Inf during this run (Fp8Gemm.nonfinite_inputs, summed)

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
                    median_step_time_s=self.median_step_time_s, start_step=self.start_step,
                    grad_norm=self.grad_norm,
                    checkpoints=self.checkpoints, skipped_steps=self.skipped_steps,
                    nonfinite_grads=self.nonfinite_grads, nonfinite_inputs=self.nonfinite_inputs)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: TextCorpus,
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    checkpoint_format: str = "auto",
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    settings: Mapping[str, Any] | None = None,
    allow_changes: Iterable[str] = (),
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps on ``corpus`` and return the curves.

    Stops early (recording ``diverged_at``) when the training loss is not finite.

    Non-finite gradients: when any gradient holds NaN or Inf after ``backward`` (checked before
    clipping, which would spread one NaN to every parameter, and agreed by all ranks), the whole
    step is skipped, as torch.amp's ``GradScaler`` does: no ``optimizer.step()`` (weights, moments
    and the optimizer's step count stay bit-for-bit as they were, for ``torch.optim.AdamW`` and the
    quantized optimizers alike), gradients zeroed, but the step still consumes its batch and
    advances the LR schedule, so the LR and the data stay functions of the step index (a resumed
    run matches an uninterrupted one). ``TrainResult.skipped_steps`` lists the skipped steps,
    ``nonfinite_grads`` counts the offending parameters per step, ``nonfinite_inputs`` the FP8
    operands with NaN/Inf this run; the progress bar shows both counts.

    Checkpoints (:mod:`lowprec.checkpoint`): with ``checkpoint_dir``, a checkpoint is written
    every ``checkpoint_every`` steps (0: only at the end) and at the last step run, keeping the
    newest ``keep_checkpoints``, as ``checkpoint_format`` ("auto": one file in one process,
    a DCP directory under torch.distributed; "dcp" forces a directory). ``resume_from`` (a checkpoint, or a run directory whose
    ``latest`` is used) restores model, optimizer, LR schedule and RNG and continues at the saved
    step; ``stop_after=k`` stops after step k as if interrupted (the LR schedule still spans
    ``config.steps``). ``model`` may be wrapped by :mod:`lowprec.distributed` (DDP or FSDP2).

    A resume repeats the run it continues: every checkpoint records the model's whole recipe and
    the run settings (:func:`run_settings`: the ``config`` fields that shape training, the
    optimizer's class and hyperparameters, and the caller's ``settings``, e.g. the data source),
    and ``resume_from`` refuses a run that differs in any of them, listing each difference
    (:class:`lowprec.checkpoint.ResumeMismatch`), except the names in ``allow_changes``.
    """
    from lowprec import checkpoint as ckpt

    config = config if config is not None else TrainConfig()
    rank, world = _world()
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.steps, config.schedule))
    val = eval_batches(corpus.val, config.eval_batches, config.batch_size, config.seq_len)
    result = TrainResult()
    data_position = {"seed": config.seed, "batch_size": config.batch_size, "seq_len": config.seq_len}
    settings = run_settings(config, optimizer, settings)
    start = 0
    if resume_from is not None:
        path = Path(resume_from)
        if path.is_dir() and (path / ckpt.LATEST_NAME).is_file():
            path = ckpt.latest(path)
        wanted = [dict(g) for g in optimizer.param_groups]
        meta = ckpt.load(path, model, optimizer, scheduler=sched, settings=settings, allow_changes=allow_changes)
        _apply_allowed_changes(optimizer, sched, wanted, allow_changes)
        start = int(meta["step"])
        result.start_step = start
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    steps: Iterable[int] = range(start, end)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False, initial=start, total=end)
    model.train()
    fp8_before = fp8_nonfinite_inputs(model)
    for step in steps:
        x, y = batch_at(corpus.train, step, config.batch_size, config.seq_len, config.seed, rank=rank, world_size=world)
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y)
        loss.backward()
        _apply_or_skip(model, optimizer, config.grad_clip, step, result)
        _advance(sched)  # also on a skipped step: the LR is a function of the step index
        result.step_time_s.append(time.perf_counter() - t0)
        value = _global_mean(loss.detach(), world)
        result.train_loss.append(value)
        if on_step is not None:
            on_step(step, value)
        if callable(getattr(steps, "set_postfix", None)):  # the tqdm bar
            steps.set_postfix(skipped=len(result.skipped_steps),
                              nonfinite_inputs=fp8_nonfinite_inputs(model) - fp8_before, refresh=False)
        if not math.isfinite(value):
            result.diverged_at = step
            break
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            result.val_loss.append((step + 1, evaluate(model, val)))
        if checkpoint_dir is not None and (step + 1 == end or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            path = ckpt.save_to_run(checkpoint_dir, model, optimizer, step=step + 1, scheduler=sched,
                                    data=data_position, settings=settings, keep_last=keep_checkpoints,
                                    format=checkpoint_format)
            result.checkpoints.append(str(path))
    result.nonfinite_inputs = _max_over_ranks(fp8_nonfinite_inputs(model) - fp8_before, world)
    return result


def _apply_or_skip(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, step: int,
                   result: TrainResult) -> None:
    """Clip and apply this step's gradients, or skip the update when any gradient is not finite
    (recorded in ``result``); the gradients are zeroed either way. See :func:`train`."""
    bad = nonfinite_grad_count(model)
    result.nonfinite_grads.append(bad)
    if bad:
        result.skipped_steps.append(step)
        if grad_clip is not None:
            result.grad_norm.append(math.nan)  # keeps grad_norm one entry per step
    else:
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor
            result.grad_norm.append(float(full() if callable(full) else norm))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _advance(sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """``sched.step()``, without torch's "lr_scheduler.step() before optimizer.step()" warning when
    the first step was skipped: that step's LR was meant to go unused, nothing is lost."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before", category=UserWarning)
        sched.step()


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def nonfinite_grad_count(model: nn.Module) -> int:
    """How many of ``model``'s parameters hold a gradient with NaN or Inf, the same on every rank.

    One read of the gradients and one host sync. Under torch.distributed the count is the maximum
    over ranks (one all-reduce): DDP's gradients are already averaged, so every rank counts the
    same; FSDP2's are sharded DTensors, checked shard by shard (as the quantized optimizers'
    ``_all_finite`` does), and a NaN shows only on the rank owning it, so the maximum is what makes
    every rank skip the same steps.
    """
    params = list(model.parameters())
    grads = [_local_shard(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    flags = [torch.isfinite(g).all().logical_not().to(device) for g in grads]
    bad = torch.stack(flags).sum() if flags else torch.zeros((), dtype=torch.int64, device=device)
    return _max_over_ranks(bad, _world()[1])


def fp8_nonfinite_inputs(model: nn.Module) -> int:
    """FP8 GEMM operands seen with NaN or Inf so far: every module's ``nonfinite_inputs`` buffer
    (:class:`lowprec.matmul.fp8_gemm.Fp8Gemm`; per role) summed over the model. 0 without FP8."""
    counts = [b.sum() for m in model.modules() if isinstance(b := m._buffers.get("nonfinite_inputs"), torch.Tensor)]
    return int(torch.stack([c.to(counts[0].device) for c in counts]).sum()) if counts else 0  # one host sync


def _max_over_ranks(value: int | torch.Tensor, world: int) -> int:
    """``value`` as an int, the maximum over ranks under torch.distributed (every rank must call it)."""
    if world == 1:
        return int(value)
    import torch.distributed as dist

    t = value.detach().to(torch.int64).reshape(1) if isinstance(value, torch.Tensor) else torch.tensor([int(value)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _global_mean(loss: torch.Tensor, world: int) -> float:
    """The loss over the global batch: the mean of the ranks' means (local batches are equal)."""
    if world == 1:
        return loss.item()
    import torch.distributed as dist

    t = loss.float().clone()
    dist.all_reduce(t)
    return (t / world).item()
