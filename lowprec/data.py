"""Real text with no download: the running interpreter's own standard-library source.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded),
sorted by path and read as bytes, give several MB of varied text on every machine that has
Python. Every 10th file goes to validation. Tokens are bytes (vocabulary 256).

Batches are a pure function of ``(seed, step)``, so a resumed or distributed run sees exactly
the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256  # byte-level tokens
VALIDATION_EVERY = 10  # every 10th file (by sorted path) is validation


@dataclass(frozen=True)
class TextCorpus:
    """Byte tokens split into train and validation (uint8 tensors)."""

    train: torch.Tensor
    val: torch.Tensor
    source: str

    def __repr__(self) -> str:
        return f"TextCorpus({self.source!r}, train={self.train.numel():,} bytes, val={self.val.numel():,} bytes)"


def _as_tokens(chunks: list[bytes]) -> torch.Tensor:
    blob = b"".join(chunks)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


@functools.lru_cache(maxsize=2)
def stdlib_corpus(max_bytes: int | None = 4_000_000) -> TextCorpus:
    """The standard library's ``.py`` files, every 10th to validation; at most ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library directory {str(root)!r}")
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return TextCorpus(_as_tokens(train), _as_tokens(val), source=str(root))


def text_file_corpus(path: str | Path, val_fraction: float = 0.1) -> TextCorpus:
    """A user's text file as bytes; the last ``val_fraction`` of it is validation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    data = path.read_bytes()
    if len(data) < 1024:
        raise ValueError(f"text file {str(path)!r} has {len(data)} bytes; at least 1024 are needed to train")
    cut = int(len(data) * (1 - val_fraction))
    return TextCorpus(_as_tokens([data[:cut]]), _as_tokens([data[cut:]]), source=str(path))


def batch_at(
    tokens: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int = 0,
    rank: int = 0, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``step``-th batch of random windows: ``(inputs, targets)``, both int64 ``(batch, seq_len)``.

    The global batch depends only on ``(seed, step)``; ``rank``/``world_size`` pick this rank's
    contiguous slice of it, so data-parallel runs see the same global batch as one process.
    """
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"corpus has {tokens.numel()} tokens; need more than seq_len + 1 = {seq_len + 1}")
    if batch_size % world_size:
        raise ValueError(f"global batch {batch_size} is not divisible by world size {world_size}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
    per = batch_size // world_size
    starts = starts[rank * per : (rank + 1) * per]
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    window = tokens[idx].long()
    return window[:, :-1], window[:, 1:]


def eval_batches(tokens: torch.Tensor, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches (same for every run), evenly spaced windows."""
    n = n_batches * batch_size
    span = tokens.numel() - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation split has {tokens.numel()} tokens; need more than {seq_len + 1}")
    starts = torch.linspace(0, span - 1, n).long()
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    window = tokens[idx].long()
    return [(window[i * batch_size : (i + 1) * batch_size, :-1], window[i * batch_size : (i + 1) * batch_size, 1:]) for i in range(n_batches)]
