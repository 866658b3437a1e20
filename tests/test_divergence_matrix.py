"""Every built-in divergence (and two user-defined ones) x operator and loss x forward and backward x
fp32 / bf16 / fp64 x V in {10, 1 000, 32 000} x solver backend, against fp64 oracles written
independently of hf_fdiv (:mod:`oracles`): the operator against a 200-step bisection, its backward
against J^T g with J = diag(s) - s s^T / sum(s), s_j = 1 / f''(p_j) from the oracle's own f' (autograd),
the loss against the primal Fenchel-Young value and its gradient against p - y (issue 22)."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch

from hf_fdiv import FDivergence, f_softargmax, fdiv_loss
from oracles import generator_f, inverse_derivative, reference_bisection

BUILT_IN = ["kl", "reverse_kl", "chi2", "squared_hellinger", "js", "alpha:0.5", "alpha:1.5", "alpha:2", "alpha:3"]
# user-defined generators, each with the oracle of the built-in it re-implements
CUSTOM = {
    "custom-kl": "kl",  # dense, f(u) = u log u - u + 1
    "custom-chi2": "chi2",  # sparse, f'(0) = -2
}
DIVERGENCES = BUILT_IN + list(CUSTOM)
SIZES = [10, 1000, 32000]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
BACKENDS = ["chunked", "batched"]
ROWS = 5

# max |error| allowed, by dtype: p and gradients; loss values get it relative to max(1, |loss|)
TOL = {"fp64": 1e-10, "fp32": 2e-5, "bf16": 1.6e-2}


def _generator(name: str):
    if name == "custom-kl":
        return FDivergence.from_functions(
            "custom-kl", lambda u: torch.xlogy(u, u) - u + 1, torch.log, torch.exp, lambda u: 1 / u
        )
    if name == "custom-chi2":
        return FDivergence.from_functions(
            "custom-chi2", lambda u: (u - 1) ** 2, lambda u: 2 * (u - 1), lambda v: 1 + v / 2,
            lambda u: torch.full_like(u, 2.0),
        )
    return name


def _oracle_name(name: str) -> str:
    return CUSTOM.get(name, name)


@lru_cache(maxsize=None)
def _logits(V: int) -> torch.Tensor:
    """Rows of different character: moderate, peaked, flat, shifted far from 0, with a tie at the max;
    fp64 values that bf16 represents exactly, so that every dtype solves the same problem."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(ROWS, V, generator=g, dtype=torch.float64)
    x[0] *= 2.0
    x[1] *= 8.0
    x[2] *= 0.1
    x[3] = 3.0 * x[3] + 100.0
    x[4] = 2.0 * x[4]
    x[4, 1] = x[4].max()
    return x.to(torch.bfloat16).double()


def _oracle_p(name: str, V: int) -> torch.Tensor:
    return _bisection(_oracle_name(name), V)  # a user-defined generator shares its built-in's oracle


@lru_cache(maxsize=None)
def _bisection(oracle_name: str, V: int) -> torch.Tensor:
    # 100 halvings: the bracket is narrower than 2^50 even for reverse KL at V = 32k (tau ~ V)
    return reference_bisection(_logits(V), oracle_name, steps=100)


def _oracle_weight(name: str, p: torch.Tensor) -> torch.Tensor:
    """s_j = 1 / f''(p_j) on the support (unit q), f'' by autograd of the oracle's f'."""
    _, f_prime, _ = inverse_derivative(_oracle_name(name))
    u = torch.where(p > 0, p, torch.ones_like(p)).requires_grad_()
    (f2,) = torch.autograd.grad(f_prime(u).sum(), u)
    return torch.where(p > 0, 1.0 / f2, torch.zeros_like(p))


def _targets(V: int) -> torch.Tensor:
    return torch.randint(0, V, (ROWS,), generator=torch.Generator().manual_seed(V + 1))


def _oracle_loss(name: str, theta: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Primal FY value sum_j (p_j - y_j) theta_j + f(y_j) - f(p_j) over the supports (unit q); when
    f(0) = +inf (reverse KL) the infinite f(0) terms of D_f(y) are dropped, as fdiv_loss documents."""
    f = generator_f(_oracle_name(name))
    y = torch.nn.functional.one_hot(t, theta.shape[1]).double()
    one = torch.ones_like(p)
    fy = torch.where(y > 0, f(torch.where(y > 0, y, one)), torch.zeros_like(y))
    fp = torch.where(p > 0, f(torch.where(p > 0, p, one)), torch.zeros_like(p))
    f0 = float(f(torch.zeros((), dtype=torch.float64)))
    zero_terms = 0.0 if math.isinf(f0) else f0 * ((y == 0).double() - (p == 0).double()).sum(1)
    return ((p - y) * theta).sum(1) + fy.sum(1) - fp.sum(1) + zero_terms


def _case_ids():
    for name in DIVERGENCES:
        for V in SIZES:
            for dt in DTYPES:
                for backend in BACKENDS:
                    yield pytest.param(name, V, dt, backend, id=f"{name}-V{V}-{dt}-{backend}")


@pytest.fixture
def backend_env(monkeypatch):
    def use(backend):
        monkeypatch.setenv("HF_FDIV_SOLVER", backend)

    return use


@pytest.mark.parametrize("name,V,dt,backend", list(_case_ids()))
def test_operator_forward_and_backward(name, V, dt, backend, backend_env):
    backend_env(backend)
    x = _logits(V).to(DTYPES[dt], copy=True).requires_grad_()
    p = f_softargmax(x, _generator(name))
    assert p.dtype == x.dtype and p.shape == x.shape
    p_ref = _oracle_p(name, V)
    tol = TOL[dt]
    torch.testing.assert_close(p.double(), p_ref, atol=tol, rtol=0)

    g = torch.randn(ROWS, V, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(x.dtype)
    p.backward(g)
    s = _oracle_weight(name, p_ref)
    gd = g.double()
    dx_ref = s * (gd - (s * gd).sum(1, keepdim=True) / s.sum(1, keepdim=True))
    # alpha > 2: s_j = p_j^(2 - alpha) is unbounded where a class enters the support, so one ulp of
    # tau moves dx there by more than an ulp of dx: compare relative to the row's scale of dx
    scale = dx_ref.abs().amax(1, keepdim=True).clamp(min=1.0) if name == "alpha:3" else 1.0
    torch.testing.assert_close(x.grad.double() / scale, dx_ref / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("name,V,dt,backend", list(_case_ids()))
def test_loss_forward_and_backward(name, V, dt, backend, backend_env):
    backend_env(backend)
    x = _logits(V).to(DTYPES[dt], copy=True).requires_grad_()
    t = _targets(V)
    loss = fdiv_loss(x, t, _generator(name), reduction="none")
    p_ref = _oracle_p(name, V)
    ref = _oracle_loss(name, x.detach().double(), p_ref, t)
    tol = TOL[dt]
    torch.testing.assert_close(loss.double(), ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0)
    loss.sum().backward()
    y = torch.nn.functional.one_hot(t, V).double()
    torch.testing.assert_close(x.grad.double(), p_ref - y, atol=tol, rtol=0)
