"""The ``lowprec`` command line: the library's three jobs from the shell.

    lowprec demo                      fp32 vs unit-fp8 + AdamW4bit side by side, then a bit plan
    lowprec train RECIPE              train the demo Llama (or --config HF.json) under a recipe
    lowprec sensitivity               score layers and choose bits per layer (a plan JSON)
    lowprec inspect [RECIPE]          the numerics table: std, amax, saturation, underflow
    lowprec bench [NAME ...]          run the benchmarks in benchmarks/
    lowprec recipes                   list the shipped recipes (--show NAME prints one)

Every command that does work writes metrics JSON and PNG plots into a run directory
(``runs/<command>-<time>`` or ``--out DIR``) and prints its path at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lowprec.runs import FeatureMissing, require

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a run ended by Ctrl-C (128 + SIGINT)


class CLIError(Exception):
    """A user-facing error: printed as ``lowprec <command>: error: <message>``, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Shared pieces: model, data, recipe
# ----------------------------------------------------------------------------------------------


def load_model(config: str | dict | None, seed: int = 0):
    """The demo-size Llama, or a randomly initialised causal LM from a Hugging Face config JSON.

    The JSON is a ``config.json`` as Hugging Face writes it (``model_type`` picks the
    architecture; a file without one is read as a Llama config). Tokens are bytes, so the
    vocabulary must have at least 256 entries.
    """
    import torch

    from lowprec.models import demo_llama

    if config is None:
        return demo_llama(seed=seed)
    if isinstance(config, dict):  # a config as a run recorded it
        data, path = config, Path("(the run's model config)")
    else:
        path = Path(config)
        if not path.is_file():
            raise CLIError(f"model config file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"model config file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CLIError(f"model config file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    tf = require("transformers", what="--config (a Hugging Face model config)")
    data = dict(data)
    model_type = data.pop("model_type", "llama")
    try:
        cfg = tf.AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as e:
        raise CLIError(f"model config file {str(path)!r}: {e}") from None
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None or vocab < 256:
        raise CLIError(f"model config file {str(path)!r}: key 'vocab_size' must be at least 256 "
                       f"(lowprec trains on byte tokens); got {vocab!r}")
    torch.manual_seed(seed)
    try:
        return tf.AutoModelForCausalLM.from_config(cfg)
    except ValueError as e:
        raise CLIError(f"model config file {str(path)!r}: not a causal language model config ({e})") from None


def load_corpus(data: str | None, seq_len: int | None = None):
    """The standard library's source text, or a user's text file (``--data``) holding at least
    ``lowprec.data.min_text_bytes(seq_len)`` bytes (``None``: the demo model's sequence length).
    A path that is missing, a directory, unreadable or too short for ``seq_len``-byte sequences is
    a :class:`CLIError` naming the file."""
    from lowprec.data import stdlib_corpus, text_file_corpus

    if data is None:
        return stdlib_corpus()
    try:
        return text_file_corpus(data, **({} if seq_len is None else {"seq_len": seq_len}))
    except (OSError, ValueError) as e:  # each of text_file_corpus's messages names the file
        raise CLIError(f"--data: {e}") from None


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def _check_seq_len(model, seq_len: int) -> None:
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise CLIError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings {limit}")


def _parse_setting(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE``: VALUE is read as a TOML value (``1e-4``, ``true``, ``["norm"]``), and as
    a plain string when it is not one (``cast.scaling=delayed``)."""
    from lowprec.recipes import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. cast.scaling=delayed), got {text!r}")
    try:
        parsed: object = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", choices=("unit", "keep"), help="unit scaling: re-initialise the weights (unit) or "
                   "keep them and absorb their scale (keep: pretrained weights); default: the recipe's")
    p.add_argument("--set", dest="overrides", action="append", type=_parse_setting, default=[], metavar="KEY=VALUE",
                   help="set a recipe field by its dotted name, e.g. --set cast.scaling=delayed (repeatable)")


def _recipe_from_args(name: str | None, args: argparse.Namespace, checkpoint: str | None = None):
    """The recipe a command runs: ``name`` (shipped name or TOML path), or else the recipe recorded in
    ``checkpoint``'s run, with ``--init`` and ``--set`` applied; None for neither."""
    from lowprec.recipes import Recipe, resolve, with_overrides

    if name is not None:
        recipe = resolve(name)
    elif checkpoint is not None:
        from lowprec.checkpoint import read_meta, recipe_data

        meta = read_meta(find_checkpoint(checkpoint))
        if meta.get("recipe_fields"):
            recipe = Recipe.from_dict(recipe_data(meta["recipe_fields"]), source=f"checkpoint {checkpoint}")
        elif meta.get("recipe"):
            recipe = resolve(meta["recipe"])
        else:
            return None
        print(f"recipe {recipe.name!r}, as recorded in the checkpoint (pass --recipe to choose another)")
    else:
        return None
    return with_overrides(recipe, dict(args.overrides), init=args.init)


def _recorded_model_config(checkpoint: str | None) -> dict | None:
    """The model config a ``lowprec train`` run recorded (None: the demo Llama, or no checkpoint)."""
    if checkpoint is None:
        return None
    from lowprec.checkpoint import read_meta

    return (read_meta(find_checkpoint(checkpoint)).get("settings") or {}).get("model_config")


def _convert(model, recipe_arg, plan: str | None = None):
    """``lowprec.convert`` with a report; the report's summary line is printed."""
    from lowprec.recipes import convert, resolve

    recipe = resolve(recipe_arg)
    try:
        model, report = convert(model, recipe, plan=plan, report=True)
    except ModuleNotFoundError as e:
        raise FeatureMissing(f"recipe {recipe.name!r} needs {e.name}, which this lowprec build does not provide") from None
    except NotImplementedError as e:
        raise FeatureMissing(f"recipe {recipe.name!r}: {e}") from None
    print(str(report).splitlines()[0])
    return model, recipe, report


def _finish(run_dir: Path, files: Sequence[Path | None]) -> None:
    written = [p.name for p in files if p is not None]
    print(f"run directory: {run_dir}" + (f"  ({', '.join(written)})" if written else ""))


# ----------------------------------------------------------------------------------------------
# lowprec train
# ----------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _launch_distributed(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--nproc N``: run this same ``lowprec train`` command on N local processes under torchrun."""
    free_port = require("lowprec.distributed", "free_port", what="lowprec train --nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--master-port={free_port()}", "-m", "lowprec", *_strip_nproc(list(argv))]
    print("launching:", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call(cmd, env=env)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def cmd_train(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    if args.nproc > 1 and _world()[1] == 1:
        return _launch_distributed(args, argv)
    import torch

    from lowprec import runs
    from lowprec.training import TrainConfig, train

    if args.resume and args.out is None:
        args.out = str(args.resume if Path(args.resume).is_dir() else Path(args.resume).parent.parent)
    recipe = _recipe_from_args(args.recipe, args)  # a bad recipe fails before any data or model is loaded
    _check_lr_override(recipe, args.lr)
    corpus = load_corpus(args.data, args.seq_len)
    rank, world = 0, 1
    if _world()[1] > 1:
        dist = require("lowprec.distributed", what=f"distributed training (WORLD_SIZE={_world()[1]})")
        rank, world = dist.init()
    try:
        if args.init_from:
            model, recipe, report = _model_from_init(args, recipe, quiet=rank != 0)
        else:
            model = load_model(args.config, seed=args.seed)
            _check_seq_len(model, args.seq_len)
            model, recipe, report = _convert(model, recipe, plan=args.plan) if rank == 0 else \
                _convert_quiet(model, recipe, args.plan)
        if world > 1:
            model = dist.wrap(model, args.strategy)
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        opt_name = args.optimizer or recipe.optimizer.name
        optimizer = runs.build_optimizer(inner, recipe, name=opt_name, lr=args.lr)
        run_dir = runs.make_run_dir("train", args.out) if rank == 0 else None
        if world > 1:  # every rank writes its shard of a checkpoint into rank 0's run directory
            names = [str(run_dir) if run_dir else None]
            torch.distributed.broadcast_object_list(names, src=0)
            ck_dir = Path(names[0]) / "checkpoints"
        else:
            ck_dir = run_dir / "checkpoints"
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                             warmup_steps=min(recipe.optimizer.warmup_steps, max(1, args.steps // 5)),
                             schedule=recipe.optimizer.schedule, eval_every=args.eval_every,
                             eval_batches=args.eval_batches)
        if rank == 0:
            print(f"training {type(inner).__name__} ({sum(p.numel() for p in inner.parameters()):,} parameters) "
                  f"under {recipe.name!r} with {opt_name} on {corpus}"
                  + (f", {world} processes ({args.strategy})" if world > 1 else ""))
        initial_val_loss = None
        if args.init_from and not args.resume:  # where fine-tuning starts: the trained model's loss
            from lowprec.training import eval_batches, evaluate

            initial_val_loss = evaluate(model, eval_batches(corpus.val, args.eval_batches, args.batch_size,
                                                            args.seq_len))
            if rank == 0:
                print(f"validation loss before training: {initial_val_loss:.4f} nats/byte")
        try:
            result = train(model, optimizer, corpus, config, progress=not args.no_progress and rank == 0,
                           desc=f"train {recipe.name}", checkpoint_dir=ck_dir,
                           checkpoint_every=args.checkpoint_every,
                           resume_from=find_checkpoint(args.resume) if args.resume else None,
                           settings=_run_settings(args, corpus), allow_changes=args.allow_change)
        except KeyboardInterrupt:
            if rank == 0:
                _report_interrupt(run_dir, ck_dir)
            return EXIT_INTERRUPTED
        except ValueError as e:
            if args.resume and str(e).startswith("cannot resume"):
                raise CLIError(str(e)) from None
            raise
        state_bytes = total_state_bytes = runs.optimizer_state_bytes(optimizer)  # this rank's (its shard under FSDP)
        if world > 1:  # a collective: every rank takes part before the non-zero ranks leave
            t = torch.tensor([state_bytes], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            total_state_bytes = int(t.item())
        if rank != 0:
            return 0 if result.diverged_at is None else 1
        metrics = {
            "command": "train", "recipe": recipe.to_dict(), "recipe_source": recipe.source,
            "optimizer": opt_name, "optimizer_state_bytes": state_bytes,
            "optimizer_state_bytes_all_ranks": total_state_bytes,
            "parameters": sum(p.numel() for p in inner.parameters()), "world_size": world,
            "strategy": args.strategy if world > 1 else None,
            "config": vars(config), "data": corpus.source, "model_config": args.config, "resumed_from": args.resume,
            "converted": report.converted if report else {}, "left_alone": report.skipped if report else {},
            "init_from": args.init_from, "initial_val_loss": initial_val_loss,
            **result.to_dict(), "torch": torch.__version__,
        }
    finally:
        if world > 1:
            dist.shutdown()
    files = [runs.write_json(run_dir / "metrics.json", metrics),
             runs.training_plot(run_dir / "loss.png", {recipe.name: result}, f"lowprec train {recipe.name}",
                                start_step=result.start_step)]
    if result.checkpoints:
        files.append(Path(result.checkpoints[-1]))
    status = f"diverged at step {result.diverged_at}" if result.diverged_at is not None else "done"
    skipped = result.skipped_steps
    where = f" (non-finite gradients at step {', '.join(map(str, skipped[:10]))}{'...' if len(skipped) > 10 else ''})"
    print(f"{status}: final validation loss {result.final_val_loss:.4f} nats/byte, "
          f"median step {result.median_step_time_s * 1e3:.0f} ms, optimizer state {state_bytes / 2**20:.2f} MiB, "
          f"skipped steps {len(skipped)}{where if skipped else ''}, FP8 non-finite inputs {result.nonfinite_inputs}")
    if args.export:
        _save_export(inner, args.export, args.seq_len)
    _finish(run_dir, files)
    return 1 if result.diverged_at is not None else 0


def _run_settings(args: argparse.Namespace, corpus) -> dict:
    """The command-line settings a ``--resume`` must repeat, beyond what :func:`lowprec.training.run_settings`
    takes from the loop's config and the optimizer: the data, the model config and the bit plan
    (their contents, so a renamed copy of the same file is the same run)."""
    from lowprec.recipes import load_plan

    model_config = json.loads(Path(args.config).read_text()) if args.config else getattr(args, "model_config", None)
    return {"data": corpus.source, "model_config": model_config,
            "plan": load_plan(args.plan) if args.plan else None}


_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def _is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _HF_WEIGHT_FILES)


def _model_from_init(args: argparse.Namespace, recipe, quiet: bool = False):
    """``--init-from``: the model to fine-tune, converted, with trained weights.

    A Hugging Face checkpoint directory (``config.json`` and weights; local files only) is loaded
    with ``from_pretrained`` and converted in keep mode where the recipe unit-scales (unless
    ``--init`` says otherwise). A lowprec run (or checkpoint) is rebuilt as it was trained: its
    recorded model config, converted with its recorded recipe, its weights loaded; then ``--plan``
    is added on top (QAT fine-tuning). The recipe asked for must then convert as the run's did
    (its optimizer section may differ)."""
    from lowprec.recipes import with_overrides

    path = Path(args.init_from)
    if not path.exists():
        raise CLIError(f"--init-from {str(path)!r} does not exist")
    convert = _convert_quiet if quiet else _convert
    if path.is_dir() and _is_hf_checkpoint(path):
        tf = require("transformers", what="--init-from a Hugging Face checkpoint")
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CLIError(f"--init-from {str(path)!r}: not a loadable causal LM checkpoint ({e})") from None
        _check_seq_len(model, args.seq_len)
        args.model_config = model.config.to_dict()  # recorded with the run, for resume and later --init-from
        if recipe.unit_scaling.enabled and args.init is None:
            recipe = with_overrides(recipe, init="keep")
        return convert(model, recipe, args.plan)
    try:
        ck = find_checkpoint(path)
    except CLIError:
        raise CLIError(f"--init-from {str(path)!r} is neither a Hugging Face checkpoint directory (config.json and "
                       f"{' or '.join(_HF_WEIGHT_FILES[::2])}) nor a lowprec run or checkpoint") from None
    from lowprec.checkpoint import read_meta

    meta = read_meta(ck)
    trained = _recipe_from_args(None, argparse.Namespace(overrides=[], init=None), str(ck))
    if trained is None:
        raise CLIError(f"--init-from {str(ck)!r}: the run records no recipe; train it with lowprec train")
    ours, theirs = recipe.to_dict(), trained.to_dict()
    differs = sorted(f"{sec}.{k}" for sec in ours if isinstance(ours[sec], dict) and sec != "optimizer"
                     for k in ours[sec] if ours[sec][k] != theirs[sec][k] and (sec, k) != ("qat", "plan"))
    if differs:
        raise CLIError(f"--init-from {str(ck)!r}: the run was converted with recipe {trained.name!r}, which differs "
                       f"from this one in {', '.join(differs)}; fine-tune it under the same conversion")
    settings = meta.get("settings") or {}
    args.model_config = settings.get("model_config")  # recorded with this run too
    model = load_model(args.config or args.model_config, seed=args.seed)
    _check_seq_len(model, args.seq_len)
    model, _, _ = convert(model, trained, None)
    step = load_checkpoint(ck, model)
    if not quiet:
        print(f"initialised from {ck} (step {step})")
    if args.plan:
        model, _, _ = convert(model, trained, args.plan)
    return model, recipe, model.lowprec_report


def _convert_quiet(model, recipe, plan):
    from lowprec.recipes import convert

    model, report = convert(model, recipe, plan=plan, report=True)
    return model, recipe, report


def _report_interrupt(run_dir: Path, ck_dir: Path) -> None:
    latest = None
    if ck_dir.is_dir():
        latest = require("lowprec.checkpoint", "latest", what="checkpoints")(ck_dir)
    if latest is not None:
        step = int(Path(latest).name.split("-")[1].split(".")[0])
        where = f"the last completed checkpoint (step {step}) is {latest}; continue with --resume {run_dir}"
    else:
        where = "no checkpoint was completed"
    print(f"\ninterrupted by Ctrl-C; {where}", file=sys.stderr)
    print(f"run directory: {run_dir}")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path names: a checkpoint itself, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir() and not (p / ".metadata").exists() and not (p / "lowprec_meta.json").exists():
        latest = require("lowprec.checkpoint", "latest", what="checkpoints")
        for d in (p / "checkpoints", p):
            found = latest(d) if d.is_dir() else None
            if found is not None:
                return Path(found)
        raise CLIError(f"{str(p)!r} holds no checkpoint (no checkpoints/latest in it)")
    return p


def load_checkpoint(path: str | Path, model, optimizer=None) -> int:
    """Load weights (and optimizer state) from a checkpoint or run directory; returns its step."""
    load = require("lowprec.checkpoint", "load", what="loading checkpoints")
    meta = load(find_checkpoint(path), model, optimizer, strict_recipe=False)
    return int(meta["step"])


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (a count of steps, bytes, batches, processes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _check_lr_override(recipe, lr: float | None) -> None:
    """``--lr`` obeys the recipe schema's range for ``optimizer.lr`` (with the recipe's weight decay)."""
    if lr is None:
        return
    import dataclasses

    from lowprec.recipes import RecipeError

    try:
        dataclasses.replace(recipe.optimizer, lr=lr)
    except RecipeError as e:
        raise CLIError(f"--lr {lr!r}: {getattr(e, 'problem', e)}") from None


def _parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be comma-separated integers such as 2,3,4,8; got {text!r}") from None
    if not bits or any(b < 1 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be positive; got {text!r}")
    return bits


def _parse_training_format(text: str) -> str:
    from lowprec.sensitivity.training_formats import BLOCK_FORMATS

    if text not in BLOCK_FORMATS:
        raise argparse.ArgumentTypeError(f"training format must be one of {', '.join(BLOCK_FORMATS)}; got {text!r}")
    return text


def _parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of linear FLOPs in [0, 1], such as 0.1; got {text!r}")
    return value


def _load_weights(model, path: str | None) -> None:
    if path is not None:
        step = load_checkpoint(path, model)
        print(f"loaded weights from {find_checkpoint(path)} (step {step})")


def _save_export(model, out: str | Path, seq_len: int | None) -> None:
    """``lowprec.export`` the converted ``model`` and write it with ``save_pretrained`` to ``out``."""
    from lowprec.export import export

    plain = export(model.eval(), seq_len=seq_len)
    plain.save_pretrained(out)
    print(f"exported {type(plain).__name__} (plain weights, loads with transformers alone) to {out}")


def cmd_export(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``lowprec export RUN_DIR --out DIR``: the run's model rebuilt as it was trained (recorded model
    config, recipe and plan, latest checkpoint), folded back into its original class and saved."""
    ck = find_checkpoint(args.run)
    recipe = _recipe_from_args(None, argparse.Namespace(overrides=[], init=None), str(ck))
    if recipe is None:
        raise CLIError(f"{str(ck)!r}: the run records no recipe; only runs of lowprec train can be exported")
    from lowprec.checkpoint import read_meta

    settings = read_meta(ck).get("settings") or {}
    model = load_model(settings.get("model_config"))
    model, _, _ = _convert(model, recipe, plan=settings.get("plan"))
    step = load_checkpoint(ck, model)
    print(f"loaded {ck} (step {step})")
    _save_export(model, args.out, args.seq_len or settings.get("seq_len"))
    return 0


def _check_sensitivity_args(args: argparse.Namespace) -> None:
    """Resolve the defaults that depend on the mode (bit plan or training plan) and refuse options
    that belong to the other mode."""
    if args.for_training is None:
        if args.high_precision_budget is not None:
            raise CLIError("--high-precision-budget needs --for-training FORMAT (e.g. --for-training nvfp4)")
        args.method = args.method or "pqi"
        args.bits = args.bits or (2, 3, 4, 8)
        if args.avg_bits is None and args.size_budget_bytes is None:
            args.avg_bits = 4.0
        return
    from lowprec.sensitivity.training_formats import FORMAT_METHODS

    if args.recipe is not None:
        # the scores compare each layer under FORMAT against BF16 on the unconverted model; a recipe's
        # own cast would sit under the scored one and every score would measure two roundings
        raise CLIError(f"--recipe {args.recipe} converts the model before scoring; --for-training scores the "
                       f"unconverted model under {args.for_training} (drop --recipe)")
    given = [o for o, v in (("--bits", args.bits), ("--avg-bits", args.avg_bits),
                            ("--size-budget-bytes", args.size_budget_bytes)) if v is not None]
    if given:
        raise CLIError(f"{', '.join(given)} choose bits per layer; with --for-training the budget is "
                       f"--high-precision-budget (a fraction of linear FLOPs)")
    args.method = args.method or "measured"
    if args.method not in FORMAT_METHODS:
        raise CLIError(f"--method {args.method} does not score training formats; use one of {', '.join(FORMAT_METHODS)}")
    if args.high_precision_budget is None:
        args.high_precision_budget = 0.1


def _sensitivity_for_training(model, batches, args: argparse.Namespace, run_dir: Path) -> list[Path | None]:
    """``lowprec sensitivity --for-training FMT``: score every linear layer (LM head aside) under FMT
    and BF16, choose the layers kept in BF16 within the FLOP budget, and write
    ``high_precision_plan.json``, ``training_sensitivity.json`` / ``.png`` and ``metrics.json``."""
    from lowprec import runs
    from lowprec.sensitivity import (
        last_layers,
        save_high_precision_plan,
        score,
        select_high_precision,
    )

    fmt, budget = args.for_training, args.high_precision_budget
    t0 = time.perf_counter()
    report = score(model, runs.lm_loss_fn, batches, method=args.method, formats=(fmt, "bf16"),
                   progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(report)
    keep = select_high_precision(report, fmt, budget)
    share = report.flops_fraction(keep)
    files: list[Path | None] = [
        save_high_precision_plan(run_dir / "high_precision_plan.json", keep, fmt=fmt, budget=budget,
                                 method=args.method, flops=report.flops, scores=report.scores),
    ]
    report.to_json(run_dir / "training_sensitivity.json")
    files.append(run_dir / "training_sensitivity.json")
    if runs._pyplot() is not None:
        files.append(report.plot(run_dir / "training_sensitivity.png", keep=keep))
    removed = sum(report.gain(n, fmt) for n in keep)
    total_gain = sum(max(report.gain(n, fmt), 0.0) for n in report.layers)
    try:
        position = last_layers(report.layers, budget, report.flops)
        unit = "blocks"
        if not position:  # one block is over the budget (a shallow model): the last linears instead
            position, unit = last_layers(report.layers, budget, report.flops, whole_blocks=False), "linears"
    except ValueError:  # no transformer blocks in the layer names: no positional baseline
        position = None
    print(f"high precision (bf16) under {fmt}, budget {budget:g} of linear FLOPs: {len(keep)} of "
          f"{len(report.layers)} linear layers, {100 * share:.2f}% of linear FLOPs; scored with {args.method} "
          f"in {seconds:.1f} s")
    for n in keep:
        print(f"  {n}  ({100 * report.flops_fraction([n]):.2f}% FLOPs, removes {report.gain(n, fmt):.4g})")
    print(f"predicted loss increase removed: {removed:.4g} of {total_gain:.4g}"
          + ("" if position is None else
             f"; keeping the last {unit} instead (the positional rule) keeps {len(position)} layers and removes "
             f"{sum(report.gain(n, fmt) for n in position):.4g}"))
    files.append(runs.write_json(run_dir / "metrics.json", {
        "command": "sensitivity", "for_training": fmt, "high_precision_budget": budget, "method": args.method,
        "keep": keep, "flops_fraction": share, "predicted_removed": removed, "last_layers": position,
        "seconds": seconds, "batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "checkpoint": args.checkpoint,
    }))
    print(f"use the plan: lowprec train {fmt} --set cast.high_precision_plan="
          f"{(run_dir / 'high_precision_plan.json').resolve()}")
    return files


def cmd_sensitivity(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from lowprec import runs

    _check_sensitivity_args(args)
    recipe = _recipe_from_args(args.recipe, args, args.checkpoint)
    corpus = load_corpus(args.data, args.seq_len)
    model = load_model(args.config or _recorded_model_config(args.checkpoint), seed=args.seed)
    _check_seq_len(model, args.seq_len)
    if recipe is not None:
        model, _, _ = _convert(model, recipe)
    _load_weights(model, args.checkpoint)
    if args.checkpoint is None and args.train_steps == 0:
        print("note: scoring an untrained model; pass --checkpoint RUNDIR (from lowprec train) or --train-steps N")
    run_dir = runs.make_run_dir("sensitivity", args.out)
    if args.train_steps:
        import torch

        from lowprec.training import TrainConfig, train

        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
        res = train(model, opt, corpus, TrainConfig(steps=args.train_steps, batch_size=args.batch_size,
                                                    seq_len=args.seq_len, seed=args.seed,
                                                    eval_every=args.train_steps),
                    progress=not args.no_progress, desc="pre-train")
        print(f"trained {args.train_steps} steps first: validation loss {res.final_val_loss:.4f}")
    batches = runs.sensitivity_batches(corpus, args.batches, args.batch_size, args.seq_len)
    if args.for_training is not None:
        _finish(run_dir, _sensitivity_for_training(model, batches, args, run_dir))
        return 0
    out = runs.score_and_plan(model, batches, method=args.method, bits=args.bits, avg_bits=args.avg_bits,
                         size_budget_bytes=args.size_budget_bytes, run_dir=run_dir, progress=not args.no_progress)
    files = list(out["files"])
    files.append(runs.write_json(run_dir / "metrics.json", {
        "command": "sensitivity", "method": args.method, "bits": list(args.bits), "seconds": out["seconds"],
        "mean_bits": out["mean_bits"], "plan": out["plan"], "batches": args.batches,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "checkpoint": args.checkpoint,
    }))
    print(f"use the plan: lowprec train RECIPE --plan {run_dir / 'plan.json'}")
    _finish(run_dir, files)
    return 0


# ----------------------------------------------------------------------------------------------
# lowprec inspect
# ----------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from lowprec import numerics, runs
    from lowprec.data import batch_at

    recipe = _recipe_from_args(args.recipe, args, args.checkpoint)
    try:
        fwd, bwd, scaling = numerics.formats_for(recipe, args.format, args.grad_format, args.scaling)
    except ValueError as e:
        raise CLIError(str(e)) from None
    corpus = load_corpus(args.data, args.seq_len)
    model = load_model(args.config or _recorded_model_config(args.checkpoint), seed=args.seed)
    _check_seq_len(model, args.seq_len)
    if recipe is not None:
        model, recipe, _ = _convert(model, recipe)
    _load_weights(model, args.checkpoint)
    batch = batch_at(corpus.train, 0, args.batch_size, args.seq_len, args.seed)
    run_dir = runs.make_run_dir("inspect", args.out)
    table = numerics.numerics_table(model, batch, forward_format=fwd, backward_format=bwd, scaling=scaling)
    title = (f"numerics of {'recipe ' + repr(recipe.name) if recipe else 'the unconverted model'}: "
             f"forward {fwd}, gradients {bwd}, scaling {scaling!r}")
    print(title)
    print(numerics.format_rows(table))
    files: list[Path | None] = [runs.write_json(run_dir / "metrics.json", {
        "command": "inspect", "recipe": recipe.name if recipe else None, "forward_format": fwd,
        "backward_format": bwd, "scaling": scaling, "rows": table})]
    files.append(numerics.plot_rows(table, run_dir / "numerics.png", title=title))
    # Every op's output and input-gradient std (lowprec.inspect): what unit scaling is judged by.
    try:
        ins = require("lowprec.inspect", "inspect", what="the per-op std table")
    except FeatureMissing as e:
        print(f"(per-op table skipped: {e})")
    else:
        op_report = ins(model, batch, formats=tuple(dict.fromkeys((fwd, bwd))))
        (run_dir / "ops.txt").write_text(str(op_report) + "\n")
        files.append(run_dir / "ops.txt")
        if hasattr(op_report, "save_json"):
            files.append(Path(op_report.save_json(run_dir / "ops.json")))
        if args.all_ops:
            print(op_report)
        else:
            summary = op_report.summary() if hasattr(op_report, "summary") else ""
            print(f"\nevery op (unscaled casts; full table in {run_dir / 'ops.txt'}, or --all-ops):\n{summary}")
    _finish(run_dir, files)
    return 0


# ----------------------------------------------------------------------------------------------
# lowprec bench / recipes / demo
# ----------------------------------------------------------------------------------------------


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source tree lowprec runs from (benchmarks are not installed)."""
    import lowprec

    for cand in (Path(lowprec.__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"):
        if cand.is_dir():
            return cand
    raise CLIError("no benchmarks/ folder found: run lowprec bench from a clone of the lowprec repository")


def list_benchmarks() -> dict[str, Path]:
    """Every script in benchmarks/ by short name: ``bench_optim.py`` is ``optim``; other scripts
    (training comparisons such as ``train_fp8.py``) keep their stem. ``common.py`` is a helper."""
    out = {}
    for p in sorted(benchmarks_dir().glob("*.py")):
        if p.stem not in ("common", "__init__") and not p.stem.startswith("_"):
            out[p.stem.removeprefix("bench_")] = p
    return out


def cmd_bench(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from lowprec import runs

    found = list_benchmarks()
    if args.list or not found:
        if not found:
            print(f"no benchmarks in {benchmarks_dir()}")
        for title, group in (("benchmarks (run by default, as `make bench` does):", True),
                             ("other scripts (run by name; longer training comparisons):", False)):
            names = [n for n, p in found.items() if p.stem.startswith("bench_") == group]
            if names:
                print(title)
                for name in names:
                    print(f"  {name:<24} {_first_doc_line(found[name])}")
        return 0
    names = args.names or [n for n, p in found.items() if p.stem.startswith("bench_")]
    unknown = [n for n in names if n.removeprefix("bench_") not in found]
    if unknown:
        raise CLIError(f"unknown benchmark {', '.join(map(repr, unknown))}; available: {', '.join(found)}")
    run_dir = runs.make_run_dir("bench", args.out)
    env = {**os.environ, "LOWPREC_BENCH_DIR": str(run_dir.resolve())}
    rows = []
    for name in names:
        path = found[name.removeprefix("bench_")]
        print(f"== {path.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(path), *args.extra], env=env)
        rows.append({"benchmark": path.stem, "exit_status": rc, "seconds": time.perf_counter() - t0})
        if rc != 0:
            print(f"{path.name} exited with status {rc}", file=sys.stderr)
    files = [runs.write_json(run_dir / "metrics.json", {"command": "bench", "runs": rows}),
             runs.plot_bars(run_dir / "bench_times.png", [r["benchmark"] for r in rows],
                            [r["seconds"] for r in rows], title="lowprec bench: wall time", ylabel="seconds")]
    files += sorted(p for p in run_dir.glob("*.json") if p.name != "metrics.json")
    _finish(run_dir, files)
    return 0 if all(r["exit_status"] == 0 for r in rows) else 1


def _first_doc_line(path: Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except SyntaxError:
        return ""
    if not doc:
        return ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, on one line
    return first if len(first) <= 100 else first[:97].rsplit(" ", 1)[0] + " ..."


def cmd_recipes(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from lowprec.recipes import Recipe, available, resolve

    if args.show:
        recipe = resolve(args.show)
        print(f"# {recipe.source}")
        print(Path(recipe.source).read_text())
        return 0
    names = available()
    if not names:
        print("no recipes are shipped in this build")
        return 0
    print(f"{'recipe':<14} {'unit':<5} {'matmuls':<16} {'optimizer':<10} description")
    for name in names:
        r = Recipe.from_name(name)
        cast = r.cast.format if r.cast.format != "fp8" else f"fp8/{r.cast.scaling}"
        if r.cast.smooth_swiglu:
            cast += "+smooth"
        print(f"{name:<14} {'yes' if r.unit_scaling.enabled else 'no':<5} {cast:<16} {r.optimizer.name:<10} "
              f"{r.description}")
    print("\nlowprec recipes --show NAME prints a recipe file; copy it, edit it, pass its path instead of a name.")
    return 0


def cmd_demo(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from lowprec.demo import run_demo

    out = run_demo(steps=args.steps, batch_size=args.batch_size, out=args.out, seed=args.seed,
                   sensitivity=not args.no_sensitivity, sensitivity_method=args.sensitivity_method,
                   progress=not args.no_progress)
    return 0 if out["ok"] else 1


# ----------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------


def _add_model_data(p: argparse.ArgumentParser, *, batch_size: int, seq_len: int = 128) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--config", metavar="HF.json", help="a Hugging Face config.json to build a randomly initialised "
                   "causal LM from (default: the built-in demo Llama: 4 layers, hidden 256)")
    g.add_argument("--data", metavar="FILE", help="a text file to train on, read as bytes; the last 10%% is "
                   "validation (default: the Python standard library's source, every 10th file validation)")
    g.add_argument("--batch-size", type=_positive, default=batch_size, help="sequences per batch (default %(default)s)")
    g.add_argument("--seq-len", type=_positive, default=seq_len, help="bytes per sequence (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="model init and data order seed (default %(default)s)")


def _add_out(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", metavar="RUNDIR", help=f"run directory (default: runs/{command}-<UTC time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowprec",
        description="Low-precision training for PyTorch: unit-scaled FP8/FP16 models, 4-bit optimizer "
                    "states, per-layer bit selection.",
        epilog="Every command that does work writes metrics JSON and PNG plots into a run directory and "
               "prints its path. `lowprec COMMAND --help` describes each command.",
    )
    from lowprec import __version__

    parser.add_argument("--version", action="version", version=f"lowprec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="fp32 + AdamW vs unit-fp8 + AdamW4bit on real text, then a bit plan",
                       description="Train the demo Llama on the standard library's source text twice, in fp32 "
                                   "with torch AdamW and under the unit-fp8 recipe with AdamW4bit, print the "
                                   "side-by-side table (validation loss, optimizer-state memory, step time), "
                                   "write loss_curves.png, then score layer sensitivity and write a bit plan.")
    p.add_argument("--steps", type=_positive, default=300, help="training steps per run (default %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=16, help="sequences of 128 bytes per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for both runs (default %(default)s)")
    p.add_argument("--sensitivity-method", default="measured", choices=("measured", "pqi", "hawq"),
                   help="scorer for the bit plan (default %(default)s, the fastest)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity and bit-plan part")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_out(p, "demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model under a recipe (checkpointed; Ctrl-C keeps the last checkpoint)",
                       description="Convert a model with RECIPE and train it, evaluating on held-out text, "
                                   "checkpointing every --checkpoint-every steps. Ctrl-C stops the run and leaves "
                                   "the last completed checkpoint intact. With --nproc N the same command runs "
                                   "data-parallel under torchrun (or launch it yourself: torchrun "
                                   "--nproc-per-node N -m lowprec train RECIPE ...).")
    p.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name (lowprec recipes) or a path to a .toml file")
    _add_model_data(p, batch_size=16)
    p.add_argument("--steps", type=_positive, default=200, help="training steps (default %(default)s)")
    p.add_argument("--lr", type=float, help="base learning rate (default: the recipe's [optimizer] lr)")
    p.add_argument("--optimizer", choices=("AdamW", "AdamW4bit", "AdamW8bit", "AdamWFp8"),
                   help="override the recipe's optimizer")
    p.add_argument("--plan", metavar="PLAN.json", help="a bit plan (from lowprec sensitivity) for per-layer QAT")
    p.add_argument("--init-from", metavar="DIR", help="start from trained weights: a lowprec run directory (or "
                   "checkpoint), rebuilt as it was trained, or a Hugging Face checkpoint directory (local files), "
                   "converted in keep mode; with --plan this is QAT fine-tuning of the trained model")
    p.add_argument("--eval-every", type=_positive, default=50, help="validation every N steps (default %(default)s)")
    p.add_argument("--eval-batches", type=_positive, default=8, help="validation batches (default %(default)s)")
    p.add_argument("--checkpoint-every", type=_non_negative, default=50, metavar="N",
                   help="write RUNDIR/checkpoints/step-N.pt every N steps, atomically, keeping the last 2 "
                   "(default %(default)s; 0: only at the end)")
    p.add_argument("--resume", metavar="PATH", help="continue a run from its checkpoint (a run directory or "
                   "checkpoint); the recipe and options must be the run's (each difference is listed)")
    p.add_argument("--allow-change", action="append", default=[], metavar="NAME",
                   help="with --resume: accept this difference from the checkpoint's run on purpose, a run "
                   "setting (steps, optimizer.lr, ...) or a recipe field (recipe.cast.margin, ...); repeatable")
    p.add_argument("--nproc", type=_positive, default=1, metavar="N", help="processes for data-parallel training (torchrun)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="data parallelism under torchrun: DDP or FSDP2 fully_shard (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", metavar="DIR", help="at the end, write the trained model as a standard Hugging Face "
                   "checkpoint (scales folded into the weights: lowprec.export) to DIR")
    _add_recipe_options(p)
    _add_out(p, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a trained run as a standard Hugging Face checkpoint",
                       description="Rebuild RUN_DIR's model as it was trained (recorded model config, recipe and "
                                   "plan; latest checkpoint), fold every unit scale and residual weight back into "
                                   "plain weights of the original class (lowprec.export) and save_pretrained it "
                                   "to --out: it loads with transformers alone.")
    p.add_argument("run", metavar="RUN_DIR", help="a lowprec train run directory or checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the checkpoint")
    p.add_argument("--seq-len", type=_positive, help="key length the attention output scale is fixed at "
                   "(default: the run's sequence length)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sensitivity", help="score each layer's sensitivity to quantization and choose bits",
                       description="Score every linear layer of the model at each bit width (measured loss "
                                   "change, PQI path integral, or HAWQ-V2 Hessian trace), choose bits per layer "
                                   "under a budget with an integer program, and write the report, the plan "
                                   "(plan.json: qualified module name -> bits) and their charts. With --for-training FORMAT it "
                                   "instead scores each linear layer's weight and input in a block-scaled training "
                                   "format (and bf16) and writes high_precision_plan.json: the layers that stay in "
                                   "bf16 within --high-precision-budget of linear FLOPs.")
    _add_model_data(p, batch_size=8)
    p.add_argument("--recipe", help="convert the model with this recipe before scoring")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to score: a run directory or checkpoint from lowprec train")
    p.add_argument("--train-steps", type=_non_negative, default=0, help="train this many fp32 AdamW steps before scoring")
    p.add_argument("--method", choices=("pqi", "measured", "hawq"),
                   help="scorer (default pqi; measured with --for-training, where hawq is not available)")
    p.add_argument("--bits", type=_parse_bits, help="candidate bit widths (default 2,3,4,8)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--avg-bits", type=float, help="average bits per weight (default 4.0)")
    budget.add_argument("--size-budget-bytes", type=_positive, help="total weight bytes allowed instead of --avg-bits")
    p.add_argument("--batches", type=_positive, default=2, help="batches the scorer averages over (default %(default)s)")
    training = p.add_argument_group("training precision (instead of bits per layer)")
    training.add_argument("--for-training", type=_parse_training_format, metavar="FORMAT",
                          help="score every linear layer's weight and input in FORMAT (nvfp4, mxfp8, mxfp8_e5m2, "
                               "mxfp4) and in bf16, choose the layers that stay in bf16, and write "
                               "high_precision_plan.json for a block-scaled recipe")
    training.add_argument("--high-precision-budget", type=_parse_fraction, metavar="FRACTION",
                          help="largest share of linear FLOPs kept in bf16, in [0, 1] (default 0.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_recipe_options(p)
    _add_out(p, "sensitivity")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("inspect", help="the numerics table: std, amax, saturated and underflowed fractions",
                       description="Run one batch forward and backward through the (converted) model and print, "
                                   "for every linear layer's weight, input, weight gradient and output gradient: "
                                   "std, amax, and the fractions that saturate (clip at the format's max) or "
                                   "underflow (round to zero) when cast to the recipe's formats with its scaling. "
                                   "MXFP8 and NVFP4 recipes are shown under their own block scaling (1x32 and "
                                   "1x16 blocks along each tensor's last dimension). A recipe without "
                                   "low-precision casts is shown against E4M3/E5M2 with no scaling: how well the "
                                   "tensors fit FP8 as they are.")
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help="shipped recipe name or .toml path (default: unconverted)")
    _add_model_data(p, batch_size=4)
    p.add_argument("--checkpoint", metavar="PATH", help="weights to inspect (a run directory or checkpoint)")
    p.add_argument("--format", help="forward format override (e4m3, e5m2, e2m1, fp16, bf16)")
    p.add_argument("--grad-format", help="gradient format override (default: the recipe's backward format)")
    p.add_argument("--scaling", choices=("none", "current", "rowwise", "blockwise", "mx", "nvfp4"),
                   help="scaling override (mx: OCP MX 1x32 blocks, E8M0 scales; nvfp4: 1x16 blocks, E4M3 scales "
                        "and a tensor scale)")
    p.add_argument("--all-ops", action="store_true", help="also print every op's table (std of outputs and "
                   "input gradients, saturation with scale 1); it is always written to RUNDIR/ops.txt")
    _add_recipe_options(p)
    _add_out(p, "inspect")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="run the benchmarks (benchmarks/*.py)",
                       description="Run the named benchmark scripts from benchmarks/ (by default every "
                                   "bench_*.py, as `make bench` does); each prints its table and writes its JSON "
                                   "into the run directory. --list shows them all.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run, e.g. optim fp8 (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to each benchmark script")
    _add_out(p, "bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("recipes", help="list the shipped recipes",
                       description="List the shipped recipes. A recipe is a TOML file (schema: lowprec/recipes.py); "
                                   "--show NAME prints one to copy and edit.")
    p.add_argument("--show", metavar="NAME", help="print this recipe's TOML file")
    p.set_defaults(func=cmd_recipes)
    return parser


def _quiet_third_party_import_noise() -> None:
    """transformers imports torchao, which logs warnings about optional CUDA libraries it cannot
    load on a CPU machine, and torch logs pytree deprecations: harmless, and confusing in a CLI."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowprec`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party_import_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from lowprec.recipes import RecipeError

    user_errors: tuple[type[BaseException], ...] = (CLIError, FeatureMissing, RecipeError)
    if args.command in ("train", "sensitivity", "inspect"):
        # a checkpoint that is missing, corrupt or does not fit the model
        from lowprec.checkpoint import CheckpointError

        user_errors += (CheckpointError,)
    try:
        return int(args.func(args, argv) or 0)
    except user_errors as e:
        print(f"lowprec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nlowprec {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
