"""f-divergence generators: everything the f-softargmax solver needs to know about f.

An f-divergence with a (not necessarily normalised) reference measure q is

    D_f(p, q) = sum_j q_j f(p_j / q_j)

for a convex generator f: R+ -> R with f(1) = 0. The built-in generators also have f'(1) = 0, so
D_f >= 0 for unnormalised measures too (see ``docs/math.md``, "f-divergence").

The solver works with the convex conjugate f*(v) = sup_{u>=0} uv - f(u) through

* ``conj_grad(v)``  = (f*)'(v) = (f')^{-1}(max(v, f'(0)))   (p_j = q_j conj_grad(theta_j - tau)),
* ``conj_hess(v)``  = (f*)''(v), zero where the clip at f'(0) is active (Newton step, Jacobian),
* ``conj(v)``       = f*(v)                                    (the dual value),

plus the scalars ``f_prime_zero`` = f'(0) (finite <=> the operator is sparse), ``f_prime_inf`` =
f'(+inf) (finite <=> (f*)' has a pole there) and ``f_zero`` = f(0) (may be +inf). How the root
search runs for a generator (transform, safeguards, precision) is the solver's policy
(:func:`hf_fdiv.solver.newton_policy`), not part of the generator.

All methods take and return tensors of the same shape; they are evaluated in fp32 or fp64.

Spec strings: ``"kl"``, ``"reverse_kl"``, ``"chi2"``, ``"squared_hellinger"``, ``"js"``,
``"alpha:1.5"`` (any alpha > 0), ``"entmax15"``, ``"sparsemax"``. :func:`get_divergence` also accepts an
:class:`FDivergence` object, which it returns unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "FDivergence",
    "KL",
    "ReverseKL",
    "ChiSquare",
    "SquaredHellinger",
    "JensenShannon",
    "AlphaDivergence",
    "get_divergence",
    "available_divergences",
    "DivergenceSpec",
    "scratch_buffer",
    "PREPARED_SLOT",
    "BREGMAN_SLOT",
]

_LOG2 = math.log(2.0)
#: f'(u) of Python floats by (generator, u): equal generators (same type and parameters) share entries
_F_PRIME_SCALARS: dict = {}


def scratch_buffer(scratch: Optional[list], i: int, like: Tensor) -> Tensor:
    """A contiguous tensor shaped like ``like`` in slot ``i`` of ``scratch`` (a list of flat buffers that
    grows on demand and is reused for every chunk of a call); a fresh one when ``scratch`` is None."""
    if scratch is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    while len(scratch) <= i:
        scratch.append(None)
    buf, n = scratch[i], like.numel()
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = scratch[i] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(like.shape)


def _power(x: Tensor, e: float, out: Optional[Tensor] = None) -> Tensor:
    """x^e for x >= 0 without a fractional pow where a product or a square root does it (into ``out``
    when given, which must not alias x; e = 1 returns x itself)."""
    if e == 1.0:
        return x
    if e == 2.0:
        return torch.mul(x, x, out=out)
    if e == 0.5:
        return torch.sqrt(x, out=out)
    if e == 1.5:  # alpha = 0.5's Jacobian weight, alpha = 1.5's loss term, the k = 1.5 power tail
        return torch.sqrt(x, out=out).mul_(x)
    return torch.pow(x, e, out=out)


#: the scratch slot of ``newton_prepare``'s output (the passes use slots 0-2), and of the loss
#: value's per-class terms (:meth:`FDivergence.bregman_row_sum`)
PREPARED_SLOT = 3
BREGMAN_SLOT = 4


def _below_pole(v: Tensor, pole: float) -> Tensor:
    """Keep v strictly below a pole of (f*)' (rounding can land on it; the math never does)."""
    return torch.clamp(v, max=pole - 1e-7 * max(1.0, abs(pole)))


