"""Where a Triton kernel test runs, and the child process that runs it on a CPU.

A kernel test file runs its kernel cases only under ``TRITON_INTERPRET=1`` or on CUDA. On a CPU
the parent test session skips them and :func:`run_in_interpreter` runs the whole file again in a
child process with ``TRITON_INTERPRET=1`` (the interpreter must be chosen before triton is
imported, so it cannot be switched on inside one process), then checks that the child's kernel
cases really ran, not merely that nothing failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
KERNELS_RUN_HERE = INTERPRETED or ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not KERNELS_RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child or on CUDA")
parent_only = pytest.mark.skipif(INTERPRETED, reason="this is the child")


def run_in_interpreter(test_file: str, min_passed: int) -> None:
    """Run ``test_file`` under the Triton interpreter (the reference dispatch switched off, so the
    kernels themselves run) and assert that it passed with at least ``min_passed`` cases."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "LOWPREC_KERNELS": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-o", "addopts=", "-q", "-x",
                           "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"],
                          env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= min_passed, tail  # the kernel cases really ran
