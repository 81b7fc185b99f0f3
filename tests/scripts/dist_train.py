"""Launched by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Runs, on a small Llama, the same recipe four ways and writes each rank-0 result as JSON into OUT:
  ddp.json             DDP, STEPS steps
  fsdp.json            FSDP2, STEPS steps, DCP checkpoints every STEPS/2 steps in OUT/fsdp_ckpt
  fsdp_resumed.json    FSDP2 resumed from the half-way checkpoint of fsdp.json's run, to STEPS
  fsdp_from_single.json  FSDP2 resumed from a DCP checkpoint written by ONE process (--from-single)
  fsdp_from_file.json    FSDP2 resumed from a one-file checkpoint of ONE process (--from-file)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lowprec import distributed as D

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="fp32")
    p.add_argument("--optimizer", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", required=True)
    p.add_argument("--from-single", default=None)
    p.add_argument("--from-file", default=None)
    args = p.parse_args()
    out = Path(args.out)
    # torch.compile of the quantized step costs tens of seconds per process cold: eager here
    okw = {"compile": False} if args.optimizer not in (None, "AdamW") else None
    common = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, model_overrides=SMALL,
                  optimizer=args.optimizer, optimizer_kwargs=okw, lr=args.lr, warmup_steps=2,
                  eval_every=args.steps, eval_batches=1)
    rank, size = D.init()
    assert size == 2, f"expected 2 ranks, got {size}"
    half = args.steps // 2
    D.run(args.recipe, strategy="ddp", out_json=out / "ddp.json", **common)
    D.run(args.recipe, strategy="fsdp", out_json=out / "fsdp.json", checkpoint_dir=out / "fsdp_ckpt",
          checkpoint_every=half, **common)
    D.run(args.recipe, strategy="fsdp", out_json=out / "fsdp_resumed.json",
          resume_from=out / "fsdp_ckpt" / f"step-{half:07d}", **common)
    if args.from_single:
        D.run(args.recipe, strategy="fsdp", out_json=out / "fsdp_from_single.json", resume_from=args.from_single,
              **common)
    if args.from_file:
        D.run(args.recipe, strategy="fsdp", out_json=out / "fsdp_from_file.json", resume_from=args.from_file,
              **common)
    if rank == 0:
        (out / "done.json").write_text(json.dumps({"world_size": size}))
    D.shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    # gloo's worker threads can abort in C++ static destructors at interpreter exit, after all
    # work is done and written; skip them (the test checks what was written).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