class FDivergence:
    """A generator f of an f-divergence, with what the f-softargmax solver needs.

    Subclass and implement :meth:`f`, :meth:`f_prime`, :meth:`conj_grad` and :meth:`conj_hess`
    (and set ``f_prime_zero``, ``f_prime_inf``, ``f_zero``), or build one from functions with
    :meth:`from_functions`. :meth:`conj` and :meth:`jacobian_weight` have generic defaults.

    Class attributes
    ----------------
    name:          spec-like name (used in messages and model cards).
    f_prime_zero:  f'(0); ``-inf`` for dense operators, finite for sparse ones.
    f_prime_inf:   f'(+inf); ``+inf`` for super-linear f, otherwise the pole of (f*)'.
    f_zero:        f(0); may be ``+inf`` (then D_f(one-hot, q) is infinite and the loss drops the
                   infinite constant, see :func:`hf_fdiv.losses.fdiv_loss`).
    """

    name: str = "custom"
    f_prime_zero: float = -math.inf
    f_prime_inf: float = math.inf
    f_zero: float = 1.0
    #: True when ``bregman_to_zero(0)`` evaluates to the value of a class with p_j = 0 (0, or -inf when
    #: f(0) = +inf): the loss then sums it over every class with no mask pass.
    bregman_zero_safe: bool = False
    #: True when :meth:`newton_lower_bound` gives a start at least as good as the solver's generic one
    #: (then the solver skips its own, a pass over the row)
    own_lower_bound: bool = False

    # ---- the generator ---------------------------------------------------------------------
    def f(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def f_prime(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def conj_grad(self, v: Tensor) -> Tensor:
        """(f*)'(v) = (f')^{-1}(max(v, f'(0))); zero where the clip is active."""
        raise NotImplementedError

    def conj_hess(self, v: Tensor) -> Tensor:
        """(f*)''(v) = 1 / f''((f*)'(v)); zero where the clip at f'(0) is active."""
        raise NotImplementedError

    def conj_grad_and_hess(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Both at once; built-ins share the expensive part (one pow or exp)."""
        return self.conj_grad(v), self.conj_hess(v)

    # ---- hot loop of the root search -------------------------------------------------------
    # The solver evaluates (f*)' and (f*)'' at v = z - tau for many tau and a fixed row z. A generator
    # can precompute a per-element quantity P(z) once so that each evaluation is cheaper (JS: one
    # multiply instead of an exp). Defaults: P = z. ``scratch`` (a list, or None) holds [n, m] buffers
    # shaped like P that the solver keeps for one root search (:func:`scratch_buffer`): a pass that
    # writes into them allocates nothing, which on a CPU spares a page-faulting allocation per pass.
    def newton_prepare(self, z: Tensor, scratch: Optional[list] = None) -> Tensor:
        return z

    def newton_eval(self, prepared: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        """((f*)'(z - tau), (f*)''(z - tau)) from ``newton_prepare(z)``; tau is [n, 1]."""
        return self.conj_grad_and_hess(prepared - tau)

    def newton_lower_bound(self, prepared: Tensor, q, scratch: Optional[list] = None) -> Optional[Tensor]:
        """An optional lower bound of the root tau [n] (phi >= 0 there) cheap to form from the prepared
        row; the search starts at the larger of it and the bracket's lower end. None: no bound."""
        return None

    def newton_eval_grad(self, prepared: Tensor, tau: Tensor, scratch: Optional[list] = None) -> Tensor:
        return self.conj_grad(prepared - tau)

    def newton_sums(
        self, prepared: Tensor, tau: Tensor, q, scratch: Optional[list] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(S, S', g): S = sum_j q_j (f*)'(z_j - tau), S' = sum_j q_j (f*)''(z_j - tau), g = (f*)'(z - tau)
        or a positive multiple of it (the solver uses g only normalised). g may live in ``scratch`` (valid until the next pass)."""
        g, h = self.newton_eval(prepared, tau)
        if isinstance(q, Tensor):
            q = q.expand_as(g)
            return torch.linalg.vecdot(g, q), torch.linalg.vecdot(h, q), g
        return g.sum(1) * q, h.sum(1) * q, g

    # ---- loss value --------------------------------------------------------------------------
    def bregman_to_zero(self, u: Tensor) -> Tensor:
        """c(u) = f(0) - f(u) + u f'(u) = B_f(0, u) >= 0, the per-class term of the loss value.

        At the solution, f*(theta_j - tau) = c(u_j) - f(0) with u_j = p_j / q_j, so the f-softmax value
        is tau + sum_j q_j c(u_j) - f(0) sum_j q_j with no cancellation between large terms. When
        f(0) = +inf the f(0) terms are dropped: c(u) = u f'(u) - f(u). Only called with u > 0.
        """
        c = u * self.f_prime(u) - self.f(u)
        return c if math.isinf(self.f_zero) else c + self.f_zero

    def bregman_row_sum(self, u: Tensor, scratch: Optional[list] = None) -> Tensor:
        """sum_j c(u_j) per row of ``u`` [n, m] (u >= 0, ``bregman_zero_safe`` generators only); built-ins
        form c(u) in a scratch buffer (slot ``BREGMAN_SLOT``) instead of a fresh one."""
        return self.bregman_to_zero(u).sum(1)

    def conj(self, v: Tensor) -> Tensor:
        """f*(v) = u v - f(u) with u = (f*)'(v)."""
        u = self.conj_grad(v)
        return u * v - self.f(u)

    def jacobian_weight(self, p: Tensor, q: Union[float, Tensor]) -> Tensor:
        """s_j = q_j (f*)''(theta_j - tau) = q_j / f''(p_j / q_j), zero off the support.

        The Jacobian of f-softargmax is diag(s) - s s^T / sum(s) (``docs/math.md``, "Jacobian of f-softargmax").
        """
        v = self.f_prime(p / q)
        s = q * self.conj_hess(v)
        return torch.where(p > 0, s, torch.zeros_like(s))

    # ---- derived properties ----------------------------------------------------------------
    @property
    def sparse(self) -> bool:
        """True when f'(0) is finite: f-softargmax then has exact zeros."""
        return math.isfinite(self.f_prime_zero)

    @property
    def superlinear(self) -> bool:
        """True when f'(+inf) = +inf, i.e. (f*)' has no pole."""
        return not math.isfinite(self.f_prime_inf)

    def clip_to_domain(self, v: Tensor) -> Tensor:
        """Arguments of (f*)' kept below its pole f'(+inf) (no-op for super-linear f)."""
        if self.superlinear:
            return v
        return _below_pole(v, self.f_prime_inf)

    def f_prime_scalar(self, u: float) -> float:
        """f'(u) for a Python float, evaluated in fp64 (bracket ends; memoised, so that a training loop
        does not convert a tensor to a float at every call)."""
        key = (self, u)
        if key not in _F_PRIME_SCALARS:
            _F_PRIME_SCALARS[key] = float(self.f_prime(torch.tensor(u, dtype=torch.float64)))
        return _F_PRIME_SCALARS[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FDivergence) and type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    # ---- user-defined generators -----------------------------------------------------------
    @classmethod
    def from_functions(
        cls,
        name: str,
        f: Callable[[Tensor], Tensor],
        f_prime: Callable[[Tensor], Tensor],
        f_prime_inverse: Callable[[Tensor], Tensor],
        f_second: Callable[[Tensor], Tensor],
        *,
        f_prime_zero: Optional[float] = None,
        f_prime_inf: float = math.inf,
        f_zero: Optional[float] = None,
        conj: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> "FDivergence":
        """Build a generator from plain functions.

        ``f_prime_inverse`` is (f')^{-1} on the range of f' (the clip at f'(0) is added here) and
        ``f_second`` is f''. ``f_prime_zero`` / ``f_zero`` default to f'(0) / f(0) evaluated in
        fp64; ``f_prime_inf`` must be given when f is not super-linear (f'(+inf) < +inf).

        Example: ``FDivergence.from_functions("kl2", lambda u: torch.xlogy(u, u) - u + 1, torch.log,
        torch.exp, lambda u: 1 / u)``.
        """
        zero = torch.zeros((), dtype=torch.float64)
        fpz = float(f_prime(zero)) if f_prime_zero is None else float(f_prime_zero)
        fz = float(f(zero)) if f_zero is None else float(f_zero)
        if math.isnan(fpz) or math.isnan(fz):
            raise ValueError(
                f"custom divergence {name!r}: f(0) or f'(0) evaluates to NaN; pass f_zero= and "
                "f_prime_zero= explicitly (use -inf for f'(0) of a dense generator)."
            )
        one = torch.ones((), dtype=torch.float64)
        if abs(float(f(one))) > 1e-9:
            raise ValueError(f"custom divergence {name!r}: f(1) must be 0 (got {float(f(one))}).")

        div = cls.__new__(_FunctionDivergence)
        _FunctionDivergence.__init__(
            div, name, f, f_prime, f_prime_inverse, f_second, fpz, float(f_prime_inf), fz, conj
        )
        return div


class _FunctionDivergence(FDivergence):
    def __init__(self, name, f, f_prime, f_prime_inverse, f_second, fpz, fpi, fz, conj):
        self.name = name
        self._f, self._fp, self._fpi, self._fs, self._conj = f, f_prime, f_prime_inverse, f_second, conj
        self.f_prime_zero, self.f_prime_inf, self.f_zero = fpz, fpi, fz

    def f(self, u):
        return self._f(u)

    def f_prime(self, u):
        return self._fp(u)

    def conj_grad(self, v):
        v = self.clip_to_domain(v)
        if self.sparse:
            return torch.where(v > self.f_prime_zero, self._fpi(v.clamp(min=self.f_prime_zero)), torch.zeros_like(v))
        return self._fpi(v)

    def _hess_at(self, u):
        """(f*)'' = 1 / f''(u) at u = (f*)'(v), zero where u = 0 (clipped, or an underflow)."""
        h = torch.reciprocal(self._fs(u))
        return h.masked_fill_(u <= 0, 0.0)

    def conj_hess(self, v):
        return self._hess_at(self.conj_grad(v))

    def conj_grad_and_hess(self, v):
        u = self.conj_grad(v)  # the user's (f')^{-1} once per pass, not once per derivative
        return u, self._hess_at(u)

    def jacobian_weight(self, p, q):
        # s = q / f''(p / q) straight from the user's f'' (the generic route goes through f' and its inverse)
        scalar_unit = isinstance(q, (int, float)) and q == 1.0
        s = self._hess_at(p if scalar_unit else p / q)
        return s if scalar_unit else s.mul_(q)

    def conj(self, v):
        return self._conj(v) if self._conj is not None else super().conj(v)

    def __eq__(self, other):
        return other is self

    def __hash__(self):
        return id(self)


class _PowerTail:
    """Newton passes for generators with (f*)'(v) = d^(-k), d = 1 - B v (reverse KL: B = k = 1; squared
    Hellinger: B = 1, k = 2; alpha < 1: B = 1 - alpha, k = 1 / (1 - alpha)), so (f*)''(v) = k B g / d.

    At v = z - tau, d = B (tau + 1/B - z): a pass is one subtraction from the row (and a scaling when
    B != 1), one reciprocal r = 1/d and, for k != 1, one product or power: no per-element pow of a
    fractional exponent for k in {1, 2} and nothing prepared. With a tensor reference, d is kept at or
    above the distance from the pole that :meth:`FDivergence.clip_to_domain` keeps; with a scalar one
    it is at least q^(1 - alpha) > 0 for every tau >= tau_lo (``docs/math.md``, "Bracket"), so the
    passes skip that clamp."""

    _tail_scale: float  # B
    _tail_power: float  # k

    def _distance(self, z: Tensor, tau: Tensor, scratch: Optional[list], clamp: bool, scaled: bool = True) -> Tensor:
        """d, or d/B when not ``scaled`` (one pass fewer; the caller rescales), in scratch slot 0."""
        B = self._tail_scale
        d = torch.sub(tau + 1.0 / B, z, out=scratch_buffer(scratch, 0, z))
        if scaled and B != 1.0:
            d.mul_(B)
        if clamp:
            # only keeps d > 0 where rounding lands on or past the pole: the root itself may lie far
            # closer to it than any fixed margin (p_j = q_j d_j^-k with a tiny q_j on the top class)
            d.clamp_(min=torch.finfo(d.dtype).tiny)
        return d

    def _tail(self, d: Tensor, scratch: Optional[list]) -> Tensor:
        """g = d^(-k), in slot 1: k = 2 in one pass (torch's pow computes x^-2 as 1 / (x x)) and d kept;
        otherwise through r = 1/d written over d (k = 1: g is that buffer)."""
        k = self._tail_power
        if k == 1.0:
            return d.reciprocal_()
        if k == 2.0:
            return torch.pow(d, -2.0, out=scratch_buffer(scratch, 1, d))
        return _power(d.reciprocal_(), k, out=scratch_buffer(scratch, 1, d))

    # a generator whose _tail_power is 0 (alpha > 1) keeps the generic passes
    def newton_eval_grad(self, prepared: Tensor, tau: Tensor, scratch: Optional[list] = None) -> Tensor:
        if not self._tail_power:
            return super().newton_eval_grad(prepared, tau, scratch)
        return self._tail(self._distance(prepared, tau, scratch, clamp=True), scratch)

    def newton_sums(
        self, prepared: Tensor, tau: Tensor, q, scratch: Optional[list] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not self._tail_power:
            return super().newton_sums(prepared, tau, q, scratch)
        tensor_q = isinstance(q, Tensor)
        k, B = self._tail_power, self._tail_scale
        # With a moderate k the pass skips d's scaling: d' = d / B, g' = B^k g, and the sums take the
        # constant back (B^-k g' = g; p is normalised, so g' serves as g). A large k (alpha -> 1) would
        # overflow B^-k: scaled passes then.
        scaled = B == 1.0 or k > 16
        c = 1.0 if scaled else B**-k
        d = self._distance(prepared, tau, scratch, clamp=tensor_q, scaled=scaled)
        g = self._tail(d, scratch)  # d's buffer holds r = 1/d now unless k = 2 (k = 1: g is r)
        kB = k * (B if scaled else 1.0)  # unscaled: S' = k B^-k sum q g' r'
        # S' = kB c sum_j q_j g_j r_j, formed in place over q g (a third buffer) or d's buffer
        if tensor_q:
            gq = torch.mul(g, q, out=scratch_buffer(scratch, 2, g))
            S = gq.sum(1)
            gq = gq.div_(d) if k == 2.0 else gq.mul_(d)
            return S * c, gq.sum(1) * (kB * c), g
        if g is d:  # k = 1: S' = k B sum g^2, a reduction with no product materialised
            return g.sum(1) * (q * c), torch.linalg.vector_norm(g, dim=1).square_() * (kB * c * q), g
        S = g.sum(1)
        gr = torch.div(g, d, out=d) if k == 2.0 else d.mul_(g)
        return S * (q * c), gr.sum(1) * (kB * c * q), g


# ---------------------------------------------------------------------------------------------
# Built-in generators (docs/math.md, "Built-in generators"). All normalised: f(1) = f'(1) = 0.
# ---------------------------------------------------------------------------------------------


class KL(FDivergence):
    """Kullback-Leibler: f(u) = u log u - u + 1. f-softargmax = softmax(theta + log q)."""

    name = "kl"
    f_prime_zero = -math.inf
    f_prime_inf = math.inf
    f_zero = 1.0
    bregman_zero_safe = True

    def f(self, u):
        return torch.xlogy(u, u) - u + 1

    def f_prime(self, u):
        return torch.log(u)

    def conj_grad(self, v):
        return torch.exp(v)

    def conj_hess(self, v):
        return torch.exp(v)

    def conj_grad_and_hess(self, v):
        e = torch.exp(v)
        return e, e

    def conj(self, v):
        return torch.expm1(v)

    def jacobian_weight(self, p, q):
        return p

    def bregman_to_zero(self, u):
        return u

    def bregman_row_sum(self, u, scratch=None):
        return u.sum(1)


class ReverseKL(_PowerTail, FDivergence):
    """Reverse KL: f(u) = -log u + u - 1. p_j = q_j / (1 + tau - theta_j) (polynomial tails)."""

    name = "reverse_kl"
    f_prime_zero = -math.inf
    f_prime_inf = 1.0
    f_zero = math.inf
    bregman_zero_safe = True  # log(0) = -inf, the value of an empty class when f(0) = +inf
    _tail_scale = 1.0
    _tail_power = 1.0

    def f(self, u):
        return -torch.log(u) + u - 1

    def f_prime(self, u):
        return 1 - 1 / u

    def conj_grad(self, v):
        return 1 / (1 - self.clip_to_domain(v))

    def conj_hess(self, v):
        return self.conj_grad(v) ** 2

    def conj_grad_and_hess(self, v):
        g = self.conj_grad(v)
        return g, g * g

    def conj(self, v):
        return -torch.log1p(-self.clip_to_domain(v))

    def jacobian_weight(self, p, q):
        return p * p / q

    def bregman_to_zero(self, u):
        return torch.log(u)  # f(0) = +inf dropped

    def bregman_row_sum(self, u, scratch=None):
        return torch.log(u, out=scratch_buffer(scratch, BREGMAN_SLOT, u)).sum(1)


class ChiSquare(FDivergence):
    """Pearson chi-square: f(u) = (u - 1)^2. Unit q: f-softargmax = sparsemax(theta / 2)."""

    name = "chi2"
    f_prime_zero = -2.0
    f_prime_inf = math.inf
    f_zero = 1.0
    bregman_zero_safe = True

    def f(self, u):
        return (u - 1) ** 2

    def f_prime(self, u):
        return 2 * (u - 1)

    def conj_grad(self, v):
        return torch.clamp(1 + 0.5 * v, min=0)

    def conj_hess(self, v):
        return (v > -2.0).to(v.dtype) * 0.5

    def conj_grad_and_hess(self, v):
        g = torch.clamp(1 + 0.5 * v, min=0)
        return g, (g > 0).to(v.dtype) * 0.5

    def conj(self, v):
        u = self.conj_grad(v)
        return u * u - 1

    def jacobian_weight(self, p, q):
        return (p > 0).to(p.dtype) * (0.5 * q)

    def bregman_to_zero(self, u):
        return u * u

    def bregman_row_sum(self, u, scratch=None):
        return torch.mul(u, u, out=scratch_buffer(scratch, BREGMAN_SLOT, u)).sum(1)


class SquaredHellinger(_PowerTail, FDivergence):
    """Squared Hellinger: f(u) = (sqrt(u) - 1)^2. (f*)'(v) = (1 - v)^(-2), v < 1."""

    name = "squared_hellinger"
    f_prime_zero = -math.inf
    f_prime_inf = 1.0
    f_zero = 1.0
    bregman_zero_safe = True
    _tail_scale = 1.0
    _tail_power = 2.0

    def f(self, u):
        return (torch.sqrt(u) - 1) ** 2

    def f_prime(self, u):
        return 1 - torch.rsqrt(u)

    def conj_grad(self, v):
        return (1 - self.clip_to_domain(v)) ** -2

    def conj_hess(self, v):
        return 2 * (1 - self.clip_to_domain(v)) ** -3

    def conj_grad_and_hess(self, v):
        r = 1 / (1 - self.clip_to_domain(v))
        g = r * r
        return g, 2 * g * r

    def conj(self, v):
        v = self.clip_to_domain(v)
        return v / (1 - v)

    def jacobian_weight(self, p, q):
        u = p if isinstance(q, (int, float)) and q == 1.0 else p / q
        return torch.sqrt(u).mul_(p).mul_(2.0)  # 2 q u^1.5 without a fractional pow

    def bregman_to_zero(self, u):
        return torch.sqrt(u)

    def bregman_row_sum(self, u, scratch=None):
        return torch.sqrt(u, out=scratch_buffer(scratch, BREGMAN_SLOT, u)).sum(1)


class JensenShannon(FDivergence):
    """Jensen-Shannon: f(u) = u log u - (u + 1) log((u + 1) / 2). (f*)'(v) = e^v / (2 - e^v)."""

    name = "js"
    f_prime_zero = -math.inf
    f_prime_inf = _LOG2
    f_zero = _LOG2
    bregman_zero_safe = True

    def f(self, u):
        return torch.xlogy(u, u) - (u + 1) * (torch.log1p(u) - _LOG2)

    def f_prime(self, u):
        # log(2u / (u + 1)) written so that u = inf gives log 2, not log(inf / inf).
        return _LOG2 - torch.log1p(1 / u)

    def conj_grad(self, v):
        e = torch.exp(self.clip_to_domain(v))
        return e / (2 - e)

    def conj_hess(self, v):
        e = torch.exp(self.clip_to_domain(v))
        return 2 * e / (2 - e) ** 2

    def conj_grad_and_hess(self, v):
        e = torch.exp(self.clip_to_domain(v))
        r = 1 / (2 - e)
        g = e * r
        return g, 2 * g * r

    def conj(self, v):
        return -torch.log(2 - torch.exp(self.clip_to_domain(v)))

    # (f*)'(v) = e^v / (2 - e^v): with E = e^z (prepared once, in [0, 1] for max-shifted z) and
    # c = 2 e^tau, g = E / (c - E), so a pass is one subtraction and one division; (f*)'' = g (1 + g).
    # E = 0 (z << 0 or an excluded class) gives g = 0 exactly.
    own_lower_bound = True

    def newton_prepare(self, z, scratch=None):
        return torch.exp(z, out=scratch_buffer(scratch, PREPARED_SLOT, z))

    def _g(self, prepared, tau, scratch=None, clamp=True):
        d = torch.sub(2 * torch.exp(tau), prepared, out=scratch_buffer(scratch, 0, prepared))
        # d > 0 <=> below the pole v < log 2; with a scalar q, tau >= tau_lo gives d >= q E (no clamp
        # pass; d = 2 e^tau > 0 where E = 0)
        if clamp:
            d.clamp_(min=1e-30)
        return torch.div(prepared, d, out=d)

    def newton_eval(self, prepared, tau):
        g = self._g(prepared, tau)
        return g, g * (1 + g)

    def newton_lower_bound(self, prepared, q, scratch=None):
        # (f*)'(v) >= e^v / 2, so sum_j q e^(z_j - tau) / 2 >= 1 at tau = log(q/2 sum_j E_j): the
        # log-sum-exp start, tight when the mass is spread, and a read of E with nothing written
        if isinstance(q, Tensor):
            return None
        return torch.log(prepared.sum(1)).add_(math.log(q / 2))

    def newton_sums(self, prepared, tau, q, scratch=None):
        g = self._g(prepared, tau, scratch, clamp=isinstance(q, Tensor))
        if isinstance(q, Tensor):
            gq = torch.mul(g, q, out=scratch_buffer(scratch, 1, g))
            S = gq.sum(1)
            return S, S + gq.mul_(g).sum(1), g
        S = g.sum(1)
        return S * q, (S + torch.linalg.vector_norm(g, dim=1).square_()) * q, g

    def newton_eval_grad(self, prepared, tau, scratch=None):
        return self._g(prepared, tau, scratch)

    def jacobian_weight(self, p, q):
        if isinstance(q, (int, float)):
            return torch.addcmul(p, p, p, value=1.0 / q)  # q u (1 + u) = p + p^2 / q, one pass
        return torch.add(p, q).mul_(p).div_(q)

    def bregman_to_zero(self, u):
        return torch.log1p(u)

    def bregman_row_sum(self, u, scratch=None):
        return torch.log1p(u, out=scratch_buffer(scratch, BREGMAN_SLOT, u)).sum(1)


class AlphaDivergence(_PowerTail, FDivergence):
    """alpha-divergence, alpha > 0, alpha != 1: f(u) = (u^a - 1 - a (u - 1)) / (a (a - 1)).

    (f*)'(v) = (1 + (a - 1) v)_+^(1 / (a - 1)). alpha > 1 is sparse (f'(0) = -1/(alpha - 1)); with
    unit q the operator is alpha-entmax (alpha = 1.5: entmax15, alpha = 2: sparsemax). alpha < 1 is
    dense with a pole at v = 1 / (1 - alpha). ``AlphaDivergence(1.0)`` is not allowed: use
    :class:`KL` (``get_divergence("alpha:1")`` returns KL).
    """

    def __init__(self, alpha: float):
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"alpha-divergence needs a finite alpha > 0, got alpha={alpha}. Use e.g. 'alpha:1.5' "
                "(entmax15), 'alpha:2' (sparsemax) or 'alpha:0.5' (dense); alpha -> 0 is 'reverse_kl'."
            )
        if alpha == 1.0:
            raise ValueError("alpha = 1 is the KL divergence: use 'kl' (get_divergence('alpha:1') returns it).")
        self.alpha = alpha
        self.name = f"alpha:{alpha:g}"
        a1 = alpha - 1.0
        self._a1 = a1
        self._exp = 1.0 / a1  # exponent of (f*)'
        self.f_prime_zero = -1.0 / a1 if alpha > 1 else -math.inf
        self.f_prime_inf = math.inf if alpha > 1 else 1.0 / (1.0 - alpha)
        self.f_zero = 1.0 / alpha
        self.bregman_zero_safe = True
        # alpha < 1: (f*)'(v) = (1 - (1 - alpha) v)^(-1 / (1 - alpha)), a power tail (alpha > 1 keeps the
        # generic passes: its (f*)' is clipped at zero, not a reciprocal)
        self._tail_scale = 1.0 - alpha
        self._tail_power = 1.0 / (1.0 - alpha) if alpha < 1 else 0.0

    def f(self, u):
        a = self.alpha
        return (u**a - 1 - a * (u - 1)) / (a * self._a1)

    def f_prime(self, u):
        return (u**self._a1 - 1) / self._a1

    def _base(self, v):
        base = 1 + self._a1 * self.clip_to_domain(v)
        return torch.clamp(base, min=0)

    def conj_grad(self, v):
        return _power(self._base(v), self._exp)

    def conj_hess(self, v):
        base = self._base(v)
        h = _power(base, self._exp - 1.0)
        return torch.where(base > 0, h, torch.zeros_like(h))

    def conj_grad_and_hess(self, v):
        base = self._base(v)
        e = self._exp
        if e == 2.0:  # alpha = 1.5: no pow at all
            return base * base, base
        if e == 1.0:  # alpha = 2
            return base, (base > 0).to(base.dtype)
        g = base**e
        h = torch.where(base > 0, g / base, torch.zeros_like(g))
        return g, h

    def conj(self, v):
        base = self._base(v)
        return (_power(base, self.alpha * self._exp) - 1) / self.alpha

    def jacobian_weight(self, p, q):
        two_minus = 2.0 - self.alpha
        if isinstance(q, (int, float)) and q == 1.0:
            s = _power(p, two_minus) if two_minus > 0 else p ** two_minus
        else:
            s = q * _power(p / q, two_minus) if two_minus > 0 else q * (p / q) ** two_minus
        if two_minus > 0 and not isinstance(q, Tensor):
            return s  # p^(2 - alpha) is already 0 at p = 0 (q = 0, 0/0, only comes with a tensor q)
        return torch.where(p > 0, s, torch.zeros_like(s))

    def bregman_to_zero(self, u):
        return _power(u, self.alpha) / self.alpha

    def bregman_row_sum(self, u, scratch=None):
        return _power(u, self.alpha, out=scratch_buffer(scratch, BREGMAN_SLOT, u)).sum(1) / self.alpha

    def __eq__(self, other):
        return isinstance(other, AlphaDivergence) and other.alpha == self.alpha

    def __hash__(self):
        return hash(("alpha", self.alpha))


# ---------------------------------------------------------------------------------------------
# Spec strings
# ---------------------------------------------------------------------------------------------

DivergenceSpec = Union[str, FDivergence]

_NAMED: dict[str, Callable[[], FDivergence]] = {
    "kl": KL,
    "reverse_kl": ReverseKL,
    "chi2": ChiSquare,
    "squared_hellinger": SquaredHellinger,
    "js": JensenShannon,
    "entmax15": lambda: AlphaDivergence(1.5),
    "sparsemax": lambda: AlphaDivergence(2.0),
}
_ALIASES = {
    "forward_kl": "kl",
    "cross_entropy": "kl",
    "softmax": "kl",
    "reverse-kl": "reverse_kl",
    "reversekl": "reverse_kl",
    "pearson": "chi2",
    "chi_square": "chi2",
    "chisquare": "chi2",
    "hellinger": "squared_hellinger",
    "jensen_shannon": "js",
    "jsd": "js",
}


def available_divergences() -> list[str]:
    """The spec strings :func:`get_divergence` understands (plus ``"alpha:<a>"`` for any a > 0)."""
    return sorted(_NAMED) + ["alpha:<a> (a > 0)"]


def get_divergence(spec: DivergenceSpec) -> FDivergence:
    """Turn a spec (``"kl"``, ``"js"``, ``"alpha:1.5"``, ...) or a generator object into a generator.

    ``"alpha:1"`` returns :class:`KL` (the alpha -> 1 limit). Raises ``ValueError`` listing the known
    names for an unknown spec.
    """
    if isinstance(spec, FDivergence):
        return spec
    if isinstance(spec, type) and issubclass(spec, FDivergence):
        return spec()
    if not isinstance(spec, str):
        raise ValueError(
            f"divergence must be a spec string or an FDivergence, got {type(spec).__name__}. "
            f"Known names: {', '.join(available_divergences())}."
        )
    key = spec.strip().lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key in _NAMED:
        return _NAMED[key]()
    for prefix in ("alpha:", "alpha="):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            try:
                alpha = float(rest)
            except ValueError:
                raise ValueError(
                    f"could not read alpha from divergence spec {spec!r}: write it like 'alpha:1.5'."
                ) from None
            if alpha == 1.0:
                return KL()
            return AlphaDivergence(alpha)
    suggestion = _closest_spec(key)
    hint = f" Did you mean {suggestion!r}?" if suggestion else ""
    raise ValueError(
        f"unknown divergence {spec!r}. Known names: {', '.join(available_divergences())}; "
        f"or pass an FDivergence object (subclass it or use FDivergence.from_functions).{hint}"
    )


def _closest_spec(key: str) -> Optional[str]:
    """The known spec closest to a mistyped one: 'alpha1.5' / 'alpha-1.5' / 'alpha 1.5' -> 'alpha:1.5',
    else the nearest name or alias by edit similarity (difflib)."""
    import difflib
    import re

    m = re.fullmatch(r"(?:alpha|a|entmax|tsallis)[^0-9.]*([0-9]*\.?[0-9]+)", key)
    if m and float(m.group(1)) > 0:
        return f"alpha:{m.group(1)}"
    names = sorted(set(_NAMED) | set(_ALIASES))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return _ALIASES.get(close[0], close[0]) if close else None
