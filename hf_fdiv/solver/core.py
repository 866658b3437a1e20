"""What every solver backend shares: the row solution, the root-search policy and step, KL's closed
form, the f-softmax value and the Jacobian-vector product.

For a row z (logits shifted by their max) and a reference q, p_j = q_j (f*)'(z_j - tau) with
(f*)'(v) = (f')^{-1}(max(v, f'(0))), and tau is the root of phi(tau) = sum_j p_j(tau) - 1
(``docs/math.md``). The root search is a safeguarded Newton method started at the
lower bracket end tau_lo = max_j(z_j - f'(1/q_j)) (phi >= 0 there), run on a transform of the
normalisation equation under which it is monotone (``docs/solver.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..divergences import (
    BREGMAN_SLOT,
    KL,
    AlphaDivergence,
    ChiSquare,
    FDivergence,
    JensenShannon,
    ReverseKL,
    SquaredHellinger,
    scratch_buffer,
)
from .reference import reference_total

__all__ = [
    "RowSolution",
    "NonFiniteLogitsError",
    "NewtonPolicy",
    "newton_policy",
    "compute_dtype",
    "solve_dtype",
    "as_rows",
    "bracket",
    "newton_solve",
    "solve_kl",
    "kl_softargmax",
    "sum_q_bregman",
    "f_softmax_shifted",
    "softargmax_vjp",
    "row_statistics",
    "rows_per_chunk",
    "row_chunks",
    "DEFAULT_MAX_ITER",
    "NON_MONOTONE_MAX_ITER",
]

#: cap on Newton passes (Newton needs 1-9 in fp32); NON_MONOTONE_MAX_ITER for generators whose
#: Newton steps need the bisection safeguard (alpha > 2, user-defined f).
DEFAULT_MAX_ITER = 60
NON_MONOTONE_MAX_ITER = 200


class NonFiniteLogitsError(ValueError):
    """Rows of logits with a NaN or +inf entry, or no finite entry at all; ``rows`` counts them."""

    def __init__(self, message: str, rows: int):
        super().__init__(message)
        self.rows = rows


def nonfinite_error(k: int) -> NonFiniteLogitsError:
    return NonFiniteLogitsError(
        f"{k} row(s) of logits have no finite maximum (a NaN or +inf entry, or every class at -inf / "
        "excluded by a zero reference). f-softargmax needs at least one finite logit per row and no "
        "NaN/+inf; mask classes with -inf, not NaN.",
        k,
    )


@dataclass(frozen=True)
class NewtonPolicy:
    """How the solver searches tau for a generator (solver policy, not the generator's math).

    ``transform`` r: Newton runs on (sum p)^r = 1 (r > 0) or log sum p = 0 (r = 0); a tensor [n] gives
    one r per row (the learnable-alpha solver, :mod:`.learnable_alpha`);
    ``monotone``: the transformed equation is convex in tau, so Newton from tau_lo never overshoots;
    ``fp64``: solve in fp64 even for fp32 inputs (alpha > 2: (f*)'' is infinite where a class enters
    the support, so one fp32 ulp of tau moves such a p_j by ~sqrt(ulp));
    ``smooth``: phi is differentiable with a finite derivative everywhere (dense f), so a non-monotone
    search may stop on a Newton step of a few ulps instead of waiting for the bracket to collapse, and
    needs no forced bisections (a step that does not halve the previous one is replaced by one)."""

    transform: Union[float, Tensor]
    monotone: bool
    fp64: bool = False
    smooth: bool = False

    @property
    def max_iter(self) -> int:
        return DEFAULT_MAX_ITER if self.monotone else NON_MONOTONE_MAX_ITER


def newton_policy(div: FDivergence) -> NewtonPolicy:
    """The policy table: built-in generators by type; a generator carrying its own ``solver_policy``
    (per-row alpha) uses it; other user-defined ones get the safeguarded default."""
    own = getattr(div, "solver_policy", None)
    if own is not None:
        return own
    if isinstance(div, AlphaDivergence):
        a = div.alpha
        # (sum p)^(a-1) is convex in tau for 1 < a <= 2. For a < 1, p_j = q_j d_j^(-k) with d_j affine
        # in tau and k = 1/(1-a): (sum p)^(-1/k) is a power mean of negative order of the d_j, concave,
        # so (S^r - 1)/r with r = a - 1 < 0 is convex, and near-linear in the heavy tail that
        # dominates S when V is large (log sum p, also convex, needs 8-10 passes at V = 32k).
        return NewtonPolicy(a - 1.0, monotone=a <= 2, fp64=a > 2)
    if isinstance(div, ChiSquare):
        return NewtonPolicy(1.0, monotone=True)
    if isinstance(div, ReverseKL):  # p_j = q_j / d_j: the same power mean argument, k = 1
        return NewtonPolicy(-1.0, monotone=True)
    if isinstance(div, SquaredHellinger):  # p_j = q_j / d_j^2, k = 2
        return NewtonPolicy(-0.5, monotone=True)
    if isinstance(div, (KL, JensenShannon)):  # log-convex (f*)' with exponential tails
        return NewtonPolicy(0.0, monotone=True)
    return NewtonPolicy(1.0 if div.sparse else 0.0, monotone=False, smooth=not div.sparse)


def rows_per_chunk(elements: int, V: int) -> int:
    """Rows of V classes in a chunk of about ``elements`` elements (at least one)."""
    return max(1, elements // max(V, 1))


def row_chunks(x: Tensor, rows: Optional[Tensor], step: int):
    """Chunks of ``step`` rows of ``x`` [N, V] (all rows, or those listed in the LongTensor ``rows``):
    yields (start, stop, selection, rows of x), the selection a slice or a LongTensor of row ids."""
    total = x.shape[0] if rows is None else rows.numel()
    for a in range(0, total, step):
        b = min(total, a + step)
        if rows is None:
            yield a, b, slice(a, b), x[a:b]
        else:
            sel = rows[a:b]
            yield a, b, sel, x.index_select(0, sel)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32 (bf16/fp16 logits are solved in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def solve_dtype(div: FDivergence, dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if newton_policy(div).fp64 else compute_dtype(dtype)


def as_rows(logits: Tensor, dim: int = -1) -> tuple[Tensor, tuple[int, ...]]:
    """Logits as [N, V] rows (class axis ``dim`` moved last) and the moved shape, after checks."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor.")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the classes).")
    moved = logits.movedim(dim, -1)
    shape = tuple(moved.shape)
    if shape[-1] == 0:
        raise ValueError("logits have zero classes along the class dimension.")
    return moved.reshape(-1, shape[-1]), shape


