"""Compile Triton kernels ahead of time for a GPU this machine does not have, and measure them.

``triton.compile`` runs its whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ``ptxas``)
without a device when it is given a :class:`~triton.backends.compiler.GPUTarget`. This module
turns a *launch* of a kernel (the arguments a launcher passes, captured without running it) into
exactly the specialisation the Triton runtime would compile on a CUDA device (types from the
tensors' dtypes, 16-byte divisibility of pointers and integers, constexprs, launch options), then
compiles it for ``sm_80``/``sm_89``/``sm_90``/``sm_100`` and reports what decides speed before a
GPU is at hand:

* registers per thread, shared memory, and stack / local memory (spills) from
  ``cuobjdump --dump-resource-usage`` on the cubin;
* every global load and store in the PTX, by width (``ld.global.v4.b32`` moves 16 bytes per
  thread, ``ld.global.b8`` one), attributed to the kernel source line it came from (Triton's
  ``.loc`` directives), so a test can ask "is the load of ``p_ptr`` vectorised?".

Results are cached on disk (``$LOWPREC_CACHE_DIR`` or ``~/.cache/lowprec``, ``aot/`` below it),
keyed by the kernel's source hash (Triton's ``cache_key``, which covers the functions it calls),
the specialisation and the target; misses compile in a pool of worker processes (2 by default:
the CI machine has 2 cores).

Use::

    with capture_launches() as launches:
        some_launcher(x, ...)                   # kernels are recorded, not run
    reports = compile_many([(l, "sm_90") for l in launches])
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TARGETS: dict[str, int] = {"sm_80": 80, "sm_89": 89, "sm_90": 90, "sm_100": 100}
CACHE_VERSION = 1
_MEM_RE = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")
_ATOM_RE = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.global")
_ACCESS_RE = re.compile(r"tl\.(load|store|atomic_\w+)\(\s*(\w+)")


# ----------------------------------------------------------------------------------------------
# Capturing launches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issued it: the kernel (found again by module and name, so a
    worker process can rebuild it), the positional and keyword arguments with every tensor
    replaced by a :class:`TensorArg`, and the grid. ``note`` says which launcher call made it."""

    module: str
    module_file: str
    kernel: str
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs
    grid: tuple
    note: str = ""

    @property
    def name(self) -> str:
        return self.kernel


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """What specialisation needs of a tensor argument: its dtype and 16-byte alignment."""

    dtype: str  # torch dtype name, e.g. "float32"
    aligned: bool = True

    def fake(self):
        """A stand-in the Triton binder specialises like the real tensor (dtype, data_ptr)."""
        import torch

        return _FakeTensor(getattr(torch, self.dtype), 0 if self.aligned else 1)


class _FakeTensor:
    def __init__(self, dtype, ptr: int) -> None:
        self.dtype = dtype
        self._ptr = ptr

    def data_ptr(self) -> int:
        return self._ptr


