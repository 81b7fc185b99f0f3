"""``LowPrecisionLinear``: an ``nn.Linear`` whose matmul runs through a GEMM backend.

A drop-in for ``nn.Linear`` (same parameters, same ``state_dict`` keys plus the backend's own
buffers) so that converted Hugging Face models still look like themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowPrecisionLinear(nn.Linear):
    """``nn.Linear`` with ``gemm``: a backend from :mod:`lowprec.matmul.gemm` or :mod:`lowprec.matmul`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gemm: nn.Module | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.gemm = gemm

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: nn.Module | None) -> LowPrecisionLinear:
        """Wrap an existing ``nn.Linear``, sharing its parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.gemm = gemm
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is None:
            return F.linear(x, self.weight, self.bias)
        return self.gemm(x, self.weight, self.bias)
