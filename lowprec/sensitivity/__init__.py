"""Sensitivity scoring and mixed-precision bit selection.

``score(model, loss_fn, batches, method="hawq" | "pqi" | "measured", bits=(2, 3, 4, 8))`` returns a
:class:`SensitivityReport` (per layer x bit width: printable, ``to_json``/``from_json``, ``plot``);
``select_bits(report, avg_bits=...)`` or ``size_budget_bytes=...`` turns it into a plan
(qualified module name -> bits) by an exact integer program; ``pareto_frontier`` gives the
size / score trade-off. Formulas and pitfalls: design.md, "Sensitivity".
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
from lowprec.sensitivity.select import pareto_frontier, plan_size, plot_pareto, save_plan, select_bits

__all__ = [
    "LayerHessian",
    "SensitivityReport",
    "TraceEstimate",
    "find_layers",
    "hawq_scores",
    "hutchinson_traces",
    "hutchpp_trace",
    "hvp",
    "pareto_frontier",
    "plan_loss",
    "plan_size",
    "plot_pareto",
    "pqi_elementwise",
    "quadrature",
    "save_plan",
    "score",
    "select_bits",
    "top_eigenvalue",
]
