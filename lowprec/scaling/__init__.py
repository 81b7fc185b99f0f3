"""Unit scaling (Blake et al. 2023) and u-muP (Blake et al. 2024): scales in the ops, weights N(0, 1).

* :mod:`lowprec.scaling.functional`: ``scaled(x, fwd_scale, bwd_scale)`` and the unit-scaled ops;
* :mod:`lowprec.scaling.nonlinearity`: activation scales computed from the op under N(0, 1) input;
* :mod:`lowprec.scaling.modules`: unit-scaled modules (``UnitLinear`` holds a ``.gemm`` backend);
* :mod:`lowprec.scaling.blocks`: a transformer's parts as data (derived from names, config, probes);
* :mod:`lowprec.scaling.hf`: the generic unit-scaled block, gated-MLP and attention forwards;
* :mod:`lowprec.scaling.convert`: ``unit_scale_model`` (called by :func:`lowprec.convert`);
* :mod:`lowprec.scaling.verify`: the keep-mode probe that refuses a changed function;
* :mod:`lowprec.scaling.param_groups`: u-muP learning-rate rules for AdamW.
"""

from lowprec.scaling.convert import UnitScalingError, unit_scale_model
from lowprec.scaling.functional import (
    cross_entropy,
    residual_add,
    residual_split,
    scale_bwd,
    scale_fwd,
    scaled,
)
from lowprec.scaling.modules import (
    ResidualAdd,
    UnitActivation,
    UnitEmbedding,
    UnitGLU,
    UnitLayerNorm,
    UnitLinear,
    UnitOp,
    UnitRMSNorm,
    UnitSDPA,
)
from lowprec.scaling.param_groups import param_groups, parameter_roles
from lowprec.scaling.verify import UnitScalingMismatch

__all__ = [
    "ResidualAdd",
    "UnitActivation",
    "UnitEmbedding",
    "UnitGLU",
    "UnitLayerNorm",
    "UnitLinear",
    "UnitOp",
    "UnitRMSNorm",
    "UnitSDPA",
    "UnitScalingError",
    "UnitScalingMismatch",
    "cross_entropy",
    "param_groups",
    "parameter_roles",
    "residual_add",
    "residual_split",
    "scale_bwd",
    "scale_fwd",
    "scaled",
    "unit_scale_model",
]
