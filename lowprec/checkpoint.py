"""Resumable low-precision checkpoints: one file for one process, a DCP directory for many.

A checkpoint holds everything a resumed run needs to continue exactly where it stopped:

* the model's ``state_dict`` (FP8 scaling state such as delayed-scaling amax histories lives in
  module buffers, so it comes along);
* the optimizer's ``state_dict`` *as it is*: quantized states (uint8 codes, fp32 scales) are
  saved as the optimizer keeps them, never dequantized;
* the LR scheduler's ``state_dict``, the RNG states (torch, Python, NumPy), the data position
  (batches are a pure function of ``(seed, step)``, so the step *is* the position) and the
  recipe name.

Two on-disk formats, picked by :func:`save` (``format="auto"``):

* **file** (one process): a ``torch.save`` zip holding only tensors, plain containers and
  numbers, loaded with ``torch.load(weights_only=True)``. Every tensor's SHA-256 is stored
  beside it, so a corrupted byte is caught and named, never loaded.
* **dcp** (``torch.distributed`` with world size > 1, or asked for): a directory written by
  :mod:`torch.distributed.checkpoint`. FSDP2 shards are saved by the rank that owns them and
  resharded on load, so a checkpoint written by 2 ranks loads into 1 process and back. Only
  tensors go through DCP (its non-tensor path unpickles without ``weights_only``); everything
  else is in ``lowprec_meta.json`` beside them, with the size and SHA-256 of every file, and
  DCP's ``.metadata`` is read with an unpickler that admits only DCP's own metadata classes.

Atomic writes: a checkpoint is written under a temporary name in the same directory and
renamed into place only when complete (``os.replace`` for a file, ``os.rename`` for a
directory that does not exist yet), so a crash while saving leaves the previous checkpoint
intact. Every failure to read one raises :class:`CheckpointError` naming the file and what is
missing or wrong, before the model or optimizer is touched: there is no partial load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

FORMAT_VERSION = 1
META_NAME = "lowprec_meta.json"  # the sidecar of a DCP checkpoint directory
LATEST_NAME = "latest"  # in a run directory: the name of the newest complete checkpoint
_FILE_KEYS = ("lowprec_checkpoint", "step", "recipe", "model", "optimizer", "scheduler", "rng", "data", "extra",
              "world_size", "digests")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit: the message names the file and what is wrong."""


class ResumeMismatch(CheckpointError, ValueError):
    """A checkpoint was written under other recipe fields or run settings than the run resuming it.

    Its ``differences`` map each differing name (``recipe.<dotted field>`` or a run setting such
    as ``steps``) to ``(saved, now)``; ``allow_changes`` accepts named ones on purpose."""

    def __init__(self, message: str, differences: Mapping[str, tuple[Any, Any]]):
        super().__init__(message)
        self.differences = dict(differences)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2's ``fully_shard`` keeps the module itself)."""
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def recipe_name(model: nn.Module) -> str:
    """The name of the recipe ``lowprec.convert`` applied to ``model`` ('' for an unconverted model)."""
    recipe = getattr(unwrap(model), "lowprec_recipe", None)
    return getattr(recipe, "name", "") if recipe is not None else ""


def recipe_fields(model: nn.Module) -> dict[str, Any]:
    """Every field of the recipe ``lowprec.convert`` applied to ``model``, by dotted name (tuples as
    lists, so a value compares equal after a JSON round trip); empty for an unconverted model."""
    recipe = getattr(unwrap(model), "lowprec_recipe", None)
    to_dict = getattr(recipe, "to_dict", None)
    return _flatten(json.loads(json.dumps(to_dict(), default=_json_default))) if callable(to_dict) else {}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _walk_tensors(obj: Any, prefix: str = ""):
    """(dotted path, tensor) for every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{prefix}/{i}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# RNG state: as tensors and plain numbers, so it loads with weights_only=True
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if present, Python, NumPy) as tensors and ints."""
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


# ----------------------------------------------------------------------------------------------
# state dicts keyed by parameter name (work for plain, DDP and FSDP2 models alike)
# ----------------------------------------------------------------------------------------------


def _sd_options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=False)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict keyed by the user's names (no ``module.`` prefix); FSDP2 shards as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_sd_options(False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter name (``{"state": {fqn: {...}}, "param_groups": [...]}``).

    Quantized states come out exactly as the optimizer holds them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_sd_options(False))


def _load_model_state(model: nn.Module, state: dict[str, Any], full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_sd_options(full))


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_sd_options(full))


