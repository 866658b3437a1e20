"""Independent fp64 oracles: the inverse derivatives written out again from the math reference
(not imported from hf_fdiv), a plain bisection with a fixed 200 steps, and a KKT certificate."""

from __future__ import annotations

import math

import torch

# (f')^{-1}(v) with the clip at f'(0), written independently of hf_fdiv.divergences.
def inverse_derivative(name: str):
    if name == "kl":
        return torch.exp, lambda u: torch.log(u), -math.inf
    if name == "reverse_kl":
        return lambda v: 1.0 / (1.0 - v), lambda u: 1.0 - 1.0 / u, -math.inf
    if name == "chi2":
        return lambda v: torch.clamp(1.0 + v / 2.0, min=0.0), lambda u: 2.0 * (u - 1.0), -2.0
    if name == "squared_hellinger":
        return lambda v: (1.0 - v) ** -2, lambda u: 1.0 - u ** -0.5, -math.inf
    if name == "js":
        return lambda v: torch.exp(v) / (2.0 - torch.exp(v)), lambda u: torch.log(2.0 * u / (u + 1.0)), -math.inf
    if name.startswith("alpha:"):
        a = float(name.split(":")[1])

        def inv(v):
            base = 1.0 + (a - 1.0) * v
            if a > 1:
                base = torch.clamp(base, min=0.0)
            return base ** (1.0 / (a - 1.0))

        fp0 = -1.0 / (a - 1.0) if a > 1 else -math.inf
        return inv, lambda u: (u ** (a - 1.0) - 1.0) / (a - 1.0), fp0
    raise KeyError(name)


POLES = {"reverse_kl": 1.0, "squared_hellinger": 1.0, "js": math.log(2.0)}


def pole(name: str) -> float:
    if name in POLES:
        return POLES[name]
    if name.startswith("alpha:") and float(name.split(":")[1]) < 1:
        return 1.0 / (1.0 - float(name.split(":")[1]))
    return math.inf


def reference_bisection(theta: torch.Tensor, name: str, q=None, steps: int = 200) -> torch.Tensor:
    """fp64 bisection on tau for rows of theta [N, V]; q None = unit, else [V] or [N, V]."""
    theta = theta.double()
    N, V = theta.shape
    qq = torch.ones_like(theta) if q is None else torch.as_tensor(q, dtype=torch.float64).expand(N, V).clone()
    inv, _, _ = inverse_derivative(name)
    P = pole(name)
    th = theta.masked_fill(qq == 0, -math.inf)
    m = th.amax(1, keepdim=True)
    z = th - m

    def mass(tau):
        v = z - tau
        if math.isfinite(P):
            v = torch.clamp(v, max=P - 1e-15)
        g = inv(v)
        g = torch.where(qq > 0, g, torch.zeros_like(g))
        return (qq * g).sum(1, keepdim=True), qq * g

    # Expand a bracket until mass(lo) >= 1 >= mass(hi).
    lo = torch.full((N, 1), -1.0, dtype=torch.float64)
    if math.isfinite(P):
        lo = torch.full((N, 1), -P, dtype=torch.float64)
    hi = torch.full((N, 1), 1.0, dtype=torch.float64)
    for _ in range(200):
        s, _ = mass(lo)
        if bool((s >= 1).all()):
            break
        lo = torch.where(s >= 1, lo, lo - 2 * (lo.abs() + 1))
        if math.isfinite(P):  # never step onto the pole: tau > max(z) - P
            lo = torch.maximum(lo, torch.full_like(lo, -P + 1e-12))
    for _ in range(200):
        s, _ = mass(hi)
        if bool((s <= 1).all()):
            break
        hi = torch.where(s <= 1, hi, hi * 2 + 1)
    for _ in range(steps):
        mid = (lo + hi) / 2
        s, _ = mass(mid)
        lo = torch.where(s >= 1, mid, lo)
        hi = torch.where(s >= 1, hi, mid)
    _, p = mass((lo + hi) / 2)
    return p / p.sum(1, keepdim=True)


def kkt_residual(p: torch.Tensor, theta: torch.Tensor, name: str, q=None, tol_support: float = 0.0) -> float:
    """max violation of the optimality conditions of argmax <p, theta> - D_f(p, q) over the simplex:
    on the support f'(p_j/q_j) = theta_j - tau (same tau for all j); off it theta_j - tau <= f'(0)."""
    p, theta = p.double(), theta.double()
    N, V = p.shape
    qq = torch.ones_like(p) if q is None else torch.as_tensor(q, dtype=torch.float64).expand(N, V)
    _, fprime, fp0 = inverse_derivative(name)
    worst = float((p.sum(1) - 1).abs().max()) + float((-p).clamp(min=0).max())
    for i in range(N):
        supp = p[i] > tol_support
        taus = theta[i, supp] - fprime(p[i, supp] / qq[i, supp])
        tau = taus.mean()
        worst = max(worst, float((taus - tau).abs().max()))
        if math.isfinite(fp0) and bool((~supp).any()):
            worst = max(worst, float((theta[i, ~supp] - tau - fp0).clamp(min=0).max()))
    return worst


def generator_f(name: str):
    """f(u) for u >= 0, written independently (docs/math.md, "Built-in generators")."""
    if name == "kl":
        return lambda u: torch.xlogy(u, u) - u + 1
    if name == "reverse_kl":
        return lambda u: -torch.log(u) + u - 1
    if name == "chi2":
        return lambda u: (u - 1) ** 2
    if name == "squared_hellinger":
        return lambda u: (torch.sqrt(u) - 1) ** 2
    if name == "js":
        return lambda u: torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2)
    if name.startswith("alpha:"):
        a = float(name.split(":")[1])
        return lambda u: (u**a - 1 - a * (u - 1)) / (a * (a - 1))
    raise KeyError(name)


def primal_loss(theta, y, name, q=None):
    """fp64 Fenchel-Young loss <p - y, theta> + sum_j q_j [f(y_j/q_j) - f(p_j/q_j)] from the oracle p."""
    theta, y = theta.double(), y.double()
    qq = torch.ones_like(theta) if q is None else torch.as_tensor(q, dtype=torch.float64).expand_as(theta)
    p = reference_bisection(theta, name, q)
    f = generator_f(name)
    both_zero = (p == 0) & (y == 0)
    terms = (p - y) * theta + qq * (f(y / qq) - f(p / qq))
    return torch.where(both_zero, torch.zeros_like(terms), terms).sum(-1), p
