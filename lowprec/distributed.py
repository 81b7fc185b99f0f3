"""Data-parallel training with torchrun: DDP or FSDP2 (``fully_shard``), gloo on the CPU.

lowprec runs *inside* torch.distributed rather than beside it:

* :func:`init` starts the default process group from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); gloo on the CPU, NCCL on CUDA.
* :func:`wrap` puts a converted model under DDP or FSDP2. FP8 scaling state stays in step
  across ranks because the FP8 casts all-reduce their amax with MAX over the default group
  (contract 7), so DDP does not need to broadcast buffers.
* The gradient reduction is corrected for unit scaling (see :func:`grad_divide_factor`), so a
  2-rank run computes the gradients of the one-process run on the same global batch.
* :func:`run` / :func:`main` are the entry point of ``torchrun -m lowprec.distributed ...`` and of
  the CLI's ``lowprec train --nproc N`` (which calls :func:`launch`).

Why a unit-scaled model needs a different gradient divisor
-----------------------------------------------------------
A mean-loss model's weight gradient is ``(1/b) * S`` with ``S`` the sum of per-row terms over
the ``b`` rows the weight sees; DDP averages over ``W`` ranks of ``b = B/W`` rows each, which
gives ``(1/B) * S_global``: the one-process gradient. Unit scaling does not divide by the batch
in backward: every weight gradient (linear, embedding, norm gains, readout) carries
``b^-1/2`` (design.md), with ``b`` the rows in *this* process. On ``W`` ranks that is
``(B/W)^-1/2 = sqrt(W) * B^-1/2``, so the sum over ranks is ``sqrt(W)`` times the one-process
gradient and the mean is ``W^-1/2`` times it. Adam is nearly invariant to such a constant, but
not exactly (eps, the clipping threshold, 4-bit state rounding), so we divide the summed
gradient by ``sqrt(W)`` instead of ``W`` and get the one-process gradient up to summation order.
In general the divisor is ``W^-p`` for a gradient proportional to ``b^p * S``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp", "none")


# ----------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; return (rank, world size).

    Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is initialised and
    (0, 1) is returned, so the same script runs in one process. ``backend`` defaults to gloo on
    the CPU and NCCL when CUDA is available.
    """
    if dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} is set but {', '.join(missing)} is not: launch with torchrun "
                           "(torchrun --nproc_per_node N -m lowprec.distributed ...)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return world()


