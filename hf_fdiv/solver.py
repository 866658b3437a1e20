"""The f-softargmax solver: p = argmax_{p in simplex} <p, theta> - D_f(p, q), row by row.

For every row, p_j = q_j (f*)'(theta_j - tau) with (f*)'(v) = (f')^{-1}(max(v, f'(0))), and the
normaliser tau is the root of phi(tau) = sum_j p_j(tau) - 1 (``fdiv_math.md`` section 2).

Algorithm (``solver_design.md`` section 5), all arithmetic in fp32 (fp64 for fp64 inputs):

* rows are shifted by their max (shift invariance) and processed in chunks of
  ``CHUNK_ELEMENTS`` so that temporaries stay O(chunk x V);
* KL has a closed form: tau = logsumexp(theta + log q);
* sparse f (f'(0) finite): solve on the top-K entries of each row and accept when the K-th entry
  is below the threshold (then the solve is exact for the whole row); otherwise count the
  candidates theta_j - tau_K > f'(0) and solve on exactly those; dense Newton when there are too many;
* the root search is a safeguarded Newton method started at the lower bracket end
  tau_lo = max_j(theta_j - f'(1/q_j)) (phi >= 0 there). Newton runs on a transform of the
  normalisation equation under which it is monotone and never overshoots: log sum p = 0 for dense
  f with log-convex (f*)' (KL, JS, Hellinger, reverse KL, alpha < 1) and (sum p)^(alpha-1) = 1 for
  the alpha family with 1 < alpha <= 2 (exact in one step on a one-element support). Steps that
  leave the bracket [tau_lo, tau_hi] are replaced by bisection (alpha > 2 needs it). The pass
  count is capped (``max_iter``) and a chunk stops early once tau is a fixed point;
* p is renormalised by its sum (the same p is used in forward and backward).

Differentiation never unrolls the iterations: :class:`FSoftargmaxFunction` uses the closed-form
Jacobian J = diag(s) - s s^T / sum(s), s_j = q_j / f''(p_j / q_j) (zero off the support).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from .divergences import KL, DivergenceSpec, FDivergence, get_divergence

__all__ = [
    "f_softargmax",
    "f_softmax",
    "FSoftargmaxFunction",
    "FSoftmaxFunction",
    "ReferenceSpec",
    "RowSolution",
    "RowProvider",
    "NonFiniteLogitsError",
    "solve_row_chunks",
    "prepare_reference",
    "CHUNK_ELEMENTS",
    "DEFAULT_MAX_ITER",
    "SPARSE_TOPK",
]

ReferenceSpec = Union[str, float, Tensor]


class RowProvider:
    """Per-row data computed on demand, chunk by chunk: ``provider(rows)`` returns an [n, V] tensor for
    the rows (a slice or a LongTensor of row indices of the flattened [N, V] logits).

    Used for references and targets that would be too large to materialise for a whole batch,
    e.g. teacher probabilities projected from teacher hidden states one token chunk at a time."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, rows) -> Tensor:
        return self.fn(rows)

#: rows per chunk = max(1, CHUNK_ELEMENTS // V): temporaries stay a few MB, in cache.
CHUNK_ELEMENTS = 1 << 21
#: cap on Newton passes per chunk (Newton needs 1-9 in fp32); None in the API means this, or
#: NON_MONOTONE_MAX_ITER for generators whose Newton steps need the bisection safeguard (alpha > 2).
DEFAULT_MAX_ITER = 60
NON_MONOTONE_MAX_ITER = 200
#: first guess of the support size for sparse f (top-K solve, exact when accepted).
SPARSE_TOPK = 32
#: beyond this many candidates per row, sparse f are solved densely.
SPARSE_MAX_SUPPORT_FRACTION = 0.125


# ---------------------------------------------------------------------------------------------
# Reference measure
# ---------------------------------------------------------------------------------------------


