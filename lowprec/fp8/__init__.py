"""FP8 (and 16-bit cast) training: scaled casts, GEMM backends, the low-precision linear, Smooth-SwiGLU."""

from lowprec.fp8.gemm import CastGemm
from lowprec.fp8.linear import LowPrecisionLinear

__all__ = ["CastGemm", "LowPrecisionLinear"]
