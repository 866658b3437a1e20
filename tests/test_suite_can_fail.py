"""Tests of the test suite: a deliberately wrong solver must be caught by the oracles of tests/oracles.py
and by the property tests. The wrong answers keep p >= 0, sum p = 1 and the zeros of p, so only the
optimality checks (KKT certificate, independent bisection) can tell them from the right one."""

from __future__ import annotations

import pytest
import torch

import test_properties
from hf_fdiv import f_softargmax
from oracles import kkt_residual, reference_bisection

NAMES = ["kl", "reverse_kl", "chi2", "squared_hellinger", "js", "alpha:0.5", "alpha:1.5", "alpha:2.5"]


def perturbed(p: torch.Tensor, size: float = 1e-3) -> torch.Tensor:
    """p with every other class scaled by 1 + 1e-3, renormalised: still on the simplex, same zeros."""
    every_other = (torch.arange(p.shape[-1]) % 2).to(p.dtype)
    tilted = p * (1 + size * every_other)
    return tilted / tilted.sum(-1, keepdim=True)


def logits_and_reference(reference_kind: str):
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(3, 11, generator=g, dtype=torch.float64)
    q = None
    if reference_kind == "prior":
        q = torch.rand(3, 11, generator=g, dtype=torch.float64) + 0.1
    return x, q


@pytest.mark.parametrize("reference_kind", ["unit", "prior"])
@pytest.mark.parametrize("name", NAMES)
def test_oracles_tell_the_solution_from_a_perturbed_one(name, reference_kind):
    x, q = logits_and_reference(reference_kind)
    p = f_softargmax(x, name, "unit" if q is None else q)
    wrong = perturbed(p)
    assert torch.equal(wrong > 0, p > 0) and float((wrong.sum(-1) - 1).abs().max()) < 1e-12
    # the KKT certificate: ~0 at the solution, large at the perturbed point
    assert kkt_residual(p, x, name, q) < 1e-8
    assert kkt_residual(wrong, x, name, q) > 1e-5
    # the independent fp64 bisection agrees with the solution and not with the perturbed point
    oracle = reference_bisection(x, name, q)
    assert float((oracle - p).abs().max()) < 1e-10
    assert float((oracle - wrong).abs().max()) > 1e-6


def test_kkt_catches_a_wrong_support():
    # sparse f: moving a little mass onto a class outside the support breaks the KKT conditions
    x = torch.tensor([[3.0, 2.5, 0.0, -4.0]], dtype=torch.float64)
    p = f_softargmax(x, "alpha:1.5")
    assert float(p[0, 3]) == 0.0
    wrong = p.clone()
    wrong[0, 3] = 1e-3
    wrong = wrong / wrong.sum(-1, keepdim=True)
    assert kkt_residual(p, x, "alpha:1.5") < 1e-10
    assert kkt_residual(wrong, x, "alpha:1.5") > 1e-2
    # and so does dropping a class from the support (p_j = 0 where theta_j - tau > f'(0))
    dropped = p.clone()
    dropped[0, 1] = 0.0
    dropped = dropped / dropped.sum(-1, keepdim=True)
    assert kkt_residual(dropped, x, "alpha:1.5") > 1e-2


@pytest.fixture
def wrong_solver(monkeypatch):
    """The property tests' f_softargmax replaced by the right answer, perturbed."""
    right = test_properties.f_softargmax

    def solver(logits, divergence="alpha:1.5", reference="unit", dim=-1, max_iter=None):
        return perturbed(right(logits, divergence, reference, dim, max_iter).double()).to(logits.dtype)

    monkeypatch.setattr(test_properties, "f_softargmax", solver)


@pytest.mark.parametrize("name", ["reverse_kl", "squared_hellinger", "js", "alpha:1.5"])
def test_property_tests_fail_with_a_wrong_solver(wrong_solver, name):
    with pytest.raises(AssertionError, match="KKT residual"):
        test_properties.test_kkt_every_divergence_and_reference(name, "unit")
    x, _ = logits_and_reference("unit")
    problem = (name, x, "uniform")
    with pytest.raises(AssertionError, match="KKT residual"):
        test_properties.test_simplex_kkt_and_shift_invariance.hypothesis.inner_test(problem)
