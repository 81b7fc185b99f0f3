"""Every Triton kernel, compiled ahead of time for sm_80, sm_89, sm_90 and sm_100 on this CPU.

The launches come from the launchers themselves (:mod:`lowprec.kernels.aot_cases` calls each one
over its whole argument domain and records what it would launch). By default every kernel is
compiled at a covering subset of those launches (every dtype, constexpr value and divisibility
class at least once); ``LOWPREC_AOT_FULL=1`` compiles all of them. Results are cached on disk
(``$LOWPREC_CACHE_DIR``), so a second run reads JSON.

Asserted per (launch, target):
* it compiles, unless the dispatch provably never sends it there (E4M3 input below sm_89:
  :func:`lowprec.kernels.dispatch.triton_loads`), in which case the failure must be exactly that;
* no stack or local memory (no register spills);
* on sm_90, the streaming kernels' bulk loads and stores are vector instructions (``.v2``/``.v4``)
  on aligned shapes (packed 4-bit codes: vectors or whole 32-bit words, ``aot_cases.WORD_OK``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lowprec.kernels import (
    aot_check,  # noqa: E402
    dispatch,  # noqa: E402
)

pytestmark = pytest.mark.skipif(not aot_check.available(), reason="Triton's ptxas / cuobjdump not found")
ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("LOWPREC_AOT_FULL") == "1"


def _optimizer_pairs():
    from lowprec.optim.adamw import AdamW4bit, AdamW8bit, AdamWFp8

    return [(c.M_FORMAT, c.V_FORMAT) for c in (AdamW4bit, AdamW8bit, AdamWFp8)]


@pytest.fixture(scope="module")
def compiled():
    from lowprec.kernels import aot_cases

    launches = aot_cases.all_launches(_optimizer_pairs())
    chosen = launches if FULL else aot_cases.covering_subset(launches)
    jobs = [(launch, target) for launch in chosen for target in aot_check.TARGETS]
    t0 = time.perf_counter()
    reports = aot_check.compile_many(jobs)
    elapsed = time.perf_counter() - t0
    print(f"\ncompiled {len(jobs)} (launch, target) pairs of {len(launches)} launches in {elapsed:.1f} s")
    return list(zip(jobs, reports))


def test_every_kernel_of_the_package_is_covered(compiled):
    """Each @triton.jit kernel with a launcher in kernels/ is compiled at least once per target."""
    import re

    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        src = path.read_text()
        defined |= set(re.findall(r"@triton\.jit\s+def (_\w+_kernel)\(", src))
    seen = {(job[0].kernel, job[1]) for job, _ in compiled}
    missing = {(k, t) for k in defined for t in aot_check.TARGETS} - seen
    assert defined and not missing, sorted(missing)


def test_compiles_everywhere_the_dispatch_sends_it(compiled):
    from lowprec.kernels.aot_cases import launch_dtypes

    bad = []
    for (launch, target), rep in compiled:
        cap = divmod(aot_check.TARGETS[target], 10)
        routed_away = any(not dispatch.triton_loads(d, cap) for d in launch_dtypes(launch))
        if rep.ok and routed_away:
            continue  # compiles anyway (harmless)
        if not rep.ok and not (routed_away and "not supported in this architecture" in rep.error):
            bad.append(f"{target} {launch.kernel} [{launch.note}]: {rep.error}")
    assert not bad, "\n".join(bad[:20])
    # the one known gap is really there, and really routed away
    refused = [rep for (launch, target), rep in compiled if not rep.ok]
    assert refused and all(rep.target == "sm_80" for rep in refused)


def test_no_register_spills_or_local_memory(compiled):
    spilled = [f"{t} {launch.kernel} [{launch.note}]: stack {r.stack} local {r.local} regs {r.regs}"
               for (launch, t), r in compiled if r.ok and r.spills]
    assert not spilled, "\n".join(spilled[:20])


def _aligned(launch) -> bool:
    ints = [a for a in launch.args if isinstance(a, int) and not isinstance(a, bool)]
    tensors = [a for a in launch.args if isinstance(a, aot_check.TensorArg)]
    ints += [v for k, v in launch.kwargs if k == "BLOCK_SIZE"]  # a block is a row of the tile
    return all(i % 16 == 0 or i == 1 for i in ints) and all(t.aligned for t in tensors) and "transposed" not in launch.note


def test_streaming_kernels_move_their_bulk_data_in_vectors_on_sm90(compiled):
    from lowprec.kernels.aot_cases import STREAMING, WORD_OK

    checked = set()
    bad = []
    for (launch, target), rep in compiled:
        if target != "sm_90" or launch.kernel not in STREAMING or not rep.ok or not _aligned(launch):
            continue
        loads, stores, _ = STREAMING[launch.kernel]
        checked.add(launch.kernel)
        for name, kind in [(p, "ld") for p in loads] + [(p, "st") for p in stores]:
            ok = rep.pointer_in_words(name, kind) if (launch.kernel, name) in WORD_OK else \
                rep.pointer_vectorised(name, kind)
            if not ok:
                bad.append(f"{launch.kernel} [{launch.note}] {kind} {name}: {rep.by_pointer.get(name)}")
    assert checked == set(STREAMING), set(STREAMING) - checked
    assert not bad, "\n".join(bad[:20])


def test_ptx_analysis_counts_widths_and_pointers():
    """The analyser on a hand-written snippet (so a wrong regex cannot pass the checks above)."""
    ptx = "\n".join(["\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
                     "\tld.global.b8 { %rs1 }, [ %rd2 + 0 ];",
                     "\t@%p2 st.global.v2.b16 [ %rd3 + 0 ], { %rs2, %rs3 };",
                     "\t@%p1 atom.global.gpu.acq_rel.max.s32 %r5, [ %rd4 + 0 ], %r6;"])
    loads, stores, atomics = aot_check.analyse_ptx(ptx)
    assert (loads.vector, loads.scalar, loads.vector_bytes, loads.scalar_bytes) == (1, 1, 16, 1)
    assert (stores.vector, stores.vector_bytes, atomics) == (1, 4, 1)


# ----------------------------------------------------------------------------------------------
# The routing that makes the sm_80 gap safe
# ----------------------------------------------------------------------------------------------


def test_dispatch_never_sends_e4m3_below_sm89(monkeypatch):
    from lowprec.kernels.codebook import codebook_quantize
    from lowprec.kernels.fp8_cast import scaled_fp8_cast

    assert not dispatch.triton_loads(torch.float8_e4m3fn, (8, 0))
    assert dispatch.triton_loads(torch.float8_e4m3fn, (8, 9)) and dispatch.triton_loads(torch.float8_e5m2, (8, 0))
    assert not dispatch.triton_loads(torch.float64, None)
    # CPU tensors under the interpreter, forced to Triton, on a faked sm_80: E4M3 still goes to
    # the reference (same results), float32 to the kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWPREC_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "capability_of", lambda device: (8, 0))
    x8 = torch.randn(4, 32).to(torch.float8_e4m3fn)
    assert dispatch.choose_backend(x8) == "torch"
    assert dispatch.choose_backend(x8.float()) == "triton"
    assert dispatch.choose_backend(x8.to(torch.float8_e5m2)) == "triton"
    monkeypatch.setattr(dispatch, "capability_of", lambda device: (9, 0))
    assert dispatch.choose_backend(x8) == "triton"
    monkeypatch.setattr(dispatch, "capability_of", lambda device: (8, 0))
    monkeypatch.delenv("LOWPREC_KERNELS")
    # the launchers with an explicit backend honour it too: no kernel is launched
    import triton.runtime.jit as jit

    def boom(*a, **k):
        raise AssertionError("a Triton kernel was launched with an E4M3 input on sm_80")

    monkeypatch.setattr(jit.JITFunction, "run", boom)
    q = scaled_fp8_cast(x8, "e5m2", backend="triton")
    assert q.data.dtype == torch.float8_e5m2
    codebook_quantize(x8, "nf4", 32, backend="triton")


def test_gpu_check_dry_run_compiles_and_lists_the_timings():
    env = dict(os.environ, LOWPREC_AOT_WORKERS="2")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--target", "sm_90"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for what in ("_adamw_blocks_kernel", "_codebook_quant_kernel", "_cast_transpose_kernel", "torch fused AdamW",
                 "fp8 linear", "4096", "8192", "copy bandwidth"):
        assert what in out, (what, out[-3000:])
    print(f"dry run {time.perf_counter() - t0:.1f} s")