def _freeze(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return TensorArg(str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@contextlib.contextmanager
def capture_launches(note: str = "") -> Iterator[list[Launch]]:
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of running.

    Works for every ``@triton.jit`` kernel (it patches ``JITFunction.run``), so launchers are
    exercised unchanged: whatever constexprs, dtypes and options they derive is what is captured.
    """
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        mod = sys.modules[self.fn.__module__]
        g = grid if not callable(grid) else ("callable",)
        launches.append(Launch(self.fn.__module__, getattr(mod, "__file__", "") or "", self.fn.__name__,
                               tuple(_freeze(a) for a in args),
                               tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())),
                               tuple(int(x) for x in g) if g != ("callable",) else g, note))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def unique_launches(launches: Sequence[Launch]) -> list[Launch]:
    """One launch per distinct specialisation (grid and note ignored), in first-seen order."""
    seen: dict[tuple, Launch] = {}
    for launch in launches:
        key = (launch.module, launch.kernel, _spec_args(launch))
        seen.setdefault(key, launch)
    return list(seen.values())


def _spec_args(launch: Launch) -> tuple:
    """The arguments reduced to what specialisation sees: ints by their 16-divisibility / == 1."""
    out = []
    for a in launch.args:
        if isinstance(a, bool) or not isinstance(a, int):
            out.append(a)
        else:
            out.append(("int", a == 1, a % 16 == 0, -2**31 <= a < 2**31))
    return tuple(out), launch.kwargs


# ----------------------------------------------------------------------------------------------
# Compiling one launch for one target
# ----------------------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """Path of an NVIDIA tool (``ptxas``, ``cuobjdump``): Triton's bundled copy, else ``$PATH``."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except Exception:
        pass
    return shutil.which(name)


def available() -> bool:
    """Whether AOT compilation can run here: Triton importable, ``ptxas`` and ``cuobjdump`` found."""
    try:
        import triton  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception:
        return False
    return tool("ptxas") is not None and tool("cuobjdump") is not None


def _load_kernel(module: str, module_file: str):
    if module in sys.modules:
        return sys.modules[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        spec = importlib.util.spec_from_file_location(module, module_file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return mod


def _specialise(launch: Launch, arch: int):
    """``(kernel, src, target, options)`` exactly as ``JITFunction.run`` would build them."""
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(_load_kernel(launch.module, launch.module_file), launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    thaw = lambda v: v.fake() if isinstance(v, TensorArg) else v  # noqa: E731
    kwargs = {k: thaw(v) for k, v in launch.kwargs}
    bound, specialization, options = binder(*(thaw(a) for a in launch.args), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, ASTSource(kernel, signature, constexprs, attrs), target, options


@dataclasses.dataclass
class MemOps:
    """Global memory instructions of one kind in the PTX (static counts, per thread)."""

    vector: int = 0  # .v2 / .v4 / .v8
    scalar: int = 0
    vector_bytes: int = 0  # bytes one thread moves, summed over the instructions
    scalar_bytes: int = 0
    by_width: dict[str, int] = dataclasses.field(default_factory=dict)  # "v4.b32" -> count

    def add(self, vec: int, bits: int) -> None:
        nbytes = vec * bits // 8
        if vec > 1:
            self.vector += 1
            self.vector_bytes += nbytes
        else:
            self.scalar += 1
            self.scalar_bytes += nbytes
        key = (f"v{vec}." if vec > 1 else "") + f"b{bits}"
        self.by_width[key] = self.by_width.get(key, 0) + 1


@dataclasses.dataclass
class Report:
    """What compiling one launch for one target gave."""

    kernel: str
    target: str
    ok: bool
    error: str = ""
    regs: int = -1
    shared: int = -1
    stack: int = -1
    local: int = -1
    spills: int = -1  # stack + local bytes: > 0 means spilled registers (or a local array)
    num_warps: int = 0
    loads: MemOps = dataclasses.field(default_factory=MemOps)
    stores: MemOps = dataclasses.field(default_factory=MemOps)
    atomics: int = 0
    by_pointer: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    note: str = ""
    constexprs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Report:
        d = dict(d)
        d["loads"] = MemOps(**d["loads"])
        d["stores"] = MemOps(**d["stores"])
        return cls(**d)

    def pointer_vectorised(self, name: str, kind: str = "ld") -> bool:
        """Every ``kind`` (``ld``/``st``) of pointer argument ``name`` is a vector instruction
        (and there is at least one)."""
        d = self.by_pointer.get(name, {})
        return d.get(f"{kind}_vector", 0) > 0 and d.get(f"{kind}_scalar", 0) == 0

    def pointer_in_words(self, name: str, kind: str = "ld") -> bool:
        """Every ``kind`` access of pointer ``name`` moves at least 4 bytes per thread (a vector,
        or one 32-bit word), and there is at least one."""
        d = self.by_pointer.get(name, {})
        n_vec, n_sca = d.get(f"{kind}_vector", 0), d.get(f"{kind}_scalar", 0)
        return n_vec + n_sca > 0 and (n_sca == 0 or d.get(f"{kind}_scalar_bytes", 0) >= 4 * n_sca)


def _width(mods: str) -> tuple[int, int]:
    parts = mods.split(".")
    vec = next((int(x[1:]) for x in parts if re.fullmatch(r"v\d+", x)), 1)
    bits = next((int(x[1:]) for x in parts if re.fullmatch(r"[bufs]\d+", x)), 32)
    return vec, bits


def analyse_ptx(ptx: str) -> tuple[MemOps, MemOps, int]:
    """``(loads, stores, atomics)``: the global memory instructions of a PTX module by width."""
    loads, stores = MemOps(), MemOps()
    atomics = 0
    for line in ptx.splitlines():
        if _ATOM_RE.match(line):
            atomics += 1
            continue
        m = _MEM_RE.match(line)
        if m:
            (loads if m.group(2) == "ld" else stores).add(*_width(m.group(3)))
    return loads, stores, atomics


_LL_ASM_RE = re.compile(r'asm sideeffect "([^"]*)".*!dbg !(\d+)')
_LL_MEM_RE = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")
_LL_LOC_RE = re.compile(r"^!(\d+) = !DILocation\(line: (\d+), column: \d+, scope: !(\d+)")
_LL_SCOPE_RE = re.compile(r"^!(\d+) = (?:distinct )?!DI(?:Subprogram|LexicalBlock\w*)\(.*?file: !(\d+)")
_LL_FILE_RE = re.compile(r'^!(\d+) = !DIFile\(filename: "([^"]*)", directory: "([^"]*)"')


def accesses_by_pointer(llir: str, sources: dict[str, list[str]] | None = None) -> dict[str, dict[str, int]]:
    """Global loads/stores per pointer argument, from the LLVM IR Triton emits before PTX.

    Each ``ld.global``/``st.global`` there is an inline-asm call carrying the debug location of
    the ``tl.load``/``tl.store`` it came from (innermost, through inlined helpers); the pointer
    is the first name in that source line's ``tl.load(`` / ``tl.store(`` call (``p_ptr`` in
    ``tl.load(p_ptr + offs)``). Counts ``ld_vector``, ``ld_scalar``, ``st_vector``, ``st_scalar``
    and the bytes per thread of each (``..._bytes``). (PTX ``.loc`` lines are not used: after
    scheduling, the directive before an instruction can belong to a neighbouring line.)"""
    locs: dict[str, tuple[int, str]] = {}
    scopes: dict[str, str] = {}
    files: dict[str, str] = {}
    for line in llir.splitlines():
        if not line.startswith("!"):
            continue
        if m := _LL_LOC_RE.match(line):
            locs[m.group(1)] = (int(m.group(2)), m.group(3))
        elif m := _LL_SCOPE_RE.match(line):
            scopes[m.group(1)] = m.group(2)
        elif m := _LL_FILE_RE.match(line):
            files[m.group(1)] = os.path.join(m.group(3), m.group(2))
    cache: dict[str, list[str]] = dict(sources or {})
    by_ptr: dict[str, dict[str, int]] = {}
    for line in llir.splitlines():
        m = _LL_ASM_RE.search(line)
        if not m:
            continue
        for mm in _LL_MEM_RE.finditer(m.group(1).replace("\\0A", "\n").replace("\\09", " ")):
            vec, bits = _width(mm.group(2))
            loc = locs.get(m.group(2))
            path = files.get(scopes.get(loc[1], ""), "") if loc else ""
            ptr = _pointer_at((path, loc[0]) if loc else None, cache) or "?"
            d = by_ptr.setdefault(ptr, {})
            key = f"{mm.group(1)}_{'vector' if vec > 1 else 'scalar'}"
            d[key] = d.get(key, 0) + 1
            d[f"{key}_bytes"] = d.get(f"{key}_bytes", 0) + vec * bits // 8
    return by_ptr


def _pointer_at(loc: tuple[str, int] | None, cache: dict[str, list[str]]) -> str | None:
    if loc is None or not loc[0]:
        return None
    path, lineno = loc
    if path not in cache:
        try:
            cache[path] = Path(path).read_text().splitlines()
        except OSError:
            cache[path] = []
    lines = cache[path]
    if not 0 < lineno <= len(lines):
        return None
    m = _ACCESS_RE.search(lines[lineno - 1])
    return m.group(2) if m else None


def _resource_usage(cubin: bytes, name: str) -> dict[str, int]:
    exe = tool("cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        out = subprocess.run([exe, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60).stdout
    usage: dict[str, int] = {}
    for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out):
        usage[key] = int(value)
    return usage


def _compile_one(launch: Launch, target: str) -> dict:
    """Worker: compile ``launch`` for ``target`` and return a :class:`Report` as JSON."""
    arch = TARGETS[target]
    rep = Report(kernel=launch.kernel, target=target, ok=False, note=launch.note)
    try:
        import triton

        kernel, src, tgt, options = _specialise(launch, arch)
        rep.num_warps = options.num_warps
        names = kernel.arg_names
        rep.constexprs = {names[k[0]]: (v if isinstance(v, (int, float, bool, str)) else str(v))
                          for k, v in src.constants.items() if len(k) == 1}
        compiled = triton.compile(src, target=tgt, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - the report carries the reason
        msg = str(exc).strip().splitlines()
        rep.error = f"{type(exc).__name__}: {msg[-1] if msg else ''}"[:600]
        return rep.to_json()
    usage = _resource_usage(compiled.asm["cubin"], launch.kernel)
    rep.ok = True
    rep.regs = usage.get("REG", -1)
    rep.shared = usage.get("SHARED", -1)
    rep.stack = usage.get("STACK", -1)
    rep.local = usage.get("LOCAL", -1)
    rep.spills = max(rep.stack, 0) + max(rep.local, 0)
    rep.loads, rep.stores, rep.atomics = analyse_ptx(compiled.asm["ptx"])
    rep.by_pointer = accesses_by_pointer(compiled.asm["llir"])
    return rep.to_json()


# ----------------------------------------------------------------------------------------------
# Cache and pool
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("LOWPREC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowprec")
    return Path(root) / "aot"


def cache_key(launch: Launch, target: str) -> str:
    """Source hash of the kernel (and what it calls) + specialisation + target + tool versions."""
    import triton

    kernel = getattr(_load_kernel(launch.module, launch.module_file), launch.kernel)
    blob = json.dumps([CACHE_VERSION, triton.__version__, kernel.cache_key, launch.kernel, repr(_spec_args(launch)),
                       target], default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def compile_many(jobs: Sequence[tuple[Launch, str]], workers: int | None = None,
                 use_cache: bool = True) -> list[Report]:
    """Compile every ``(launch, target)``; cached results are read, misses compile in a process
    pool of ``workers`` (``$LOWPREC_AOT_WORKERS``, default 2). Order follows ``jobs``."""
    workers = workers or int(os.environ.get("LOWPREC_AOT_WORKERS", "2"))
    root = cache_dir()
    results: list[Report | None] = [None] * len(jobs)
    todo: list[int] = []
    keys: list[str] = []
    for i, (launch, target) in enumerate(jobs):
        key = cache_key(launch, target)
        keys.append(key)
        path = root / f"{key}.json"
        if use_cache and path.exists():
            try:
                rep = Report.from_json(json.loads(path.read_text()))
                rep.note = launch.note
                results[i] = rep
                continue
            except (ValueError, TypeError, KeyError):
                pass
        todo.append(i)
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        if workers <= 1 or len(todo) == 1:
            outs = [_compile_one(*jobs[i]) for i in todo]
        else:
            import multiprocessing

            # fork: the workers only compile (no torch threads, no CUDA), and unlike spawn it
            # works from any __main__ (python -c, stdin, pytest)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                outs = list(pool.map(_compile_one, *zip(*(jobs[i] for i in todo)), chunksize=1))
        for i, out in zip(todo, outs):
            results[i] = Report.from_json(out)
            if use_cache:
                tmp = root / f"{keys[i]}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(out))
                os.replace(tmp, root / f"{keys[i]}.json")
    return [r for r in results if r is not None]


def compile_launch(launch: Launch, target: str = "sm_90", use_cache: bool = True) -> Report:
    """One launch, one target (see :func:`compile_many`)."""
    return compile_many([(launch, target)], workers=1, use_cache=use_cache)[0]


def static_bytes_per_element(rep: Report, elements_per_program: int) -> tuple[float, float]:
    """Static estimate of global bytes moved per element by vector and by scalar instructions:
    per-thread bytes of every ld/st in the PTX (each executed once: loop-free kernels) times the
    threads of a program, over the elements that program owns. Redundant lanes (threads that
    repeat another's access) show up as bytes above the data's own size."""
    threads = 32 * max(rep.num_warps, 1)
    vec = rep.loads.vector_bytes + rep.stores.vector_bytes
    sca = rep.loads.scalar_bytes + rep.stores.scalar_bytes
    return threads * vec / elements_per_program, threads * sca / elements_per_program


__all__ = ["TARGETS", "Launch", "Report", "MemOps", "TensorArg", "available", "analyse_ptx", "cache_dir",
           "accesses_by_pointer", "capture_launches", "compile_launch", "compile_many", "static_bytes_per_element", "tool",
           "unique_launches"]
