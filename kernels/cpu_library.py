"""Build and load lowprec's C kernels for the CPU (``kernels/*.c``) with the system compiler.

A kernel is plain C11 without PyTorch headers, so it compiles in about a second, on first use,
for the machine it runs on (``-march=native``), and is called through :mod:`ctypes` (which
releases the GIL). The shared library is cached under ``$LOWPREC_CACHE_DIR`` (default
``~/.cache/lowprec``), keyed by the source, the flags, the compiler's version and the CPU, and
written atomically, so concurrent processes (``torchrun`` ranks) can build it at once.

No compiler, or a failed build, is a speed problem and never a wrong result: :func:`load`
returns ``None`` after one warning and callers fall back to their PyTorch path.
``LOWPREC_C_KERNELS=0`` turns the C kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

ENV_DISABLE = "LOWPREC_C_KERNELS"
ENV_CACHE = "LOWPREC_CACHE_DIR"
SOURCE_DIR = Path(__file__).resolve().parent

# -ffp-contract=off: no fused multiply-add, so every float32 operation rounds as the reference's
# does. -fno-math-errno (no errno store after sqrtf) and -fno-trapping-math (floating-point
# operations may be computed speculatively and selected) let the loops vectorise; neither changes
# a rounding (that would be -ffast-math's reassociation or -frounding-math, both off).
_BASE_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# Tried in order: tuned for this CPU, then generic (a compiler without -march=native).
_TARGET_FLAGS = (["-march=native"], [])


def enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags (the library is built with -march=native)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lowprec")
    return Path(root).expanduser()


def _build(cc: str, source: Path, out: Path, flags: list[str]) -> str | None:
    """Compile ``source`` to ``out`` atomically; the compiler's error text on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            return (res.stderr or res.stdout).strip()[-2000:]
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(name: str, target_flags: list[str] | tuple[str, ...] = ("-march=native",)) -> Path:
    """The shared library of ``kernels/<name>.c`` built with the base flags plus ``target_flags``
    (cached); raises ``RuntimeError`` with the compiler's message when it cannot be built."""
    source = SOURCE_DIR / f"{name}.c"
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    if not source.exists():
        raise RuntimeError(f"{source} is missing")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    flags = _BASE_FLAGS + list(target_flags)
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), cc, version, _cpu_fingerprint()])
                         .encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{name}-{key}.so"
    if not lib.exists():
        err = _build(cc, source, lib, flags)
        if err is not None:
            raise RuntimeError(f"{cc} {' '.join(flags)} failed: {err}")
    return lib


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``kernels/<name>.c`` as a :class:`ctypes.CDLL`, built on first use (tuned for
    this CPU, else generic); ``None`` when C kernels are off or cannot be built here, with one
    warning saying why."""
    if not enabled():
        return None
    errors = []
    for target in _TARGET_FLAGS:
        try:
            return ctypes.CDLL(str(build(name, target)))
        except (RuntimeError, OSError) as e:
            errors.append(str(e))
    warnings.warn(f"lowprec: C kernel {name} unavailable, using the PyTorch path: " + " | ".join(errors),
                  RuntimeWarning, stacklevel=2)
    return None