def _check_model_fits(path: Path, saved: Mapping[str, Any], model: nn.Module) -> None:
    """Same keys and (full) shapes as the model, or a CheckpointError naming the differences."""
    want = model_state(model)
    missing = sorted(set(want) - set(saved))
    unexpected = sorted(set(saved) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model: "
            + (f"missing {len(missing)} entries (e.g. {missing[:4]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected entries (e.g. {unexpected[:4]})" if unexpected else "")
        )
    for k, v in want.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor) or not isinstance(v, torch.Tensor):
            continue
        if tuple(s.shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: model entry {k!r} has shape {tuple(s.shape)}, the model expects {tuple(v.shape)}"
            )


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def save(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    scheduler: Any | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    format: str = "auto",
) -> Path:
    """Write a checkpoint of a training run after ``step`` completed steps; return its path.

    ``format``: ``"file"`` (one ``torch.save`` file; one process only), ``"dcp"`` (a directory
    through :mod:`torch.distributed.checkpoint`; every rank must call), or ``"auto"`` (dcp when
    ``torch.distributed`` runs with more than one rank, else file). ``data`` describes the data
    position (e.g. ``seed``, ``batch_size``, ``seq_len``); ``extra`` is any JSON-able mapping;
    ``settings`` (JSON-able) are the run settings a resume must repeat (see :func:`load`). The
    model's whole recipe is recorded too, field by field.
    The write is atomic: an existing checkpoint at ``path`` stays intact until the new one is complete.
    """
    rank, world = _world()
    if format == "auto":
        format = "dcp" if world > 1 else "file"
    if format not in ("file", "dcp"):
        raise ValueError(f"checkpoint format must be 'auto', 'file' or 'dcp'; got {format!r}")
    if format == "file" and world > 1:
        raise ValueError("a 'file' checkpoint holds one process's state; with torch.distributed "
                         f"world size {world} use format='dcp' (or 'auto')")
    path = Path(path)
    meta = {
        "lowprec_checkpoint": FORMAT_VERSION,
        "step": int(step),
        "recipe": recipe_name(model),
        "recipe_fields": recipe_fields(model),
        "settings": json.loads(json.dumps(dict(settings or {}), default=_json_default)),
        "data": dict(data or {}),
        "extra": dict(extra or {}),
        "world_size": world,
    }
    if format == "file":
        _save_file(path, model, optimizer, scheduler, meta)
    else:
        _save_dcp(path, model, optimizer, scheduler, meta)
    return path