@dataclass
class RowSolution:
    """The solution for n rows, in max-shifted coordinates z = theta - max(theta).

    ``index`` is None for a dense solution (``p``, ``z`` are [n, V]); otherwise p, z and ``q_cols``
    are [n, K] values at the columns ``index`` [n, K] and every other column has p = 0 exactly.
    ``q_rows`` is the reference of the rows (float, [1, V] or [n, V]); ``q_cols`` is q at the columns
    of p. Tensors may live in a workspace that the next chunk reuses: consume a solution before
    advancing the iterator.

    ``skipped`` flags rows with non-finite logits solved as zeros (skip mode); ``uncertain`` flags
    rows whose solution is not certified exact (sync-free backend only): a later solution for the
    same rows replaces them, so consumers must write per-row results, not accumulate them.
    """

    rows: Union[slice, Tensor]  # rows of the flattened [N, V] input
    x_rows: Tensor  # [n, V] raw logits (input dtype; excluded classes at -inf)
    row_max: Tensor  # [n], compute dtype
    q_rows: Union[float, Tensor]
    tau: Tensor  # [n], in shifted coordinates
    p: Tensor
    z: Optional[Tensor]  # None when dense and not materialised (KL written straight to ``out``)
    q_cols: Union[float, Tensor]
    index: Optional[Tensor]
    skipped: Optional[Tensor] = None
    uncertain: Optional[Tensor] = None
    scratch: Optional[list] = None  # the backend's buffers, for a consumer's per-chunk temporaries

    def z_at(self, cols: Tensor) -> Tensor:
        """Shifted logits at one column per row (``cols`` [n]), compute dtype."""
        return self.x_rows.gather(1, cols[:, None]).squeeze(1).to(self.row_max.dtype) - self.row_max

    def z_dense(self) -> Tensor:
        if self.index is None and self.z is not None:
            return self.z
        return self.x_rows.to(self.row_max.dtype) - self.row_max[:, None]

    def dense_p(self) -> Tensor:
        if self.index is None:
            return self.p
        out = torch.zeros(self.x_rows.shape, dtype=self.p.dtype, device=self.p.device)
        return out.scatter_(1, self.index, self.p)

    def write_into(self, out: Optional[Tensor]) -> None:
        """Write p into its rows of ``out`` ([N, V], any float dtype; nothing when None)."""
        if out is None:
            return
        if isinstance(self.rows, slice):
            self.write_dense(out[self.rows])
        else:
            out.index_copy_(0, self.rows, self.dense_p().to(out.dtype))

    def write_dense(self, out: Tensor) -> None:
        """Write p into ``out`` ([n, V], any float dtype)."""
        if self.index is None:
            if out.data_ptr() != self.p.data_ptr():
                out.copy_(self.p)
        else:
            out.zero_()
            out.scatter_(1, self.index, self.p.to(out.dtype))

    def p_at(self, c: Tensor) -> Tensor:
        """p_c per row (``c`` [n]), compute dtype."""
        if self.index is None:
            return self.p.gather(1, c[:, None]).squeeze(1)
        return (self.p * (self.index == c[:, None])).sum(1)


