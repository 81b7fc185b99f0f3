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