def _save_file(path: Path, model, optimizer, scheduler, meta: dict[str, Any]) -> None:
    payload: dict[str, Any] = dict(meta)
    payload["model"] = model_state(model)
    payload["optimizer"] = optimizer_state(model, optimizer) if optimizer is not None else None
    payload["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    payload["rng"] = rng_state()
    payload["digests"] = {k: _tensor_digest(t) for k, t in _walk_tensors(
        {"model": payload["model"], "optimizer": payload["optimizer"], "rng": payload["rng"]})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_file(path: str | Path) -> dict[str, Any]:
    """Read and verify a one-file checkpoint (``torch.load(weights_only=True)``, every digest checked).

    Raises :class:`CheckpointError` naming the file and what is missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad record, unpickling refused
        raise CheckpointError(
            f"checkpoint file {str(path)!r} ({path.stat().st_size} bytes) cannot be read: it is truncated, "
            f"corrupted or not a lowprec checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(payload, dict) or "lowprec_checkpoint" not in payload:
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a lowprec checkpoint (no 'lowprec_checkpoint' entry)")
    if payload["lowprec_checkpoint"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint file {str(path)!r} has format version {payload['lowprec_checkpoint']!r}; "
                              f"this lowprec reads version {FORMAT_VERSION}")
    missing = [k for k in _FILE_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing the entries {missing}")
    digests = payload["digests"]
    found = dict(_walk_tensors({"model": payload["model"], "optimizer": payload["optimizer"], "rng": payload["rng"]}))
    absent = sorted(set(digests) - set(found))
    if absent:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing {len(absent)} tensors listed in its "
                              f"manifest, e.g. {absent[:4]}")
    extra = sorted(set(found) - set(digests))
    if extra:
        raise CheckpointError(f"checkpoint file {str(path)!r} holds tensors not in its manifest, e.g. {extra[:4]}")
    for k, t in found.items():
        if _tensor_digest(t) != digests[k]:
            raise CheckpointError(f"checkpoint file {str(path)!r}: tensor {k!r} is corrupted (its SHA-256 does not "
                                  "match the one recorded when it was saved)")
    return payload


def load(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    strict_recipe: bool = True,
    settings: Mapping[str, Any] | None = None,
    allow_changes: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint (file or DCP directory) into ``model`` / ``optimizer`` / ``scheduler``.

    Works across layouts: a file or a DCP directory written by N ranks loads into a plain
    model in one process, a DDP model, or an FSDP2 model on M ranks. RNG states are restored
    when the world size is the one that saved (otherwise each rank keeps its own). Returns the
    metadata: ``step``, ``recipe``, ``data``, ``extra``, ``world_size``, ``settings``.
    Everything is read and checked before anything is modified.

    A resume must run what the checkpoint ran: with ``strict_recipe`` every field of the model's
    recipe is compared with the saved one, and with ``settings`` every run setting is compared
    with the saved ones; any difference raises :class:`ResumeMismatch` listing them all, except
    the names in ``allow_changes`` (``recipe.<dotted field>`` or a setting's name), which the
    caller accepts on purpose. A name there that is neither is an error too (a typo would
    otherwise accept nothing without a word).
    """
    fresh = optimizer is not None and len(optimizer.state) == 0
    try:
        return _load(Path(path), model, optimizer, scheduler, restore_rng=restore_rng, strict_recipe=strict_recipe,
                     settings=settings, allow_changes=tuple(allow_changes))
    except CheckpointError:
        if fresh:  # reading the optimizer's layout initialised its state (torch's _init_optim_state): undo that
            optimizer.state.clear()
        raise


def _load(path: Path, model: nn.Module, optimizer, scheduler, *, restore_rng: bool, strict_recipe: bool,
          settings: Mapping[str, Any] | None, allow_changes: tuple[str, ...]) -> dict[str, Any]:
    if path.is_dir():
        return _load_dcp(path, model, optimizer, scheduler, restore_rng=restore_rng, strict_recipe=strict_recipe,
                         settings=settings, allow_changes=allow_changes)
    payload = read_file(path)
    _check_run(path, payload, model, strict_recipe, settings, allow_changes)
    _check_rng(path, payload["rng"])
    if scheduler is not None and payload["scheduler"] is not None:
        _check_like(path, "LR scheduler state", payload["scheduler"], scheduler.state_dict())
    if optimizer is not None and payload["optimizer"] is None:
        raise CheckpointError(f"checkpoint file {str(path)!r} holds no optimizer state, but an optimizer was given to load")
    if scheduler is not None and payload["scheduler"] is None:
        raise CheckpointError(f"checkpoint file {str(path)!r} holds no LR scheduler state, but a scheduler was given to load")
    _check_model_fits(path, payload["model"], model)
    _, world = _world()
    full = world > 1  # a one-process file loaded into ranks: shard the full tensors
    osd = None
    if optimizer is not None:
        _check_optimizer_fits(path, payload["optimizer"], model, optimizer)
        osd = payload["optimizer"]
        if full:
            osd = _shard_full_optimizer_state(path, model, optimizer, osd)
        _check_optimizer_state(path, model, optimizer, osd)
    try:
        _load_model_state(model, payload["model"], full)
        if optimizer is not None:
            _load_optimizer_state(model, optimizer, osd, False)
            _restore_state_dtypes(model, optimizer, osd["state"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} does not fit the model or optimizer: {e}") from e
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and payload["world_size"] == world:
        set_rng_state(payload["rng"])
    return {k: payload.get(k) for k in _RETURNED_META}


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata (``step``, ``recipe``, ``recipe_fields``, ``settings``, ``data``,
    ``extra``, ``world_size``), read and verified as :func:`load` would, without loading into
    anything: for commands that rebuild the run's model before loading its weights."""
    path = Path(path)
    meta = read_dcp_meta(path) if path.is_dir() else read_file(path)
    return {k: meta.get(k) for k in (*_RETURNED_META, "recipe_fields")}


def recipe_data(fields: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`recipe_fields`' dotted names back into a recipe's nested tables (for ``Recipe.from_dict``)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        *sections, name = key.split(".")
        table = out
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = value
    return out


def _shard_full_optimizer_state(path: Path, model: nn.Module, optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A one-process optimizer state cut into this rank's pieces (for FSDP2 DTensor parameters).

    Each state tensor of a sharded parameter is cut along dim 0 by ``torch.chunk``'s rule, as the
    parameter is: exact for states shaped like the parameter and for block-quantized states of an
    evenly sharded parameter (the blocks of the full tensor, in order). A piece whose shape is not
    the shape this rank's optimizer keeps raises a CheckpointError (nothing is loaded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _params_by_name(model)
    live = optimizer_state(model, optimizer)["state"]  # this rank's layout (initialised if empty)
    rank, size = _world()
    out: dict[str, dict[str, Any]] = {}
    for fqn, st in saved["state"].items():
        p = params.get(fqn)
        out[fqn] = {}
        for k, v in st.items():
            if not (isinstance(v, torch.Tensor) and p is not None and _is_dtensor(p) and v.dim() >= 1):
                out[fqn][k] = v
                continue
            target = live.get(fqn, {}).get(k)
            if isinstance(target, DTensor):
                out[fqn][k] = distribute_tensor(v, target.device_mesh, target.placements)
                continue
            chunk = -(-v.shape[0] // size)
            piece = v[rank * chunk : (rank + 1) * chunk]
            if target is None or tuple(piece.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: optimizer state {fqn}/{k} of shape {tuple(v.shape)} cannot be cut "
                    f"into this rank's piece (rank {rank} of {size} keeps shape "
                    f"{None if target is None else tuple(target.shape)}); save it as a DCP checkpoint with the "
                    "same layout, or use an optimizer state layout that shards by rows")
            out[fqn][k] = piece.clone()
    return {"state": out, "param_groups": saved["param_groups"]}


def _restore_state_dtypes(model: nn.Module, optimizer, saved_state: Mapping[str, Mapping[str, Any]]) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every non-``step`` state tensor to the parameter's
    dtype: uint8 codes must stay codes, fp32 scales of a bf16 parameter must stay fp32."""
    params = _params_by_name(model)
    for fqn, st in saved_state.items():
        p = params.get(fqn)
        if p is None or p not in optimizer.state:
            continue
        live = optimizer.state[p]
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and not _is_dtensor(v) and isinstance(live.get(k), torch.Tensor) \
                    and live[k].dtype != v.dtype:
                live[k] = v.detach().clone().to(device=live[k].device)


_RETURNED_META = ("step", "recipe", "data", "extra", "world_size", "settings")


def _check_run(path: Path, saved: Mapping[str, Any], model: nn.Module, strict_recipe: bool,
               settings: Mapping[str, Any] | None, allow_changes: tuple[str, ...]) -> None:
    """The recipe (name, then every field) and the run settings equal the saved ones, but for
    ``allow_changes``; else a :class:`ResumeMismatch` listing every difference."""
    have = recipe_name(model)
    if strict_recipe and saved["recipe"] != have and "recipe.name" not in allow_changes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by a model converted with recipe {saved['recipe'] or '(none)'!r}; "
            f"this model has recipe {have or '(none)'!r}. Convert the model with the same recipe first "
            "(or pass strict_recipe=False)"
        )
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    if strict_recipe:
        # checkpoints written before recipes were recorded field by field compare by name only
        if saved.get("recipe_fields") is not None:
            old.update({f"recipe.{k}": v for k, v in saved["recipe_fields"].items()})
            new.update({f"recipe.{k}": v for k, v in recipe_fields(model).items()})
    if settings is not None and saved.get("settings"):  # a checkpoint saved without settings has none to compare
        old.update(saved["settings"])
        new.update(json.loads(json.dumps(dict(settings), default=_json_default)))
    unknown = sorted(set(allow_changes) - set(old) - set(new) - {"recipe.name"})
    if unknown:
        raise CheckpointError(f"allow_changes names {unknown}, which are neither recipe fields nor run settings "
                              f"of checkpoint {str(path)!r}; they are: {', '.join(sorted(set(old) | set(new)))}")
    missing = object()
    diffs = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
             if old.get(k, missing) != new.get(k, missing) and k not in allow_changes}
    if diffs:
        def show(v: Any) -> str:
            return "(absent)" if v is missing else repr(v)

        listed = "; ".join(f"{k}: {show(a)} in the checkpoint, {show(b)} now" for k, (a, b) in diffs.items())
        raise ResumeMismatch(
            f"cannot resume from {str(path)!r}: this run differs from the checkpoint's in {len(diffs)} "
            f"{'field' if len(diffs) == 1 else 'fields'} ({listed}). Run with the checkpoint's values, or accept "
            f"the change on purpose (allow_changes / --allow-change NAME)",
            {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in diffs.items()})


def _check_rng(path: Path, rng: Any) -> None:
    """The saved RNG states have the types and sizes this process's have, so restoring them (the
    last step of a load) cannot fail after the model and optimizer were already loaded."""
    live = rng_state()
    live["python"]["gauss"] = _NUMBER_OR_NONE  # random.gauss's cached value: None until first used
    _check_like(path, "RNG state", rng, live, ignore=("cuda",))


_NUMBER_OR_NONE = object()  # a template leaf of _check_like that admits a number or None


def _check_like(path: Path, what: str, saved: Any, live: Any, where: str = "", ignore: tuple[str, ...] = ()) -> None:
    """``saved`` has ``live``'s structure: the same keys, list lengths, tensor dtypes and shapes,
    and the same kind of plain value (number, string, None) everywhere."""
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(path)!r}: {what} {where or '(top)'!r} {why}; refused")

    if live is _NUMBER_OR_NONE:
        if saved is not None and (isinstance(saved, bool) or not isinstance(saved, (int, float))):
            raise fail(f"is {saved!r:.60}, expected a number or None")
    elif isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.dtype != live.dtype or saved.shape != live.shape:
            got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise fail(f"is {got}, expected {live.dtype} {tuple(live.shape)}")
    elif isinstance(live, Mapping):
        if not isinstance(saved, Mapping):
            raise fail(f"is a {type(saved).__name__}, expected a mapping")
        keys, want = set(saved) - set(ignore), set(live) - set(ignore)
        if keys != want:
            raise fail(f"has keys {sorted(map(str, keys))}, expected {sorted(map(str, want))}")
        for k in want:
            _check_like(path, what, saved[k], live[k], f"{where}/{k}" if where else str(k))
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise fail(f"is {type(saved).__name__} {saved!r:.60}, expected a sequence of {len(live)}")
        for i, (a, b) in enumerate(zip(saved, live)):
            _check_like(path, what, a, b, f"{where}/{i}")
    elif isinstance(live, bool) or live is None or isinstance(live, str):
        if type(saved) is not type(live):
            raise fail(f"is {saved!r:.60}, expected a {type(live).__name__}")
    elif isinstance(live, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise fail(f"is {saved!r:.60}, expected a number")


def _check_optimizer_state(path: Path, model: nn.Module, optimizer, osd: Mapping[str, Any]) -> None:
    """The optimizer's own check of the state it is about to load (every tensor's dtype and shape,
    the state format it was written in), run before the model is touched, so a refused optimizer
    state leaves model and optimizer both as they were. Optimizers without one (torch's) are checked
    by ``load_state_dict`` itself, which casts and copies but never indexes out of bounds."""
    check = getattr(optimizer, "check_state_dict", None)
    if not callable(check):
        return
    # FQN-keyed (as checkpoints hold it) -> the id-keyed form Optimizer.load_state_dict takes
    ids: dict[str, int] = {}
    groups = []
    for saved_group in osd["param_groups"]:
        group = dict(saved_group)
        group["params"] = [ids.setdefault(fqn, len(ids)) for fqn in saved_group["params"]]
        groups.append(group)
    state = {ids[fqn]: st for fqn, st in osd["state"].items() if fqn in ids}
    try:
        check({"state": state, "param_groups": groups})
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: the optimizer state does not fit this optimizer: {e}") from e


def _check_optimizer_fits(path: Path, saved: Mapping[str, Any], model: nn.Module, optimizer) -> None:
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    want = {names[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in names}
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list):
        raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state has no 'param_groups'")
    have = {n for g in groups for n in g.get("params", [])}
    if have != want:
        miss, extra = sorted(want - have), sorted(have - want)
        raise CheckpointError(
            f"checkpoint {str(path)!r}: the optimizer's parameters differ from the saved ones "
            f"(not in the checkpoint: {miss[:4]}; not in this optimizer: {extra[:4]})"
        )
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {str(path)!r}: saved optimizer has {len(groups)} param groups, this one "
                              f"has {len(optimizer.param_groups)}")
    for i, (sg, g) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(sg, Mapping):
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer param group {i} is a {type(sg).__name__}, "
                                  "expected a mapping")
        # hyperparameters the optimizer has must come back as the same kind of value (a string lr
        # would fail in the middle of a step); keys it lacks (a scheduler's initial_lr) must be plain
        for k, v in sg.items():
            if k in ("params", "param_names"):
                continue
            if k in g:
                _check_like(path, "optimizer hyperparameter", v, g[k], f"param_groups/{i}/{k}")
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                raise CheckpointError(f"checkpoint {str(path)!r}: optimizer param group {i} entry {k!r} is a "
                                      f"{type(v).__name__}; this optimizer has no such entry, so only a plain "
                                      "value is accepted")


# ----------------------------------------------------------------------------------------------
# run directories: step-NNNNNNN(.pt) checkpoints and a 'latest' pointer
# ----------------------------------------------------------------------------------------------


def checkpoint_name(step: int, format: str) -> str:
    return f"step-{step:07d}" + (".pt" if format == "file" else "")


def save_to_run(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    step: int,
    keep_last: int = 2,
    **kwargs: Any,
) -> Path:
    """Save ``step-NNNNNNN`` into ``run_dir``, point ``latest`` at it (atomically), keep the newest ``keep_last``."""
    run_dir = Path(run_dir)
    rank, world = _world()
    fmt = kwargs.pop("format", "auto")
    if fmt == "auto":
        fmt = "dcp" if world > 1 else "file"
    path = run_dir / checkpoint_name(step, fmt)
    save(path, model, optimizer, step=step, format=fmt, **kwargs)
    if rank == 0:
        tmp = run_dir / f".{LATEST_NAME}.tmp-{os.getpid()}"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, run_dir / LATEST_NAME)
        _fsync_dir(run_dir)
        if keep_last > 0:
            olds = sorted(p for p in run_dir.glob("step-*") if not p.name.startswith("."))
            for old in olds[:-keep_last]:
                if old.name != path.name:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
    if world > 1:
        dist.barrier()
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (from its ``latest`` pointer), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_NAME
    if not pointer.is_file():
        return None
    target = run_dir / pointer.read_text().strip()
    if not target.exists():
        raise CheckpointError(f"{str(pointer)!r} points at {target.name!r}, which does not exist in {str(run_dir)!r}")
    return target


# ----------------------------------------------------------------------------------------------
# a safe reader for DCP's pickled .metadata
# ----------------------------------------------------------------------------------------------

_DCP_META_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
        "TensorProperties", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's metadata is made of (and torch dtypes): no code runs on load."""

    def find_class(self, module: str, name: str):  # noqa: D401
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _DCP_META_MODULES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which a checkpoint's metadata may not hold")


def safe_load_dcp_metadata(data: bytes):
    return _MetadataUnpickler(io.BytesIO(data)).load()


def _read_dcp_metadata(path: Path):
    meta_file = path / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no DCP '.metadata' file: it is incomplete")
    try:
        return safe_load_dcp_metadata(meta_file.read_bytes())
    except Exception as e:
        raise CheckpointError(f"checkpoint file {str(meta_file)!r} cannot be read: truncated, corrupted or not DCP "
                              f"metadata ({type(e).__name__}: {e})") from None


_DCP_NAMESPACES = ("model.", "optim.", "rng.")  # the only top-level entries _save_dcp writes


def _check_dcp_entries(path: Path, md: Any, files: Mapping[str, Any]) -> dict[str, Any]:
    """Every entry DCP's ``.metadata`` declares, checked before DCP reads a byte of payload.

    lowprec writes tensors only, under :data:`_DCP_NAMESPACES`, into files it lists in its manifest.
    Anything else is refused: a ``BytesStorageMetadata`` entry would make DCP's default planner
    unpickle its payload with ``torch.load(weights_only=False)`` (code execution), a storage path
    outside the directory or not in the manifest would read a file nobody checked, and a transform
    descriptor would run a decoder on untrusted bytes. Returns the tensor entries by key."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = f"checkpoint {str(path)!r} (.metadata)"
    entries = getattr(md, "state_dict_metadata", None)
    storage = getattr(md, "storage_data", None)
    if not isinstance(entries, Mapping) or not isinstance(storage, Mapping):
        raise CheckpointError(f"{where} is not DCP metadata (no state_dict_metadata / storage_data tables)")
    out: dict[str, Any] = {}
    for key, entry in entries.items():
        if not isinstance(key, str) or not key.startswith(_DCP_NAMESPACES):
            raise CheckpointError(f"{where} declares an entry {key!r} outside {', '.join(_DCP_NAMESPACES)}: "
                                  "not written by lowprec, refused")
        if type(entry) is not TensorStorageMetadata:
            raise CheckpointError(f"{where} declares entry {key!r} as {type(entry).__name__}; a lowprec checkpoint "
                                  "holds only tensors (a non-tensor entry would be unpickled with code execution), "
                                  "refused")
        out[key] = entry
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        fqn = getattr(index, "fqn", None)
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name \
                or name not in files:
            raise CheckpointError(f"{where}: entry {fqn!r} is stored in {name!r}, which is not a file listed in "
                                  f"{META_NAME}, refused")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{where}: entry {fqn!r} asks for storage transforms "
                                  f"{list(info.transform_descriptors)!r}; lowprec writes none, refused")
        if fqn not in out:
            raise CheckpointError(f"{where}: storage for {fqn!r}, which is not a declared tensor entry, refused")
    return out


def _tensor_only_planner():
    """DCP's default load planner with its byte path closed: ``load_bytes`` would call
    ``torch.load(weights_only=False)``. :func:`_check_dcp_entries` already refuses such entries;
    this is the second lock, in case a future DCP plans bytes some other way."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not a tensor; a lowprec "
                                  "checkpoint is loaded without unpickling anything")

    return TensorOnlyLoadPlanner()


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's reader with the pickled ``.metadata`` read by an allow-list unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


# ----------------------------------------------------------------------------------------------
# DCP directories
# ----------------------------------------------------------------------------------------------
#
# Layout of the DCP state (tensors only):
#   model/<fqn>                     the model state (FSDP2 shards are DTensors)
#   optim/<fqn>/<state key>         optimizer state tensors; a plain tensor state of an FSDP2
#                                   (DTensor) parameter is rank-local (e.g. a quantized shard):
#                                   it is saved as a Shard(0) DTensor so every rank's piece is kept
#   rng/<rank>/torch, .../python    RNG states, one entry per rank
# and lowprec_meta.json: step, recipe, data, extra, world_size, param_groups, non-tensor optimizer
# state, scheduler state, Python RNG extras and the size + SHA-256 of every file.


def _params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(unwrap(model).named_parameters())


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _optim_split(model: nn.Module, osd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split an FQN-keyed optimizer state into (tensors for DCP, JSON-able leftovers, rank-local keys)."""
    params = _params_by_name(model)
    tensors: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    local: list[str] = []
    for fqn, st in osd["state"].items():
        p = params.get(fqn)
        for k, v in st.items():
            key = f"{fqn}/{k}"
            if isinstance(v, torch.Tensor):
                if p is not None and _is_dtensor(p) and not _is_dtensor(v) and v.dim() >= 1:
                    local.append(key)
                tensors[key] = v
            else:
                try:
                    json.dumps(v)
                except TypeError:
                    raise CheckpointError(f"optimizer state {key!r} is a {type(v).__name__}, which a checkpoint "
                                          "can hold only as a tensor or a JSON value") from None
                objects[key] = v
    return tensors, objects, local


def _wrap_local_states(model: nn.Module, tensors: dict[str, Any], local: list[str]) -> list[str]:
    """Rank-local state tensors of sharded parameters -> Shard(0) DTensors over the parameter's mesh.

    DCP places a Shard(0) piece by ``torch.chunk``'s rule (ceil(n / world) rows per rank), so a
    state is wrapped only when the ranks' row counts follow that rule; then it reshards to any
    world size (e.g. AdamW4bit's block codes of an evenly sharded weight: the blocks of the full
    tensor, in order). Any other rank-local state is saved under a per-rank key
    (``rank<r>/<fqn>/<state>``) and can be loaded only by the same number of ranks; those keys
    are returned (the same list on every rank).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not local:
        return []
    params = _params_by_name(model)
    shapes = {k: tuple(tensors[k].shape) for k in local}
    size = dist.get_world_size()
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, shapes)
    per_rank_keys: list[str] = []
    for k in local:
        per_rank = [g[k] for g in gathered]
        total = sum(s[0] for s in per_rank)
        chunk = -(-total // size)
        chunked = [min(chunk, max(0, total - r * chunk)) for r in range(size)]
        if any(s[1:] != per_rank[0][1:] for s in per_rank) or [s[0] for s in per_rank] != chunked:
            per_rank_keys.append(k)
            tensors[f"rank{dist.get_rank()}/{k}"] = tensors.pop(k)
            continue
        shape = (total, *per_rank[0][1:])
        stride = torch.empty(shape, device="meta").stride()
        mesh = params[k.rsplit("/", 1)[0]].device_mesh
        tensors[k] = DTensor.from_local(tensors[k].contiguous(), mesh, [Shard(0)], run_check=False, shape=shape,
                                        stride=stride)
    return per_rank_keys


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _save_dcp(path: Path, model, optimizer, scheduler, meta: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    rank, world = _world()
    partial = path.with_name(f".{path.name}.partial")
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    state: dict[str, Any] = {"model": model_state(model)}
    meta = dict(meta)
    if optimizer is not None:
        osd = optimizer_state(model, optimizer)
        tensors, objects, local = _optim_split(model, osd)
        per_rank = _wrap_local_states(model, tensors, local) if world > 1 else []
        state["optim"] = tensors
        meta["optimizer"] = {"param_groups": osd["param_groups"], "objects": objects, "rank_local": sorted(local),
                             "per_rank": sorted(per_rank)}
    else:
        meta["optimizer"] = None
    meta["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    rng = rng_state()
    state["rng"] = {str(rank): {"torch": rng["torch"], "python": rng["python"]["state"]}}
    rng_extra = _rng_extra(rng)
    all_extra: list[Any] = [rng_extra]
    if world > 1:
        all_extra = [None] * world
        dist.all_gather_object(all_extra, rng_extra)
    meta["rng"] = {str(r): e for r, e in enumerate(all_extra)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(partial), no_dist=world == 1)
    if world > 1:
        dist.barrier()
    if rank == 0:
        files = sorted(f for f in partial.iterdir() if f.is_file())
        meta["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": _file_digest(f)} for f in files}
        (partial / META_NAME).write_text(json.dumps(meta, default=_json_default, indent=1))
        for f in partial.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(partial)
        if path.exists():  # replace an older checkpoint of the same name: keep it until the new one is in place
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(partial, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(partial, path)
        _fsync_dir(path.parent)
    if world > 1:
        dist.barrier()


def _rng_extra(rng: Mapping[str, Any]) -> dict[str, Any]:
    """The RNG state a DCP checkpoint keeps in its JSON manifest (the rest are tensors)."""
    return {"python_version": rng["python"]["version"], "python_gauss": rng["python"]["gauss"],
            "numpy": {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in rng.get("numpy", {}).items()}}


def _rng_extra_template() -> dict[str, Any]:
    extra = _rng_extra(rng_state())
    extra["python_gauss"] = _NUMBER_OR_NONE
    return extra


def read_dcp_meta(path: str | Path) -> dict[str, Any]:
    """Read and verify a DCP checkpoint directory's manifest and files (size and SHA-256 of each)."""
    path = Path(path)
    meta_file = path / META_NAME
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no {META_NAME}: the save did not complete, "
                              "or it is not a lowprec checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(meta_file)!r} is corrupted (not valid JSON: {e})") from None
    missing = [k for k in ("lowprec_checkpoint", "step", "recipe", "files", "world_size", "optimizer", "rng")
               if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint file {str(meta_file)!r} is missing the entries {missing}")
    if meta["lowprec_checkpoint"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {meta['lowprec_checkpoint']!r}; "
                              f"this lowprec reads version {FORMAT_VERSION}")
    for name, info in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing (listed in {META_NAME})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is truncated or altered: {size} bytes, "
                                  f"{info['bytes']} were written")
        if _file_digest(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupted: its SHA-256 does not match the one "
                                  "recorded when it was saved")
    return meta


def _restore_tuples(saved_groups: list[dict[str, Any]], optimizer) -> list[dict[str, Any]]:
    out = []
    for sg, g in zip(saved_groups, optimizer.param_groups):
        sg = dict(sg)
        for k, v in g.items():
            if isinstance(v, tuple) and isinstance(sg.get(k), list):
                sg[k] = tuple(sg[k])
        out.append(sg)
    return out


def _load_dcp(path: Path, model, optimizer, scheduler, *, restore_rng: bool, strict_recipe: bool,
              settings: Mapping[str, Any] | None, allow_changes: tuple[str, ...]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    rank, world = _world()
    meta = read_dcp_meta(path)
    _check_run(path, meta, model, strict_recipe, settings, allow_changes)
    md = _check_dcp_entries(path, _read_dcp_metadata(path), meta["files"])
    saved_shapes = {k: tuple(v.size) for k, v in md.items()}

    def check(key: str, t: torch.Tensor, what: str) -> None:
        if key not in saved_shapes:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {what} {key!r}")
        saved_dtype = md[key].properties.dtype
        if saved_shapes[key] != tuple(t.shape) or saved_dtype != t.dtype:
            raise CheckpointError(f"checkpoint {str(path)!r}: {what} {key!r} was saved as {saved_dtype} of shape "
                                  f"{saved_shapes[key]}; this run expects {t.dtype} of shape {tuple(t.shape)}")

    msd = model_state(model)
    saved_model = {k[len("model."):] for k in saved_shapes if k.startswith("model.")}
    extra = sorted(saved_model - set(msd))
    if extra:
        raise CheckpointError(f"checkpoint {str(path)!r} holds model entries this model does not have, e.g. {extra[:4]}")
    target: dict[str, Any] = {"model": {k: v.clone() for k, v in msd.items()}}
    for k, v in target["model"].items():
        check(f"model.{k}", v, "model entry")
    osd = None
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state, but an optimizer was given to load")
        groups = meta["optimizer"]["param_groups"]
        _check_optimizer_fits(path, {"param_groups": groups}, model, optimizer)
        osd = optimizer_state(model, optimizer)
        tensors, _, local = _optim_split(model, osd)
        per_rank = _wrap_local_states(model, tensors, local) if world > 1 else []
        saved_per_rank = meta["optimizer"].get("per_rank", [])
        if saved_per_rank and (meta["world_size"] != world or sorted(per_rank) != saved_per_rank):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {len(saved_per_rank)} optimizer states (e.g. {saved_per_rank[0]!r}) were "
                f"saved rank-locally by {meta['world_size']} ranks in a layout that cannot be resharded; load it "
                f"with {meta['world_size']} ranks and the same sharding (this run has {world})")
        saved_optim = {k[len("optim."):] for k in saved_shapes if k.startswith("optim.")}
        unknown = sorted(k for k in saved_optim - set(tensors) if not k.startswith("rank"))
        if unknown:
            raise CheckpointError(f"checkpoint {str(path)!r} holds optimizer states this optimizer does not have, "
                                  f"e.g. {unknown[:4]} (a different optimizer or state format?)")
        target["optim"] = {k: v.clone() for k, v in tensors.items()}
        for k, v in target["optim"].items():
            check(f"optim.{k}", v, "optimizer state")
    if scheduler is not None and meta.get("scheduler") is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no LR scheduler state, but a scheduler was given to load")
    if scheduler is not None:
        _check_like(path, "LR scheduler state", meta["scheduler"], scheduler.state_dict())
    same_world = meta["world_size"] == world and str(rank) in meta["rng"]
    if restore_rng and same_world:
        _check_like(path, "RNG state", meta["rng"][str(rank)], _rng_extra_template())
        rng_now = rng_state()
        target["rng"] = {str(rank): {"torch": rng_now["torch"].clone(), "python": rng_now["python"]["state"].clone()}}
        for k, v in target["rng"][str(rank)].items():
            check(f"rng.{rank}.{k}", v, "RNG state")
    try:
        dcp.load(target, storage_reader=_safe_reader(path), planner=_tensor_only_planner(), no_dist=world == 1)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded into this model/optimizer: "
                              f"{type(e).__name__}: {e}") from e
    if optimizer is not None:
        state: dict[str, dict[str, Any]] = {}
        for key, v in target["optim"].items():
            if key.startswith(f"rank{rank}/") and key.split("/", 1)[1] in per_rank:
                key = key.split("/", 1)[1]
            fqn, k = key.rsplit("/", 1)
            state.setdefault(fqn, {})[k] = v.to_local() if key in local and _is_dtensor(v) else v
        for key, v in meta["optimizer"]["objects"].items():
            fqn, k = key.rsplit("/", 1)
            state.setdefault(fqn, {})[k] = v
        osd = {"state": state, "param_groups": _restore_tuples(groups, optimizer)}
        _check_optimizer_state(path, model, optimizer, osd)
    # everything is read and checked: now modify
    try:
        _load_model_state(model, target["model"], False)
        if optimizer is not None:
            _load_optimizer_state(model, optimizer, osd, False)
            _restore_state_dtypes(model, optimizer, state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model or optimizer: {e}") from e
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if "rng" in target:
        extra_rng = meta["rng"][str(rank)]
        r = target["rng"][str(rank)]
        state_rng: dict[str, Any] = {
            "torch": r["torch"],
            "python": {"version": extra_rng["python_version"], "state": r["python"], "gauss": extra_rng["python_gauss"]},
        }
        if extra_rng.get("numpy"):
            n = dict(extra_rng["numpy"])
            n["keys"] = torch.tensor(n["keys"], dtype=torch.int64)
            state_rng["numpy"] = n
        set_rng_state(state_rng)
    return {k: meta.get(k) for k in _RETURNED_META}