def bracket(z: Tensor, q: Union[float, Tensor], div: FDivergence) -> tuple[Tensor, Tensor]:
    """[tau_lo, tau_hi] with phi(tau_lo) >= 0 >= phi(tau_hi) (``docs/math.md``, "Bracket").

    ``z`` is max-shifted (its row max is 0)."""
    n, V = z.shape
    if isinstance(q, Tensor):  # [1, V] or [n, V]: broadcast against z; hi is broadcast to [n] below
        lo = (z - div.f_prime(1.0 / q)).amax(1)  # max_j (z_j - f'(1/q_j)); excluded z = -inf
        hi = -div.f_prime(1.0 / q.sum(1))
    else:
        lo = torch.full((n,), -div.f_prime_scalar(1.0 / q), dtype=z.dtype, device=z.device)
        hi_value = -div.f_prime_scalar(1.0 / (q * V))
        hi = torch.full((n,), hi_value, dtype=z.dtype, device=z.device)
        if not div.sparse and not div.own_lower_bound and newton_policy(div).monotone:
            # (f*)' is convex for these generators, so by Jensen sum_j q (f*)'(z_j - tau) >=
            # q V (f*)'(mean(z) - tau), which is 1 at tau = mean(z) - f'(1/(qV)): a lower end far closer
            # to the root than -f'(1/q) when V is large (one pass fewer; a -inf logit gives -inf, no-op)
            lo = torch.maximum(lo, z.mean(1).add_(hi_value))
    return lo, torch.maximum(hi, lo)


