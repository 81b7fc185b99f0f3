"""Real text with no download: the running interpreter's own standard-library source.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded),
sorted by path and read as bytes, give several MB of varied text on every machine that has
Python. Every 10th file goes to validation. Tokens are bytes (vocabulary 256).

Batches are a pure function of ``(seed, step)``, so a resumed or distributed run sees exactly
the batches an uninterrupted single-process run would.
"""

from __future__ import annotations

import functools
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from lowprec.models import DEMO_SEQ_LEN
from lowprec.user_files import read_user_file

VOCAB_SIZE = 256  # byte-level tokens
VALIDATION_EVERY = 10  # every 10th file (by sorted path) is validation
VAL_FRACTION = 0.1  # a user's text file: the last 10% is validation (`lowprec train --data`)


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
def stdlib_corpus(max_bytes: int | None = 4_000_000, half: int | None = None) -> TextCorpus:
    """The standard library's ``.py`` files, every 10th to validation; at most ``max_bytes`` in all.

    ``half=0`` / ``half=1`` keeps only the even / odd files of the sorted list: two disjoint
    corpora of the same kind of text, to pretrain on one and fine-tune on the other."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if half is not None:
        if half not in (0, 1):
            raise ValueError(f"stdlib_corpus: half must be 0, 1 or None; got {half!r}")
        files = files[half::2]
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
    return TextCorpus(_as_tokens(train), _as_tokens(val), source=str(root) + ("" if half is None else f" (half {half})"))


def split_sizes(n_bytes: int, val_fraction: float) -> tuple[int, int]:
    """``(train, validation)`` byte counts of a ``n_bytes`` text file split by :func:`text_file_corpus`."""
    cut = int(n_bytes * (1 - val_fraction))
    return cut, n_bytes - cut


def window_bytes(seq_len: int) -> int:
    """The fewest tokens a split needs for ``seq_len``-token batches: :func:`batch_at` and
    :func:`eval_batches` draw windows of ``seq_len + 1`` tokens (inputs and shifted targets) and
    need more tokens than one window, so ``seq_len + 2``."""
    return seq_len + 2


def min_text_bytes(seq_len: int, val_fraction: float = VAL_FRACTION) -> int:
    """The smallest text file :func:`text_file_corpus` accepts for ``seq_len``: both its training
    and its validation split (the last ``val_fraction``) hold :func:`window_bytes` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1; got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    need = window_bytes(seq_len)
    # Both splits grow by 0 or 1 byte per byte of file, so the first size where both hold `need`
    # is the minimum. Start below it: a split of fraction f holds at most n*f + 1 bytes.
    n = max(2 * need, *(math.floor((need - 1) / f) - 2 for f in (val_fraction, 1 - val_fraction)))
    while min(split_sizes(n, val_fraction)) < need:
        n += 1
    return n


def text_file_corpus(path: str | Path, val_fraction: float = VAL_FRACTION, seq_len: int = DEMO_SEQ_LEN) -> TextCorpus:
    """A user's text file as bytes; the last ``val_fraction`` of it is validation.

    The file must hold :func:`min_text_bytes` ``(seq_len, val_fraction)`` bytes, so that both
    splits give ``seq_len``-token batches. Raises ``FileNotFoundError`` / ``IsADirectoryError`` /
    ``OSError`` for a path that is missing, a directory, not a regular file or unreadable, and
    ``ValueError`` for a file too small; each message names the file.
    """
    path = Path(path)
    data = read_user_file(path, "text file", "a text file")
    need = min_text_bytes(seq_len, val_fraction)
    if len(data) < need:
        raise ValueError(f"text file {str(path)!r} has {len(data):,} bytes; at least {need:,} are needed for "
                         f"sequences of {seq_len} bytes (the last {val_fraction:.0%} is validation, and each split "
                         f"needs seq_len + 2 = {window_bytes(seq_len)} bytes)")
    train, _ = split_sizes(len(data), val_fraction)
    return TextCorpus(_as_tokens([data[:train]]), _as_tokens([data[train:]]), source=str(path))


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
