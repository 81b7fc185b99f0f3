"""u-muP learning rates for Adam/AdamW on a unit-scaled model (Blake et al. 2024).

Unit-scaled weights are N(0, 1), so one base learning rate means something different per
parameter; u-muP's Adam rules make one base rate work across widths and depths:

=============  ==========================================================
role           learning rate
=============  ==========================================================
hidden         ``lr * fan_in**-0.5 * depth**-0.5`` (depth: layers in the residual stack)
embedding      ``lr * hidden**-0.5`` (an embedding's fan-in is its width)
readout        ``lr`` under the u-muP readout (forward ``1/fan_in``);
               ``lr * fan_in**-0.5`` under the unit readout (forward ``fan_in**-0.5``)
norm           ``lr * depth**-0.5 * norm_lr_mult`` (``depth`` factor only inside the stack)
bias           ``lr * depth**-0.5`` (``lr`` outside the stack)
=============  ==========================================================

``norm_lr_mult`` is an O(1) hyperparameter in the spirit of u-muP's per-group multipliers, not
a width rule. u-muP gives norm gains the depth-scaled base rate (``norm_lr_mult = 1``), which
moves a gain by ``lr / sqrt(depth)`` per Adam step: 7.5% of a unit gain at the demo Llama's
best base rate, 300 times the relative step that fp32 AdamW gives the same gains. Over 3000 steps
that left ``unit-fp8`` 11.7% above tuned fp32 and capped the usable base rate; at 1/16 it ends
below fp32 (``benchmarks/long_run.py``, README). Recipes set it as ``unit_scaling.norm_lr_mult``.

``lowprec.convert`` records the role of every parameter on the module that owns it
(``lowprec_param_roles``, ``lowprec_depth``), so these rules need no names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowprec.scaling.modules import UnitLinear, UnitOp


def parameter_roles(model: nn.Module, norm_lr_mult: float = 1.0) -> dict[str, dict[str, Any]]:
    """Qualified parameter name -> ``{"role", "fan_in", "depth", "lr_scale", "param"}``.

    Tied parameters appear once (under the first module that owns them). Parameters of modules
    that conversion left alone get role ``"untagged"`` and scale 1.
    """
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            role, fan_in, depth = "untagged", None, None
            if isinstance(m, UnitOp) and pname in m.lowprec_param_roles:
                role, depth = m.lowprec_param_roles[pname], m.lowprec_depth
                if role in ("hidden", "readout"):
                    fan_in = m.in_features  # type: ignore[attr-defined]
                elif role == "embedding":
                    fan_in = p.shape[1]
            out[full] = dict(role=role, fan_in=fan_in, depth=depth, lr_scale=_lr_scale(m, role, fan_in, depth, norm_lr_mult),
                             param=p)
    return out


def _lr_scale(m: nn.Module, role: str, fan_in: int | None, depth: int | None, norm_lr_mult: float = 1.0) -> float:
    d = depth**-0.5 if depth else 1.0
    if role == "hidden":
        return fan_in**-0.5 * d  # type: ignore[operator]
    if role == "embedding":
        return fan_in**-0.5  # type: ignore[operator]
    if role == "readout":
        mup = isinstance(m, UnitLinear) and m.readout == "mup"
        return 1.0 if mup else fan_in**-0.5  # type: ignore[operator]
    if role == "norm":
        return d * norm_lr_mult
    if role == "bias":
        return d
    return 1.0


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *, norm_lr_mult: float = 1.0,
                 decay_norms_and_biases: bool = True, strict: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups with u-muP per-parameter learning rates (see the module docstring).

    ``weight_decay`` keeps AdamW's meaning at the base rate: every parameter decays by
    ``lr * weight_decay`` per step (times the schedule), whatever its own learning rate, i.e.
    decay is independent of the per-parameter rate (u-muP). ``strict`` raises when a parameter
    has no role (its module was left alone by conversion); otherwise it gets the base rate.
    ``norm_lr_mult`` multiplies the norm gains' rate (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"param_groups: lr must be a positive number, got {lr!r}")
    if not (isinstance(norm_lr_mult, (int, float)) and 0 < norm_lr_mult < float("inf")):
        raise ValueError(f"param_groups: norm_lr_mult must be a positive finite number, got {norm_lr_mult!r}")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, info in parameter_roles(model, norm_lr_mult).items():
        p = info["param"]
        if not p.requires_grad:
            continue
        if info["role"] == "untagged" and strict:
            raise ValueError(f"parameter {name!r} has no unit-scaling role (its module was not converted)")
        plr = lr * info["lr_scale"]
        wd = weight_decay * lr / plr
        if info["role"] in ("norm", "bias") and not decay_norms_and_biases:
            wd = 0.0
        g = groups.setdefault((plr, wd), dict(params=[], lr=plr, weight_decay=wd, roles=set(), names=[]))
        g["params"].append(p)
        g["roles"].add(info["role"])
        g["names"].append(name)
    out = []
    for g in groups.values():
        g["roles"] = ",".join(sorted(g["roles"]))
        out.append(g)
    return out