def newton_solve(
    z: Tensor,
    q: Union[float, Tensor],
    div: FDivergence,
    lo: Tensor,
    hi: Tensor,
    max_iter: Optional[int],
    *,
    early_exit: bool,
    out: Optional[Tensor] = None,
    scratch: Optional[list] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Safeguarded Newton from tau_lo on the transformed normalisation equation.

    ``early_exit`` stops once every row has converged (one host synchronisation per pass: the CPU
    path); otherwise exactly ``max_iter`` passes run (no synchronisation). Returns tau [n],
    p [n, m] normalised at that tau (written into ``out`` when given and of the compute dtype) and
    ``converged`` [n] (tau a fixed point to a few ulps, or a collapsed bracket).

    ``scratch`` (a list, see :func:`hf_fdiv.divergences.scratch_buffer`) holds the passes' buffers; a
    backend passes one list for every chunk of a call, so that chunks allocate nothing. p never lives
    in it when ``out`` is None (callers may keep p past the chunk); with an ``out`` of another dtype it
    may, until the next chunk."""
    policy = newton_policy(div)
    r, monotone = policy.transform, policy.monotone
    eps = torch.finfo(z.dtype).eps
    if scratch is None:
        scratch = []  # the generator's per-pass buffers, reused by every pass of this search
    prepared = div.newton_prepare(z, scratch)
    start = div.newton_lower_bound(prepared, q, scratch)
    if start is not None:
        lo = torch.maximum(lo, start.to(lo.dtype))
        hi = torch.maximum(hi, lo)
    tau, lo, hi = lo.clone(), lo.clone(), hi.clone()
    prev_step = torch.full_like(tau, math.inf)
    residual_mark = torch.full_like(tau, math.inf)  # |S - 1| three passes ago (non-smooth safeguard)
    converged = torch.zeros_like(tau, dtype=torch.bool)
    if max_iter is None:
        max_iter = policy.max_iter
    g = None
    for it in range(max_iter):
        S, Sd, g = div.newton_sums(prepared, tau[:, None], q, scratch)
        lo = torch.where(S >= 1, tau, lo)
        hi = torch.where(S <= 1, tau, hi)
        logS = torch.log(S)
        if isinstance(r, Tensor):  # one transform per row (0: log)
            step = torch.where(r == 0, S * logS / Sd, S * (-torch.expm1(-r * logS)) / (r * Sd))
        elif r == 0.0:
            step = S * logS / Sd
        else:
            step = S * (-torch.expm1(-r * logS)) / (r * Sd)
        new = tau + step
        # Safeguard: a Newton step must land strictly inside the bracket, else bisect (NaN steps
        # fail too). When Newton is not provably monotone, a step must also halve the previous one
        # (or be a few ulps), and for non-smooth phi every third pass is a bisection unless |S - 1|
        # fell by 4x over the last three passes, so either the residual or the bracket keeps shrinking.
        ulps = 4 * eps * (1 + tau.abs())
        ok = (new > lo) & (new < hi)
        if not monotone:
            ok &= (step.abs() <= 0.5 * prev_step) | (step.abs() <= ulps)
            if not policy.smooth and it % 3 == 2:
                residual = (S - 1).abs()
                ok &= residual <= 0.25 * residual_mark
                residual_mark = residual
        if monotone or policy.smooth:
            ok |= new == tau  # a step below one ulp of tau: the root is found
        new = torch.where(ok, new, 0.5 * (lo + hi))
        # Every p_j moves with tau in the same direction, so sum_j |p_j(tau) - p_j(root)| = |S - 1|:
        # S within a few ulps of 1 certifies p as well as a collapsed bracket would; stay there. (A
        # monotone sparse search keeps S == 1: its passes are on K columns, and exact supports rely on it;
        # a dense one stops there, a pass before its steps fall below one ulp.)
        at_root = (S == 1) if monotone and div.sparse else (S - 1).abs() <= 8 * eps
        new = torch.where(at_root, tau, new)
        moved = new - tau
        if monotone:
            # Converged when no row moves by more than a few ulps: g at tau is p up to rounding.
            converged = moved.abs() <= ulps
        else:
            # Steps can be tiny far from the root where phi has a kink of infinite slope (sparse f):
            # there, require a collapsed bracket; a smooth phi may stop on a Newton step of a few ulps.
            converged = at_root | ((hi - lo) <= ulps)
            if policy.smooth:
                converged |= ok & (moved.abs() <= ulps)
        if early_exit and bool(converged.all()):
            tau = new
            break
        prev_step = moved.abs()
        tau = new
        g = None
    if g is None:
        g = div.newton_eval_grad(prepared, tau[:, None], scratch)
    if isinstance(q, Tensor):
        g = g * q
    total = g.sum(1, keepdim=True)
    if out is None:
        return tau, g / total, converged
    if out.dtype == g.dtype:
        return tau, torch.div(g, total, out=out), converged
    return tau, g.div_(total), converged


def solve_kl(z: Tensor, q: Union[float, Tensor], out: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """KL closed form: p = softmax(z + log q), tau = logsumexp(z + log q). ``z`` is overwritten."""
    if isinstance(q, Tensor):
        z.add_(torch.log(q))
        zmax = z.amax(1, keepdim=True)
        z.sub_(zmax)
    else:
        zmax = None
    p = out if out is not None else z
    torch.exp(z, out=p)
    s = p.sum(1, keepdim=True)
    p.div_(s)
    tau = torch.log(s.squeeze(1))
    if zmax is not None:
        tau = tau + zmax.squeeze(1)
    elif q != 1.0:
        tau = tau + math.log(q)
    return tau, p


def kl_softargmax(x: Tensor) -> Tensor:
    """KL f-softargmax with a scalar reference: ``torch.softmax`` over the rows of ``x`` [N, V] (one fused
    kernel forward and backward; softmax(x + log q) = softmax(x)). A row with a NaN or +inf entry, or
    no finite entry, has a NaN sum and so a NaN p_0: that column alone is checked (one host sync)."""
    p = torch.softmax(x, -1)
    bad = torch.isnan(p[:, 0])
    if bool(bad.any()):
        raise nonfinite_error(int(bad.sum()))
    return p


def sum_q_bregman(p: Tensor, q: Union[float, Tensor], div: FDivergence, scratch: Optional[list] = None) -> Tensor:
    """sum_j q_j c(p_j / q_j) per row, c = :meth:`FDivergence.bregman_to_zero`; classes with q_j = 0
    contribute 0, classes with p_j = 0 contribute c(0) (0, or -inf when f(0) = +inf). ``scratch``: the
    solution's buffers (:attr:`RowSolution.scratch`)."""
    if div.bregman_zero_safe and not isinstance(q, Tensor):
        # u in the slot after c's: bregman_row_sum may read u after writing c
        u = p if q == 1.0 else torch.div(p, q, out=scratch_buffer(scratch, BREGMAN_SLOT + 1, p))
        return div.bregman_row_sum(u, scratch) * q
    pos = p > 0
    if isinstance(q, Tensor):
        qf = q.expand_as(p)
        u = torch.where(pos, p / qf, torch.ones_like(p))
        c = qf * div.bregman_to_zero(u)
        empty = torch.where(qf > 0, -math.inf, 0.0) if math.isinf(div.f_zero) else 0.0
    else:
        u = torch.where(pos, p if q == 1.0 else p / q, torch.ones_like(p))
        c = div.bregman_to_zero(u) * q
        empty = -math.inf if math.isinf(div.f_zero) else 0.0
    return torch.where(pos, c, empty).sum(1)


def f_softmax_shifted(sol: RowSolution, div: FDivergence) -> Tensor:
    """f-softmax(z; q) = tau + sum_j q_j f*(z_j - tau) = tau + sum_j q_j c(u_j) - f(0) sum_j q_j."""
    n, V = sol.x_rows.shape
    q_total = reference_total(sol.q_rows, n, V, sol.tau)
    if isinstance(div, KL):
        return sol.tau + 1 - q_total
    value = sol.tau + sum_q_bregman(sol.p, sol.q_cols, div, sol.scratch)
    if not math.isinf(div.f_zero):
        value = value - div.f_zero * q_total
    return value


def softargmax_vjp(
    div: FDivergence, p: Tensor, q: Union[float, Tensor], g: Tensor, out: Optional[Tensor] = None
) -> Tensor:
    """J^T g = s * (g - <s, g> / <s, 1>) for J = diag(s) - s s^T / sum(s), s = q (f*)''(z - tau);
    written into ``out`` ([n, m], any float dtype) when given."""
    s = div.jacobian_weight(p, q).to(g.dtype)  # alpha > 2 solves in fp64: p may be fp64, g fp32
    if isinstance(q, Tensor):  # excluded classes (q = 0) have p = 0 and no sensitivity (0/0 in s)
        s = torch.where(p > 0, s, 0.0)
    ssum = s.sum(1, keepdim=True)
    direct = out is not None and out.dtype == g.dtype
    prod = torch.mul(s, g, out=out) if direct else torch.mul(s, g)
    sg = prod.sum(1, keepdim=True)
    prod.addcmul_(s, sg.div_(ssum), value=-1.0)  # s * g - s <s, g> / <s, 1>
    if out is not None and not direct:
        out.copy_(prod)
    return out if out is not None else prod


def row_statistics(sol: RowSolution) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (support size, Shannon entropy of p (0 log 0 = 0), argmax class) for the metrics."""
    p = sol.p
    top = p.argmax(1)
    pred = top if sol.index is None else sol.index.gather(1, top[:, None]).squeeze(1)
    return (p > 0).sum(1), -torch.xlogy(p, p).sum(1), pred