def shutdown() -> None:
    """Destroy the default process group if this process has one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now (for ``torchrun --master-port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# wrapping
# ----------------------------------------------------------------------------------------------


def is_unit_scaled(model: nn.Module) -> bool:
    recipe = getattr(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model,
                     "lowprec_recipe", None)
    return bool(recipe is not None and recipe.unit_scaling.enabled)


def grad_divide_factor(model: nn.Module, world_size: int) -> float:
    """What the summed data-parallel gradient is divided by so it equals the one-process gradient.

    ``world_size`` for a mean-loss model (the usual average), ``sqrt(world_size)`` for a
    unit-scaled one, whose weight gradients carry ``b^-1/2`` of the local batch (module docstring).
    """
    return math.sqrt(world_size) if is_unit_scaled(model) else float(world_size)


def _scaled_allreduce_hook(factor, bucket):  # no annotations: DDP checks them against the real classes
    """DDP comm hook: gradient bucket / factor, then all-reduce SUM (DDP's default with a different divisor)."""
    buf = bucket.buffer()
    buf.div_(factor)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the blocks of every ``nn.ModuleList`` (decoder layers)."""
    units: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            units.extend(child for child in m if any(p.requires_grad for p in child.parameters()))
    return units


def wrap(model: nn.Module, strategy: str = "ddp", *, grad_divisor: str = "auto") -> nn.Module:
    """Put ``model`` under data parallelism: ``"ddp"``, ``"fsdp"`` (FSDP2 ``fully_shard``) or ``"none"``.

    Convert first (``lowprec.convert``), wrap second, and build the optimizer last (FSDP2 replaces
    parameters by sharded DTensors). In one process every strategy returns the model as it is.
    ``grad_divisor``: ``"auto"`` (:func:`grad_divide_factor`: the one-process gradient) or
    ``"mean"`` (the usual average over ranks; wrong by sqrt(world) for a unit-scaled model, kept
    for comparison).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"data-parallel strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if grad_divisor not in ("auto", "mean"):
        raise ValueError(f"grad_divisor must be 'auto' or 'mean'; got {grad_divisor!r}")
    _, size = world()
    if strategy == "none" or size == 1:
        return model
    factor = grad_divide_factor(model, size) if grad_divisor == "auto" else float(size)
    if strategy == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        if factor != size:
            ddp.register_comm_hook(factor, _scaled_allreduce_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(factor)
            # a custom divisor would use ReduceOp.PREMUL_SUM, which gloo lacks: SUM, then divide
            m.set_force_sum_reduction_for_comms(True)
    return model


# ----------------------------------------------------------------------------------------------
# one entry point for torchrun and the CLI
# ----------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, recipe: Any | None, name: str | None = None, lr: float | None = None,
                   **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer a recipe asks for (``recipe.optimizer``), over ``model``'s (possibly sharded) parameters.

    ``name`` overrides ``recipe.optimizer.name`` (AdamW | AdamW8bit | AdamW4bit | AdamWFp8).
    A unit-scaled model gets u-muP param groups (``lowprec.runs.param_groups_for``, as single-process runs).
    ``optimizer_kwargs`` go to a lowprec.optim optimizer (e.g. ``compile=False``).
    """
    from lowprec.recipes import OptimizerConfig

    cfg = recipe.optimizer if recipe is not None else OptimizerConfig()
    name = name or cfg.name
    lr = cfg.lr if lr is None else lr
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params: Any = [p for p in inner.parameters() if p.requires_grad]
    if recipe is not None and recipe.unit_scaling.enabled:
        from lowprec.runs import param_groups_for

        params = param_groups_for(inner, recipe, lr)
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    if name == "AdamW":
        return torch.optim.AdamW(params, **kwargs)
    import lowprec.optim as lo

    cls = getattr(lo, name, None)
    if cls is None:
        raise ValueError(f"optimizer {name!r} is not available in lowprec.optim")
    if cfg.factor_second_moment:
        kwargs["factor_second_moment"] = True
    if cfg.fp32_state_patterns:  # matched against parameter names: give the groups their names
        kwargs["fp32_state_patterns"] = tuple(cfg.fp32_state_patterns)
        if not (isinstance(params, list) and params and isinstance(params[0], dict)):
            params = [dict(params=params)]
        name_of = {id(p): n for n, p in inner.named_parameters()}
        for g in params:
            g["param_names"] = [name_of.get(id(p), "") for p in g["params"]]
    return cls(params, **kwargs, **optimizer_kwargs)


def run(
    recipe: str | Any | None = "unit-fp8",
    *,
    strategy: str = "ddp",
    grad_divisor: str = "auto",
    steps: int = 20,
    batch_size: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
    optimizer: str | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    schedule: str | None = None,
    grad_clip: float | None = 1.0,
    eval_every: int = 50,
    eval_batches: int = 8,
    text_file: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    checkpoint_format: str = "auto",
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    out_json: str | Path | None = None,
    progress: bool = False,
):
    """Train the demo Llama under ``recipe`` on this process's share of the global batch; return the TrainResult.

    Call it from every rank (``torchrun -m lowprec.distributed``) or from one process (no
    torchrun: a plain run). ``recipe``: a shipped name, a TOML path, a Recipe, or None / "fp32"
    for the unconverted model. ``batch_size`` is the GLOBAL batch (split over ranks).
    ``model_overrides`` changes the demo Llama's config (e.g. ``{"num_hidden_layers": 2}``).
    Rank 0 writes ``out_json`` (the result, the recipe, the world size and strategy).
    """
    import lowprec
    from lowprec.data import stdlib_corpus, text_file_corpus
    from lowprec.models import demo_llama
    from lowprec.training import TrainConfig, train

    rank, size = init()
    model = demo_llama(seed=seed, **(model_overrides or {}))
    rec = None
    if recipe not in (None, "none"):
        try:
            rec = lowprec.recipes.resolve(recipe)
        except lowprec.recipes.RecipeError:
            if recipe != "fp32":  # 'fp32' means the unconverted model even where no fp32.toml ships
                raise
        if rec is not None:
            lowprec.convert(model, rec)
    model = wrap(model, strategy, grad_divisor=grad_divisor)
    opt = make_optimizer(model, rec, optimizer, lr, **(optimizer_kwargs or {}))
    ocfg = rec.optimizer if rec is not None else None
    config = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
        warmup_steps=warmup_steps if warmup_steps is not None else (ocfg.warmup_steps if ocfg else 20),
        schedule=schedule or (ocfg.schedule if ocfg else "cosine"),
        eval_every=eval_every, eval_batches=eval_batches, grad_clip=grad_clip,
    )
    corpus = text_file_corpus(text_file, seq_len=seq_len) if text_file else stdlib_corpus()
    result = train(model, opt, corpus, config, progress=progress, desc=f"rank{rank}",
                   checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                   checkpoint_format=checkpoint_format, resume_from=resume_from, stop_after=stop_after)
    if out_json is not None and rank == 0:
        out = dict(result.to_dict(), recipe=getattr(rec, "name", "fp32"), world_size=size, strategy=strategy,
                   grad_divisor=grad_divisor,
                   optimizer=type(opt).__name__, config=config.__dict__)
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(out, indent=1))
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of :func:`main` (the CLI may add them to its own ``train`` sub-parser)."""
    p = parser or argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m lowprec.distributed",
        description="Train the demo Llama under a lowprec recipe with DDP or FSDP2 (run under torchrun; "
                    "without torchrun it trains in one process).")
    p.add_argument("recipe", nargs="?", default="unit-fp8", help="shipped recipe name, TOML path, or 'fp32'")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="data parallelism (default ddp)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="GLOBAL batch size, split over the ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default=None, help="override the recipe's optimizer (AdamW, AdamW4bit, ...)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="override the demo Llama's number of layers")
    p.add_argument("--hidden", type=int, default=None, help="override the demo Llama's hidden size")
    p.add_argument("--intermediate", type=int, default=None, help="override the demo Llama's MLP size")
    p.add_argument("--text-file", default=None, help="train on this text file instead of the stdlib source")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="checkpoint (or run directory) to resume from")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (as if interrupted)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out-json", default=None, help="rank 0 writes the result here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc_per_node N -m lowprec.distributed [RECIPE] [options]``; returns the exit code."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                                     ("intermediate_size", args.intermediate)) if v is not None}
    try:
        result = run(args.recipe, strategy=args.strategy, steps=args.steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, seed=args.seed, model_overrides=overrides, optimizer=args.optimizer,
                     lr=args.lr, warmup_steps=args.warmup_steps, text_file=args.text_file,
                     checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                     resume_from=args.resume, stop_after=args.stop_after, eval_every=args.eval_every,
                     out_json=args.out_json)
        rank, size = world()
        if rank == 0:
            for i, loss in enumerate(result.train_loss):
                print(f"step {result.start_step + i + 1:5d}  loss {loss:.6f}")
            print(f"world size {size}, strategy {args.strategy}, final validation loss {result.final_val_loss:.4f}")
    finally:
        shutdown()
    return 0


def launch(nproc: int, argv: Sequence[str], *, master_port: int | None = None, check: bool = True
           ) -> subprocess.CompletedProcess:
    """Run :func:`main` on ``nproc`` local processes through torchrun (what ``lowprec train --nproc N`` does)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1; got {nproc}")
    port = master_port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master-port", str(port), "-m", "lowprec.distributed", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env, check=check)


if __name__ == "__main__":
    sys.exit(main())
