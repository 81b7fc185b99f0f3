"""Launched by tests/test_optim_fsdp.py as ``torchrun --nproc_per_node 2 tests/scripts/fsdp_optim.py OUT``.

Trains a small MLP with FSDP2 (``fully_shard``, gloo, CPU) and AdamW4bit, and on every rank the
same model unsharded in one process as the reference; rank 0 writes the findings as JSON to OUT.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from lowprec.optim import AdamW4bit

STEPS, BATCH = 8, 32


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    # 90x64 = 5760 elements: >= 4096 in full, 2880 per rank (< 4096, and 22.5 blocks of 128: padded);
    # 64x128 = 8192: 4096 per rank = 32 whole blocks, the same blocks as one process;
    # 10x128 = 1280: fp32 states.
    return nn.Sequential(nn.Linear(90, 64, bias=False), nn.ReLU(), nn.Linear(64, 128, bias=False), nn.ReLU(),
                         nn.Linear(128, 10, bias=False))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ref = make_model()
    model = make_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    opt = AdamW4bit(model.parameters(), lr=1e-2, compile=False)
    ref_opt = AdamW4bit(ref.parameters(), lr=1e-2, compile=False)
    gen = torch.Generator().manual_seed(1)
    losses = []
    step1 = []
    for step in range(STEPS):
        x = torch.randn(BATCH, 90, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
        loss = nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(ref_loss.item())
        if step == 0:
            step1 = [(p.full_tensor() - q.detach()).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())]
    report = {"world": world, "losses": losses, "layers": []}
    for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        st = opt.state[p]
        full = p.full_tensor()
        moved = (q.detach() - make_model()[2 * i].weight.detach()).abs().mean().item()
        report["layers"].append({
            "shape": list(p.shape), "is_dtensor": hasattr(p, "to_local"), "local_numel": p.to_local().numel(),
            "keys": sorted(st), "blocks": int(st["exp_avg_absmax"].numel()) if "exp_avg_absmax" in st else 0,
            "mean_diff": (full - q.detach()).abs().mean().item(), "moved": moved, "step1_max_diff": step1[i],
            "codes_are_local": all(not hasattr(v, "to_local") for v in st.values()),
        })
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's worker threads can abort ("terminate called without an active exception") in C++
    # static destructors at interpreter exit, after all work is done and checked; skip them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
