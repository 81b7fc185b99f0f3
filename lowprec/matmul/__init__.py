"""Low-precision matmuls: scaled casts (FP8 per tensor, row and block; MXFP8 and NVFP4 block
scales), GEMM backends, the low-precision linear, Smooth-SwiGLU. Formerly ``lowprec.fp8``,
which still imports."""

from lowprec.matmul.block_scaled import BlockScaledGemm, BlockScaling, block_scaled_eligible
from lowprec.matmul.fp8_gemm import Fp8Gemm, fp8_eligible, smoothing_scales
from lowprec.matmul.gemm import CastGemm
from lowprec.matmul.linear import LowPrecisionLinear
from lowprec.matmul.scaling import ScalingConfig
from lowprec.matmul.smooth_swiglu import enable_smooth_swiglu, smooth_swiglu, swiglu

__all__ = [
    "BlockScaledGemm",
    "BlockScaling",
    "block_scaled_eligible",
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