def prepare_reference(
    reference: ReferenceSpec, logits: Tensor, dim: int = -1
) -> Union[float, Tensor]:
    """Validate ``reference`` against ``logits`` and return q with the class axis moved last.

    Returns a Python float for ``"unit"`` (1), ``"uniform"`` (1/V) or a positive number, or a tensor
    broadcastable to ``logits.movedim(dim, -1)``. A 1-D tensor of length V is a class prior along
    ``dim``; other tensors are given in the layout of ``logits`` and broadcast against it.
    """
    V = logits.shape[dim]
    if isinstance(reference, str):
        key = reference.strip().lower()
        if key in ("unit", "ones", "one"):
            return 1.0
        if key == "uniform":
            return 1.0 / V
        raise ValueError(
            f"unknown reference {reference!r}: use 'unit' (all ones; alpha-divergence = alpha-entmax), "
            "'uniform' (1/V), or a non-negative tensor broadcastable to the logits ([V] or [..., V])."
        )
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if not (math.isfinite(reference) and reference > 0):
            raise ValueError(f"a scalar reference must be finite and > 0, got {reference}.")
        return float(reference)
    if not isinstance(reference, Tensor):
        raise ValueError(
            f"reference must be 'unit', 'uniform', a positive number or a tensor, got {type(reference).__name__}."
        )
    q = reference
    if q.dim() == 1:
        if q.shape[0] != V:
            raise ValueError(
                f"reference has {q.shape[0]} entries but the logits have V={V} classes along dim {dim}: "
                "pass a [V] class prior or a tensor broadcastable to the logits."
            )
        q_last = q
    else:
        try:
            shape = torch.broadcast_shapes(q.shape, logits.shape)
        except RuntimeError:
            shape = None
        if shape != tuple(logits.shape) or q.shape[dim] != V:
            raise ValueError(
                f"reference of shape {tuple(q.shape)} does not match logits of shape {tuple(logits.shape)}: "
                f"it must be [V={V}] or broadcastable to the logits with V entries along dim {dim}."
            )
        q_last = q.movedim(dim, -1)
    if not q_last.is_floating_point():
        q_last = q_last.double() if logits.dtype == torch.float64 else q_last.float()
    if not bool(torch.isfinite(q_last).all()):
        raise ValueError("reference contains NaN or inf entries: pass finite, non-negative values.")
    if bool((q_last < 0).any()):
        raise ValueError("reference has negative entries: a reference measure must be >= 0 (zero excludes a class).")
    if bool((q_last.sum(-1) <= 0).any()):
        raise ValueError(
            "reference has a row that is all zero: every row needs at least one class with q > 0 "
            "(a zero excludes that class)."
        )
    return q_last.to(device=logits.device)


# ---------------------------------------------------------------------------------------------
# Chunked row solutions
# ---------------------------------------------------------------------------------------------


