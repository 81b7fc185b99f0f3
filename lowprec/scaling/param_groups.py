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
norm, bias     ``lr * depth**-0.5`` (``lr`` outside the stack)
=============  ==========================================================

``lowprec.convert`` records the role of every parameter on the module that owns it
(``lowprec_param_roles``, ``lowprec_depth``), so these rules need no names.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowprec.scaling.modules import UnitLinear, UnitOp


def parameter_roles(model: nn.Module) -> dict[str, dict[str, Any]]:
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
            out[full] = dict(role=role, fan_in=fan_in, depth=depth, lr_scale=_lr_scale(m, role, fan_in, depth), param=p)
    return out


def _lr_scale(m: nn.Module, role: str, fan_in: int | None, depth: int | None) -> float:
    d = depth**-0.5 if depth else 1.0
    if role == "hidden":
        return fan_in**-0.5 * d  # type: ignore[operator]
    if role == "embedding":
        return fan_in**-0.5  # type: ignore[operator]
    if role == "readout":
        mup = isinstance(m, UnitLinear) and m.readout == "mup"
        return 1.0 if mup else fan_in**-0.5  # type: ignore[operator]
    if role in ("norm", "bias"):
        return d
    return 1.0


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *, decay_norms_and_biases: bool = True,
                 strict: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups with u-muP per-parameter learning rates (see the module docstring).

    ``weight_decay`` keeps AdamW's meaning at the base rate: every parameter decays by
    ``lr * weight_decay`` per step (times the schedule), whatever its own learning rate, i.e.
    decay is independent of the per-parameter rate (u-muP). ``strict`` raises when a parameter
    has no role (its module was left alone by conversion); otherwise it gets the base rate.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"param_groups: lr must be a positive number, got {lr!r}")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, info in parameter_roles(model).items():
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
