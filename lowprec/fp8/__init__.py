"""FP8 (and 16-bit cast) training: scaled casts, GEMM backends, the low-precision linear, Smooth-SwiGLU."""

from lowprec.fp8.fp8_gemm import Fp8Gemm, fp8_eligible, smoothing_scales
from lowprec.fp8.gemm import CastGemm
from lowprec.fp8.linear import LowPrecisionLinear
from lowprec.fp8.scaling import ScalingConfig
from lowprec.fp8.smooth_swiglu import enable_smooth_swiglu, smooth_swiglu, swiglu

__all__ = [
    "CastGemm",
    "Fp8Gemm",
    "LowPrecisionLinear",
    "ScalingConfig",
    "enable_smooth_swiglu",
    "fp8_eligible",
    "smooth_swiglu",
    "smoothing_scales",
    "swiglu",
]
