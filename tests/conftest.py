"""Shared fixtures: small deterministic models and the stdlib text corpus."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus():
    from lowprec.data import stdlib_corpus

    return stdlib_corpus()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread for the whole suite: its models are tiny, so threads gain nothing, and on
    a shared 2-core machine they only wait on each other (measured 3-100x slower steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def eager_quantized_adamw(monkeypatch):
    """torch.compile of a quantized AdamW step costs 20 to 85 s cold on this CPU (design.md); the
    compiled step is checked against the eager one by the optimizer's own tests, so elsewhere it
    runs eagerly."""
    try:
        from lowprec.optim.adamw import QuantizedAdamW
    except ImportError:
        return
    monkeypatch.setitem(QuantizedAdamW.__init__.__kwdefaults__, "compile", False)
