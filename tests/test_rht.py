"""lowprec.rht: the random Hadamard transform of NVFP4 training.

Oracles: the Hadamard definition (entries ±1, H H^T = n I, Sylvester's block recursion), an
explicit float64 block-diagonal matrix, orthonormality (inverse, norms, GEMM products), and
float32 rounding bounds for a 16-term dot product.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowprec import rht as R

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_hadamard_is_sylvester_and_orthogonal(n):
    h = R.hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n))
    assert torch.equal(h, h.T)
    if n >= 2:
        k = n // 2
        hk = R.hadamard(k)
        assert torch.equal(h[:k, :k], hk) and torch.equal(h[:k, k:], hk)
        assert torch.equal(h[k:, :k], hk) and torch.equal(h[k:, k:], -hk)
    assert R.hadamard().shape == (R.RHT_SIZE, R.RHT_SIZE) and R.RHT_SIZE == 16


def test_hadamard_rejects_sizes_that_are_not_powers_of_two():
    for n in (0, 3, 12, -4):
        with pytest.raises(ValueError, match="power of two"):
            R.hadamard(n)


def test_random_signs_reproducible_and_independent_of_the_global_rng():
    state = torch.get_rng_state()
    s = R.random_signs(7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not touched
    assert s.dtype == torch.float32 and s.shape == (16,) and bool((s.abs() == 1).all())
    torch.manual_seed(123)  # does not change the signs
    assert torch.equal(R.random_signs(7), s)
    others = [R.random_signs(k) for k in range(8, 16)]
    assert any(not torch.equal(o, s) for o in others)
    assert R.random_signs(1, 64).shape == (64,)
    with pytest.raises(TypeError, match="seed must be an int"):
        R.random_signs("7")


def test_rht_is_the_block_diagonal_matrix():
    x = torch.randn(3, 48)
    m = (R.hadamard(16).double() * R.random_signs(5).double()[None, :]) / 4.0
    want = (x.double().reshape(3, 3, 16) @ m.T).reshape(3, 48)
    got = R.rht(x, 5)
    # each output is a 16-term dot product with entries ±1/4: float32 error <= 16 eps sum|x|/4
    bound = 16 * EPS32 * x.abs().reshape(3, 3, 16).sum(-1, keepdim=True).expand(3, 3, 16).reshape(3, 48) / 4
    assert bool(((got.double() - want).abs() <= bound.double()).all())
    assert torch.equal(R.rht_matrix(5), m.float())


def test_inverse_norms_and_dims():
    x = torch.randn(4, 32, 5)
    y = R.rht(x, 3, dim=1)
    back = R.rht_inverse(y, 3, dim=1)
    assert (back - x).abs().max().item() <= 64 * EPS32 * x.abs().max().item()
    nx = x.double().reshape(4, 2, 16, 5).norm(dim=2)
    ny = y.double().reshape(4, 2, 16, 5).norm(dim=2)
    assert torch.allclose(nx, ny, rtol=32 * EPS32, atol=0)  # orthonormal: each group's norm kept
    assert torch.equal(y, R.rht(x.movedim(1, -1), 3).movedim(-1, 1))
    assert not torch.allclose(R.rht(x, 4, dim=1), y)  # another seed, another transform


def test_wgrad_gemm_is_unchanged_when_both_operands_are_transformed():
    """The weight-gradient GEMM reduces over tokens (dim 0 of both): (M a)^T (M b) = a^T b."""
    a = torch.randn(64, 24)
    b = torch.randn(64, 40)
    got = R.rht(a, 11, dim=0).T @ R.rht(b, 11, dim=0)
    want = a.double().T @ b.double()
    # float32 rounding of the transforms (16 terms each) and of the 64-term product
    bound = 200 * EPS32 * (a.abs().double().T @ b.abs().double())
    assert bool(((got.double() - want).abs() <= bound).all())
    # with different seeds on the two sides the product is NOT preserved (the signs must match)
    wrong = R.rht(a, 11, dim=0).T @ R.rht(b, 12, dim=0)
    assert (wrong.double() - want).abs().max().item() > 1.0


def test_dtype_handling():
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert R.rht(x, 1).dtype == torch.bfloat16
    y = R.rht(x, 1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(R.rht(x, 1), y.to(torch.bfloat16))


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"length 40, not a multiple of the Hadamard size 16"):
        R.rht(torch.randn(3, 40), 0)
    with pytest.raises(ValueError, match="0-d"):
        R.rht(torch.tensor(1.0), 0)
    with pytest.raises(TypeError, match="non-floating-point"):
        R.rht(torch.arange(16), 0)
    with pytest.raises(TypeError, match="complex"):
        R.rht_inverse(torch.randn(16, dtype=torch.complex64), 0)
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        R.rht(torch.randn(16, 16), 0, dim=3)
    with pytest.raises(ValueError, match="power of two"):
        R.rht(torch.randn(24), 0, size=12)
    assert math.isclose(float(R.rht(torch.ones(16), 0, size=16).norm()), 4.0, rel_tol=1e-6)