@dataclass
class RowSolution:
    """The solution for one chunk of n rows, in max-shifted coordinates z = theta - max(theta).

    ``index`` is None for a dense solution (``p``, ``z``, ``q`` are [n, V]); otherwise p, z and q
    are [n, K] values at the columns ``index`` [n, K] and every other column has p = 0 exactly.
    ``q`` is a Python float when the reference is a constant. Tensors may live in a workspace that
    the next chunk reuses: consume a solution before advancing the iterator.
    """

    rows: Union[slice, Tensor]  # rows of the flattened [N, V] input covered by this chunk
    x_rows: Tensor  # [n, V] raw logits of these rows (input dtype; excluded classes at -inf)
    row_max: Tensor  # [n], compute dtype
    q_full: Union[float, Tensor]  # float, [1, V] or [n, V]
    tau: Tensor  # [n], in shifted coordinates
    p: Tensor
    z: Optional[Tensor]  # None when dense and not materialised (KL written straight to ``out``)
    q: Union[float, Tensor]
    index: Optional[Tensor]
    skipped: Optional[Tensor] = None  # [n] rows with non-finite logits, solved as zeros (skip mode)

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

    def write_dense(self, out: Tensor) -> None:
        """Write p into ``out`` ([n, V], any float dtype)."""
        if self.index is None:
            if out.data_ptr() != self.p.data_ptr():
                out.copy_(self.p)
        else:
            out.zero_()
            out.scatter_(1, self.index, self.p.to(out.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _q_rows(q: Union[float, Tensor], rows, V: int, dtype) -> Union[float, Tensor]:
    """Slice of the reference for a chunk of rows: float, [1, V] or [n, V]."""
    if isinstance(q, RowProvider):
        return q(rows).to(dtype)
    if not isinstance(q, Tensor):
        return q
    if q.dim() == 1:
        return q.to(dtype).view(1, V)
    if isinstance(rows, slice):
        return q[rows].to(dtype)
    return q.index_select(0, rows).to(dtype)


def _gather_q(q: Union[float, Tensor], index: Tensor) -> Union[float, Tensor]:
    if not isinstance(q, Tensor):
        return q
    if q.shape[0] == 1:
        return q.expand(index.shape[0], -1).gather(1, index)
    return q.gather(1, index)


def _bracket(z: Tensor, q: Union[float, Tensor], div: FDivergence) -> tuple[Tensor, Tensor]:
    """[tau_lo, tau_hi] with phi(tau_lo) >= 0 >= phi(tau_hi) (fdiv_math.md 2.2, tighter lower end).

    ``z`` is max-shifted (its row max is 0)."""
    n, V = z.shape
    if isinstance(q, Tensor):
        qf = q.expand_as(z) if q.shape[0] == 1 and n > 1 else q
        lo = (z - div.f_prime(1.0 / qf)).amax(1)  # max_j (z_j - f'(1/q_j)); excluded z = -inf
        hi = -div.f_prime(1.0 / qf.sum(1))
    else:
        lo = torch.full((n,), -div.f_prime_scalar(1.0 / q), dtype=z.dtype, device=z.device)
        hi = torch.full((n,), -div.f_prime_scalar(1.0 / (q * V)), dtype=z.dtype, device=z.device)
    return lo, torch.maximum(hi, lo)


def _newton(
    z: Tensor,
    q: Union[float, Tensor],
    div: FDivergence,
    lo: Tensor,
    hi: Tensor,
    max_iter: Optional[int],
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Safeguarded Newton from tau_lo on the transformed normalisation equation.

    Returns tau [n] and p [n, m] (normalised) at that tau, written into ``out`` when given."""
    r = div.newton_transform
    eps = torch.finfo(z.dtype).eps
    prepared = div.newton_prepare(z)
    tau, lo, hi = lo.clone(), lo.clone(), hi.clone()
    prev_step = torch.full_like(tau, math.inf)
    monotone = div.newton_monotone
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER if monotone else NON_MONOTONE_MAX_ITER
    g = None
    for it in range(max_iter):
        S, Sd, g = div.newton_sums(prepared, tau[:, None], q)
        lo = torch.where(S >= 1, tau, lo)
        hi = torch.where(S <= 1, tau, hi)
        logS = torch.log(S)
        if r == 0.0:
            step = S * logS / Sd
        else:
            step = S * (-torch.expm1(-r * logS)) / (r * Sd)
        new = tau + step
        # Safeguard: a Newton step must land strictly inside the bracket, else bisect (NaN steps
        # fail too). When Newton is not provably monotone (alpha > 2), a step must also halve the
        # previous one and every third pass is a bisection, so the bracket keeps shrinking.
        ok = (new > lo) & (new < hi)
        if monotone:
            ok |= new == tau
        else:
            ok &= (step.abs() <= 0.5 * prev_step) & torch.tensor(it % 3 != 2)
        new = torch.where(ok, new, 0.5 * (lo + hi))
        new = torch.where(S == 1, tau, new)
        moved = new - tau
        if monotone:
            # Converged when no row moves by more than a few ulps: g at tau is p up to rounding.
            done = moved.abs() <= 4 * eps * (1 + tau.abs())
        else:
            # Steps can be tiny far from the root here: require a collapsed bracket.
            done = (S == 1) | ((hi - lo) <= 4 * eps * (1 + tau.abs()))
        if bool(done.all()):
            tau = new
            break
        prev_step = moved.abs()
        tau = new
        g = None
    if g is None:
        g = div.newton_eval_grad(prepared, tau[:, None])
    if isinstance(q, Tensor):
        g = g * q
    total = g.sum(1, keepdim=True)
    if out is not None and out.dtype == g.dtype:
        return tau, torch.div(g, total, out=out)
    return tau, g.div_(total)


def _solve_kl(z: Tensor, q: Union[float, Tensor], out: Optional[Tensor]) -> tuple[Tensor, Tensor]:
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


def _solve_sparse(x_rows, m, q, div, max_iter, topk, workspace, out):
    """Sparse f: solve on the top-K entries, verify exactness, widen or fall back to dense.

    Returns (tau, p, z, q, index); index None means dense [n, V]."""
    n, V = x_rows.shape
    cdt = m.dtype
    thr0 = div.f_prime_zero
    K = min(V, topk)
    lo_sub = None
    if K < V:
        vals, idx = x_rows.topk(K, dim=1, sorted=False)
        vals = vals.to(cdt) - m[:, None]
        qk = _gather_q(q, idx)
        lo, hi = _bracket(vals, qk, div)
        tau, pk = _newton(vals, qk, div, lo, hi, max_iter)
        # Exact for the whole row iff every left-out entry is clipped: z_j - tau <= f'(0).
        if bool((vals.amin(1) - tau <= thr0).all()):
            return tau, pk, vals, qk, idx
        lo_sub = tau  # the root on a subset is a valid lower bound for the full row
        # Candidates: z_j > tau_sub + f'(0), i.e. x_j > max + tau_sub + f'(0).
        # (compared in the compute dtype: rounding the threshold to bf16 could drop the max itself)
        counts = (x_rows > (m + tau + thr0)[:, None]).sum(1)
        K1 = max(1, int(counts.max()))
        if K1 <= max(K, int(SPARSE_MAX_SUPPORT_FRACTION * V)) and K1 < V:
            vals, idx = x_rows.topk(K1, dim=1, sorted=False)
            vals = vals.to(cdt) - m[:, None]
            qk = _gather_q(q, idx)
            _, hi = _bracket(vals, qk, div)
            tau, pk = _newton(vals, qk, div, lo_sub, torch.maximum(hi, lo_sub), max_iter)
            return tau, pk, vals, qk, idx
    z = _shifted(x_rows, m, workspace)
    lo, hi = _bracket(z, q, div)
    if lo_sub is not None:
        lo = torch.maximum(lo, lo_sub)
        hi = torch.maximum(hi, lo)
    tau, p = _newton(z, q, div, lo, hi, max_iter, out)
    return tau, p, z, q, None


def _shifted(x_rows: Tensor, m: Tensor, workspace: Tensor) -> Tensor:
    z = workspace[: x_rows.shape[0]]
    z.copy_(x_rows)
    return z.sub_(m[:, None])


def _check_reference_chunk(q: Tensor) -> None:
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("a computed reference chunk has negative, NaN or inf entries.")
    if bool((q.sum(-1) <= 0).any()):
        raise ValueError("a computed reference row is all zero: every row needs a class with q > 0.")


class NonFiniteLogitsError(ValueError):
    """Rows of logits with a NaN or +inf entry, or no finite entry at all; ``rows`` counts them."""

    def __init__(self, message: str, rows: int):
        super().__init__(message)
        self.rows = rows


def _check_row_max(m: Tensor, skip: bool = False) -> Optional[Tensor]:
    """Raise on rows without a finite maximum, or (``skip``) return their mask."""
    bad = ~torch.isfinite(m)
    if not bool(bad.any()):
        return None
    if skip:
        return bad
    k = int(bad.sum())
    raise NonFiniteLogitsError(
        f"{k} row(s) of logits have no finite maximum (a NaN or +inf entry, or every class at -inf / "
        "excluded by a zero reference). f-softargmax needs at least one finite logit per row and no "
        "NaN/+inf; mask classes with -inf, not NaN.",
        k,
    )


def solve_row_chunks(
    x: Tensor,
    q: Union[float, Tensor],
    div: FDivergence,
    *,
    rows: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
    topk: int = SPARSE_TOPK,
    chunk_elements: int = CHUNK_ELEMENTS,
    workspace: Optional[Tensor] = None,
    skip_nonfinite: bool = False,
) -> Iterator[RowSolution]:
    """The one place that owns chunking: solve f-softargmax for the rows of ``x`` [N, V].

    ``q`` is a float, a [V] prior or [N, V] rows (see :func:`prepare_reference`). ``rows``
    (optional LongTensor) restricts the solve to those rows (e.g. non-ignored targets). With
    ``out`` ([N, V], any float dtype), dense p is written into ``out[rows]`` as each chunk is solved.
    Yields a :class:`RowSolution` per chunk, in order; consume it before advancing. ``workspace``
    (optional, [>= rows per chunk, V] in the compute dtype) is reused instead of allocated.
    Rows with NaN/+inf logits (or no finite logit) raise :class:`NonFiniteLogitsError`, or with
    ``skip_nonfinite`` are solved as all-zero rows and flagged in ``RowSolution.skipped``.
    """
    N, V = x.shape
    cdt = torch.float64 if div.solve_in_fp64 else _compute_dtype(x.dtype)
    step = max(1, chunk_elements // max(V, 1))
    total = N if rows is None else rows.numel()
    is_kl = isinstance(div, KL)
    rows_per_chunk = min(step, total)
    if workspace is None or workspace.dtype != cdt or workspace.shape[0] < rows_per_chunk or workspace.shape[1] != V:
        workspace = torch.empty((rows_per_chunk, V), dtype=cdt, device=x.device) if total else None
    lazy_q = isinstance(q, RowProvider)
    q_has_zero = isinstance(q, Tensor) and bool((q == 0).any())
    for a in range(0, total, step):
        b = min(total, a + step)
        if rows is None:
            sel = slice(a, b)
            x_rows = x[sel]
        else:
            sel = rows[a:b]
            x_rows = x.index_select(0, sel)
        qc = _q_rows(q, sel, V, cdt)
        if lazy_q:
            _check_reference_chunk(qc)
        if q_has_zero or (lazy_q and bool((qc == 0).any())):
            # A zero reference excludes the class (the exact perspective limit for super-linear f).
            x_rows = x_rows.masked_fill(qc == 0, -math.inf)
        m = x_rows.amax(1).to(cdt)
        skipped = _check_row_max(m, skip_nonfinite)
        if skipped is not None:
            x_rows = x_rows.masked_fill(skipped[:, None], 0.0)
            m = m.masked_fill(skipped, 0.0)
        out_rows = None
        if out is not None and isinstance(sel, slice):
            out_rows = out[sel]
        if is_kl:
            z = _shifted(x_rows, m, workspace)
            direct = out_rows is not None and out_rows.dtype == cdt and not isinstance(qc, Tensor)
            tau, p = _solve_kl(z, qc, out_rows if direct else None)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, None, qc, None)
        elif div.sparse:
            tau, p, zs, qs, idx = _solve_sparse(x_rows, m, qc, div, max_iter, topk, workspace, out_rows)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, zs, qs, idx)
        else:
            z = _shifted(x_rows, m, workspace)
            lo, hi = _bracket(z, qc, div)
            tau, p = _newton(z, qc, div, lo, hi, max_iter, out_rows)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, z, qc, None)
        sol.skipped = skipped
        if out is not None:
            if out_rows is not None:
                sol.write_dense(out_rows)
            else:
                out.index_copy_(0, sel, sol.dense_p().to(out.dtype))
        yield sol


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _jvp_rows(div: FDivergence, p: Tensor, q: Union[float, Tensor], g: Tensor) -> Tensor:
    """J^T g = s * (g - <s, g> / <s, 1>) for J = diag(s) - s s^T / sum(s)."""
    s = div.jacobian_weight(p, q)
    ssum = s.sum(1, keepdim=True)
    sg = torch.linalg.vecdot(s, g)[:, None]
    return s * (g - sg / ssum)  # not in place: s may alias p (KL)


class FSoftargmaxFunction(torch.autograd.Function):
    """p = f-softargmax(x; q) over the last axis of x [N, V]; VJP from the closed-form Jacobian.

    For chunks solved on a compact support (sparse f) the backward works on the support only."""

    @staticmethod
    def forward(ctx, x: Tensor, q, div: FDivergence, max_iter: int):
        out = torch.empty_like(x)
        compact = []  # (rows, index, p, q) of chunks with a compact support
        for sol in solve_row_chunks(x, q, div, out=out, max_iter=max_iter):
            if sol.index is not None and x.requires_grad:
                compact.append((sol.rows, sol.index, sol.p, sol.q))
        ctx.div, ctx.q, ctx.compact = div, q, compact
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (p,) = ctx.saved_tensors
        div, q = ctx.div, ctx.q
        N, V = p.shape
        cdt = _compute_dtype(p.dtype)
        dx = torch.empty_like(p)
        done = torch.zeros(N, dtype=torch.bool, device=p.device)
        for rows, index, pk, qk in ctx.compact:
            gk = grad_out[rows].gather(1, index).to(cdt)
            d = dx[rows]
            d.zero_()
            d.scatter_(1, index, _jvp_rows(div, pk, qk, gk).to(dx.dtype))
            done[rows] = True
        if not bool(done.all()):
            step = max(1, CHUNK_ELEMENTS // max(V, 1))
            for a in range(0, N, step):
                sl = slice(a, min(N, a + step))
                if bool(done[sl].all()):
                    continue
                qc = _q_rows(q, sl, V, cdt)
                dx[sl] = _jvp_rows(div, p[sl].to(cdt), qc, grad_out[sl].to(cdt))
        return dx, None, None, None


class FSoftmaxFunction(torch.autograd.Function):
    """Value max_p <p, x> - D_f(p, q) per row of x [N, V]; its gradient is p."""

    @staticmethod
    def forward(ctx, x: Tensor, q, div: FDivergence, max_iter: int):
        N, V = x.shape
        value = torch.empty(N, dtype=_compute_dtype(x.dtype), device=x.device)
        p_out = torch.empty_like(x) if x.requires_grad else None
        for sol in solve_row_chunks(x, q, div, out=p_out, max_iter=max_iter):
            value[sol.rows] = sol.row_max + _value_shifted(sol, div)
        if p_out is not None:
            ctx.save_for_backward(p_out)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (p,) = ctx.saved_tensors
        return grad_out[:, None].to(p.dtype) * p, None, None, None


def _q_total(q: Union[float, Tensor], n: int, V: int, like: Tensor) -> Tensor:
    if isinstance(q, Tensor):
        return q.sum(1).expand(n) if q.shape[0] == 1 else q.sum(1)
    return torch.full((n,), q * V, dtype=like.dtype, device=like.device)


def sum_q_bregman(p: Tensor, q: Union[float, Tensor], div: FDivergence) -> Tensor:
    """sum_j q_j c(p_j / q_j) per row, c = :meth:`FDivergence.bregman_to_zero`; classes with q_j = 0
    contribute 0, classes with p_j = 0 contribute c(0) (0, or -inf when f(0) = +inf)."""
    if div.bregman_zero_safe and not isinstance(q, Tensor):
        return div.bregman_to_zero(p if q == 1.0 else p / q).sum(1) * q
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


def _value_shifted(sol: RowSolution, div: FDivergence) -> Tensor:
    """f-softmax(z; q) = tau + sum_j q_j f*(z_j - tau) = tau + sum_j q_j c(u_j) - f(0) sum_j q_j."""
    n, V = sol.x_rows.shape
    q_total = _q_total(sol.q_full, n, V, sol.tau)
    if isinstance(div, KL):
        return sol.tau + 1 - q_total
    value = sol.tau + sum_q_bregman(sol.p, sol.q, div)
    if not math.isinf(div.f_zero):
        value = value - div.f_zero * q_total
    return value


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_rows(logits: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...]]:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor.")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the classes).")
    moved = logits.movedim(dim, -1)
    shape = tuple(moved.shape)
    if shape[-1] == 0:
        raise ValueError("logits have zero classes along the class dimension.")
    return moved.reshape(-1, shape[-1]), shape


def _q_for_rows(q, shape: tuple[int, ...]):
    """Reference as a float, a [V] prior, or [N, V] rows matching the flattened logits."""
    if isinstance(q, Tensor) and q.dim() > 1:
        if q.shape[:-1].numel() == 1:
            return q.reshape(shape[-1])
        return q.expand(shape).reshape(-1, shape[-1])
    return q


def f_softargmax(
    logits: Tensor,
    divergence: DivergenceSpec = "alpha:1.5",
    reference: ReferenceSpec = "unit",
    dim: int = -1,
    max_iter: Optional[int] = None,
) -> Tensor:
    """f-softargmax: argmax_{p in simplex} <p, logits> - D_f(p, q) along ``dim``.

    Args:
        logits: float tensor of any shape [..., V, ...]; bf16/fp16 are solved in fp32.
        divergence: spec string (``"kl"``, ``"alpha:1.5"``, ``"js"``, ...) or an FDivergence.
        reference: ``"unit"`` (q = 1), ``"uniform"`` (q = 1/V), a positive number, or a non-negative
            tensor ([V] class prior or broadcastable to the logits); q_j = 0 excludes class j.
        dim: the class dimension.
        max_iter: cap on root-search passes per chunk (default 60; 200 for alpha > 2).

    Returns:
        p with the shape and dtype of ``logits``: p >= 0, sums to 1 along ``dim``; KL with unit q is
        ``torch.softmax``, alpha = 1.5 is entmax15, alpha = 2 is sparsemax, chi2 is sparsemax(logits/2).
        Differentiable w.r.t. ``logits`` (closed-form Jacobian); ``reference`` gets no gradient.
    """
    div = get_divergence(divergence)
    q = prepare_reference(reference, logits, dim)
    x, shape = _as_rows(logits, dim)
    p = FSoftargmaxFunction.apply(x, _q_for_rows(q, shape), div, max_iter)
    return p.reshape(shape).movedim(-1, dim)


def f_softmax(
    logits: Tensor,
    divergence: DivergenceSpec = "alpha:1.5",
    reference: ReferenceSpec = "unit",
    dim: int = -1,
    max_iter: Optional[int] = None,
) -> Tensor:
    """f-softmax value max_{p in simplex} <p, logits> - D_f(p, q) along ``dim`` (log-sum-exp analogue).

    KL with unit q gives logsumexp(logits) + 1 - V (the normalised KL generator keeps the constant
    1 - sum q). The gradient w.r.t. ``logits`` is :func:`f_softargmax`. Returns a tensor shaped like
    ``logits`` without ``dim``.
    """
    div = get_divergence(divergence)
    q = prepare_reference(reference, logits, dim)
    x, shape = _as_rows(logits, dim)
    v = FSoftmaxFunction.apply(x, _q_for_rows(q, shape), div, max_iter)
    return v.reshape(shape[:-1])
