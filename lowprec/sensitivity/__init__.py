"""Sensitivity scoring and mixed-precision bit selection.

``score(model, loss_fn, batches, method="hawq" | "pqi" | "measured", bits=(2, 3, 4, 8))`` returns a
:class:`SensitivityReport` (per layer x bit width: printable, ``to_json``/``from_json``, ``plot``);
``select_bits(report, avg_bits=...)`` or ``size_budget_bytes=...`` turns it into a plan
(qualified module name -> bits) by an exact integer program; ``pareto_frontier`` gives the
size / score trade-off.

Training precision (issue 15): ``score(..., formats=("nvfp4", "mxfp8", "bf16"))`` scores each linear
layer with its weight and input in each training format (a :class:`TrainingSensitivityReport`
with FLOPs per layer); ``select_high_precision(report, "nvfp4", budget=0.1)`` picks the layers to
keep in BF16 within a share of linear FLOPs (``last_layers`` and ``random_layers`` are the
position and random baselines), and ``save_high_precision_plan`` writes the plan file the
training recipes read. Formulas and pitfalls: design.md, "Sensitivity".
"""

from lowprec.sensitivity.common import find_layers
from lowprec.sensitivity.hessian import (
    LayerHessian,
    TraceEstimate,
    hawq_scores,
    hutchinson_traces,
    hutchpp_trace,
    hvp,
    top_eigenvalue,
)
from lowprec.sensitivity.measured import plan_loss
from lowprec.sensitivity.pqi import quadrature
from lowprec.sensitivity.report import SensitivityReport
from lowprec.sensitivity.score import pqi_elementwise, score
from lowprec.sensitivity.select import (
    last_layers,
    load_high_precision_plan,
    pareto_frontier,
    plan_size,
    plot_pareto,
    random_layers,
    save_high_precision_plan,
    save_plan,
    select_bits,
    select_high_precision,
)
from lowprec.sensitivity.training_formats import (
    TRAINING_FORMATS,
    TrainingSensitivityReport,
    quantize_operand,
    score_formats,
)

__all__ = [
    "LayerHessian",
    "SensitivityReport",
    "TRAINING_FORMATS",
    "TraceEstimate",
    "TrainingSensitivityReport",
    "find_layers",
    "hawq_scores",
    "hutchinson_traces",
    "hutchpp_trace",
    "hvp",
    "last_layers",
    "load_high_precision_plan",
    "pareto_frontier",
    "plan_loss",
    "plan_size",
    "plot_pareto",
    "pqi_elementwise",
    "quadrature",
    "quantize_operand",
    "random_layers",
    "save_high_precision_plan",
    "save_plan",
    "score",
    "score_formats",
    "select_bits",
    "select_high_precision",
    "top_eigenvalue",
]
