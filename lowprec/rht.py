"""The random Hadamard transform (RHT) of NVFP4 training (NVIDIA, arXiv 2509.25149).

Each group of ``size`` consecutive elements along ``dim`` is multiplied by the orthonormal matrix
``M = H diag(signs) / sqrt(size)``: ``H`` the Sylvester Hadamard matrix (entries ±1), ``signs`` a
random ±1 vector drawn from a seed. The transform spreads a block's outliers over all of its
elements, so a 16-element FP4 block scale fits them better. Because ``M`` is orthonormal, applying
it along the reduction dimension of *both* operands of a GEMM leaves the product unchanged
(``(M a)^T (M b) = a^T b``); NVFP4 training does this on the weight-gradient GEMM's inputs, where
the reduction runs over tokens.

A ``dim`` whose length is not a multiple of ``size`` is refused with a clear error rather than
padded: padding one operand changes nothing for the product only if the caller pads the other one
identically, so the caller (which knows both operands) decides.
"""

from __future__ import annotations

import math

import torch

from .formats import _check_input

RHT_SIZE = 16  # NVFP4 training: 16x16 Hadamard blocks (arXiv 2509.25149)


def hadamard(n: int = RHT_SIZE) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (float32 entries ±1, rows mutually orthogonal), n a
    power of two: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a positive power of two; got {n!r}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def random_signs(seed: int, n: int = RHT_SIZE) -> torch.Tensor:
    """A ±1 float32 vector of length ``n``, the same for the same seed, from a private
    ``torch.Generator`` (the global RNG is neither read nor advanced)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_signs: seed must be an int, got {type(seed).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"random_signs: n must be a positive int; got {n!r}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2.0 - 1.0


def rht_matrix(seed: int, size: int = RHT_SIZE) -> torch.Tensor:
    """The orthonormal ``H diag(signs) / sqrt(size)`` (float32)."""
    return hadamard(size) * random_signs(seed, size)[None, :] / math.sqrt(size)


def _apply(x: torch.Tensor, m: torch.Tensor, dim: int, size: int, what: str,
           dtype: torch.dtype | None) -> torch.Tensor:
    _check_input(x, what)
    if x.dim() == 0:
        raise ValueError(f"{what} is 0-d; the Hadamard transform needs a dimension to act on")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{what}: dim {dim} is out of range for a {x.dim()}-d tensor")
    n = x.shape[dim]
    if n % size:
        raise ValueError(f"{what}: dimension {dim} has length {n}, not a multiple of the Hadamard size {size}; "
                         f"pad both GEMM operands along it (or skip the transform) before calling")
    xt = x.float().movedim(dim, -1)
    groups = xt.reshape(*xt.shape[:-1], n // size, size)
    y = (groups @ m.to(x.device).T).reshape(xt.shape).movedim(-1, dim)
    return y.to(x.dtype if dtype is None else dtype)


def rht(x: torch.Tensor, seed: int, *, dim: int = -1, size: int = RHT_SIZE,
        dtype: torch.dtype | None = None) -> torch.Tensor:
    """Multiply each group of ``size`` consecutive elements along ``dim`` by
    ``H diag(random_signs(seed)) / sqrt(size)``. Computed in float32; returned in ``dtype``
    (default x's dtype; pass ``torch.float32`` to keep full precision before a quantizer)."""
    return _apply(x, rht_matrix(seed, size), dim, size, "rht: x", dtype)


def rht_inverse(y: torch.Tensor, seed: int, *, dim: int = -1, size: int = RHT_SIZE,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inverse of :func:`rht` (the transpose of its orthonormal matrix)."""
    return _apply(y, rht_matrix(seed, size).T, dim, size, "rht_inverse: y", dtype)
