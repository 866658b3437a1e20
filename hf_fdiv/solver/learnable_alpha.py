"""A learnable alpha: the alpha-divergence operator and loss with alpha a tensor that gets a gradient.

For the alpha family (``docs/math.md``, "Built-in generators") with b = alpha - 1, per row

    p_j = q_j g(z_j - tau; alpha),     g(v; alpha) = [1 + b v]_+^(1/b)   ((f*)' of the alpha generator),

and tau solves sum_j p_j = 1. With unit q this is alpha-entmax (``entmax.entmax_bisect``), so alpha can be
learned per row, per head or globally ("adaptively sparse" models). alpha > 1 is sparse, 0 < alpha < 1
dense; alpha = 1 (softmax) is refused here: it is ``divergence="kl"``.

Derivatives in closed form at the solution (the iterations are never differentiated). Write
u_j = p_j / q_j, L_j = log u_j, t_j = -b L_j and phi(t) = (e^t - 1 - t) / t^2 (phi(0) = 1/2), all on
the support (p_j > 0; every term below is 0 off it):

* logits: J = diag(s) - s s^T / sum(s), s_j = q_j u_j^(2 - alpha) (``docs/math.md``, "Jacobian");
* alpha: d g / d alpha = g (-log(1 + b v) / b^2 + v / (b (1 + b v))), which at the solution is
  w_j / q_j with w_j = -p_j L_j^2 phi(t_j). Differentiating sum_j p_j = 1 gives
  d tau / d alpha = sum_j w_j / sum_j s_j, hence

      d p_j / d alpha = w_j - s_j sum(w) / sum(s),
      <grad_p, d p / d alpha> = <grad_p, w> - <grad_p, s> sum(w) / sum(s).

* the Fenchel-Young loss l = f-softmax(theta; q) + D_alpha(y, q) - <theta, y> (``docs/math.md``): by the
  envelope theorem (p maximises the f-softmax problem, so its dependence on alpha does not count),
  d l / d alpha = d/d alpha D_alpha(y, q) - d/d alpha D_alpha(p, q) at fixed p and y. With
  F(u) = f(u) - f(0) = (u^alpha - alpha u) / (alpha b) (the f(0) terms cancel between y and p),

      d l / d alpha = sum_{y_j > 0} q_j F_alpha(y_j / q_j) - sum_{p_j > 0} q_j F_alpha(p_j / q_j),
      F_alpha(u) := dF/d alpha = u (1 + alpha L^2 psi(b L) - L E(b L)) / alpha^2,

  with E(t) = (e^t - 1) / t and psi = E'. The gradient in the logits is p - y as for every f.

phi, E and psi are evaluated by their Taylor series near t = 0, so nothing cancels as alpha -> 1
(the closed forms divide by b^2). The forward solve is the solver's safeguarded Newton
(:func:`~hf_fdiv.solver.core.newton_solve` from :func:`bracket_rows`) with one alpha and one Newton
transform per row (log sum p for alpha < 1, (sum p)^b for alpha > 1; ``docs/solver.md``), on dense rows.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..divergences import FDivergence
from .batched import BATCHED_NON_MONOTONE_PASSES, BATCHED_PASSES, backend_chunk_rows
from .cpu_allocator import empty_like_output
from .core import NewtonPolicy, compute_dtype, newton_solve, nonfinite_error, row_chunks
from .grad_buffer import first_order_only, scale_rows, take_buffer
from .reference import reference_rows

__all__ = [
    "RowAlpha",
    "check_alpha",
    "alpha_rows",
    "bracket_rows",
    "solve_alpha_rows",
    "alpha_softargmax_vjp",
    "alpha_loss_terms",
    "AlphaSoftargmaxFunction",
    "AlphaFYLossFunction",
]


# ---------------------------------------------------------------------------------------------
# alpha: validation and layout
# ---------------------------------------------------------------------------------------------


def check_alpha(alpha: Tensor) -> tuple[float, float]:
    """Raise a ValueError that says what to do for an invalid alpha tensor; returns (min, max) of alpha
    (one host synchronisation)."""
    if not isinstance(alpha, Tensor) or not alpha.is_floating_point():
        raise ValueError("a learnable alpha must be a floating-point tensor (e.g. nn.Parameter(torch.tensor(1.5))).")
    if alpha.numel() == 0:
        raise ValueError("the alpha tensor is empty: give one alpha (a scalar), one per row or one per head.")
    a = alpha.detach()
    nan, inf, lo, hi, one = torch.stack(
        [a.isnan().any().double(), a.isinf().any().double(), a.min().double(), a.max().double(), (a == 1).any().double()]
    ).tolist()
    if nan or inf:
        raise ValueError(
            "alpha has NaN or inf entries (a diverged parameter?): alpha must be finite; keep it in range by "
            "parametrising it, e.g. alpha = 1 + torch.nn.functional.softplus(raw) + 1e-3 for a sparse alpha > 1."
        )
    if lo <= 0:
        raise ValueError(
            f"alpha must be > 0 (got min {lo:g}): alpha > 1 is sparse (1.5 = entmax15, 2 = sparsemax), "
            "0 < alpha < 1 dense; parametrise it to stay positive, e.g. alpha = 1 + softplus(raw) + 1e-3."
        )
    if one:
        raise ValueError(
            "alpha = 1 exactly is softmax (the KL divergence), where the alpha formulas divide by alpha - 1: "
            "use divergence='kl' for alpha = 1, or keep a learnable alpha away from 1, e.g. "
            "alpha = 1 + softplus(raw) + 1e-3 (sparse) or alpha = sigmoid(raw) * 0.999 (dense)."
        )
    return lo, hi


def alpha_rows(alpha: Tensor, batch_shape: tuple[int, ...], device) -> Tensor:
    """alpha broadcast to the logits' shape without the class axis and flattened to one alpha per row
    [N] on the logits' ``device`` (differentiable: autograd sums the row gradients back to alpha's own
    shape and device)."""
    try:
        shape = torch.broadcast_shapes(alpha.shape, batch_shape)
    except RuntimeError:
        shape = None
    if shape != tuple(batch_shape):
        raise ValueError(
            f"alpha of shape {tuple(alpha.shape)} does not broadcast to the logits without the class axis "
            f"{tuple(batch_shape)}: use a scalar, one alpha per row, or e.g. [H, 1] per head for [B, H, T, V] logits."
        )
    return alpha.to(device).expand(batch_shape).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The per-row generator and the solve
# ---------------------------------------------------------------------------------------------


class RowAlpha(FDivergence):
    """The alpha generator with one alpha per row (``alpha`` [n, 1]) for the solver's Newton step.

    (f*)'(v) = exp(log1p(b v) / b) on the support 1 + b v > 0 (b = alpha - 1; accurate as b -> 0, where
    a pow of 1 + b v would lose v's digits) and (f*)''(v) = (f*)'(v) / (1 + b v). For b < 0 (alpha < 1) the
    pole 1 + b v = 0 is kept at a distance (as :meth:`FDivergence.clip_to_domain`)."""

    name = "alpha:rows"

    def __init__(self, alpha: Tensor, monotone: bool):
        self.alpha = alpha
        self.b = alpha - 1.0
        self.f_prime_zero = -math.inf  # per row; the generic dense solve never reads it
        self.f_zero = math.nan
        r = torch.where(self.b > 0, self.b, torch.zeros_like(self.b)).squeeze(1)
        # (sum p)^b is convex in tau for 1 < alpha <= 2, log sum p for alpha < 1 (as newton_policy)
        self.solver_policy = NewtonPolicy(r, monotone=monotone)

    def _log_base(self, v: Tensor) -> tuple[Tensor, Tensor]:
        t = self.b * v
        t = torch.where(self.b < 0, t.clamp(min=-1 + 1e-6), t)
        inside = t > -1
        return torch.log1p(torch.where(inside, t, torch.zeros_like(t))), inside

    def f_prime(self, u: Tensor) -> Tensor:
        return torch.expm1(self.b * torch.log(u)) / self.b

    def conj_grad(self, v: Tensor) -> Tensor:
        lb, inside = self._log_base(v)
        return torch.where(inside, torch.exp(lb / self.b), torch.zeros_like(lb))

    def conj_grad_and_hess(self, v: Tensor) -> tuple[Tensor, Tensor]:
        lb, inside = self._log_base(v)
        g = torch.where(inside, torch.exp(lb / self.b), torch.zeros_like(lb))
        h = torch.where(inside, torch.exp(lb * (1.0 / self.b - 1.0)), torch.zeros_like(lb))
        return g, h

    def conj_hess(self, v: Tensor) -> Tensor:
        return self.conj_grad_and_hess(v)[1]

    def jacobian_weight(self, p: Tensor, q) -> Tensor:
        """s_j = q_j u_j^(2 - alpha) = p_j exp(-b log u_j) on the support."""
        pos = p > 0
        L = torch.log(torch.where(pos, p / q, torch.ones_like(p)))
        return torch.where(pos, p * torch.exp(-self.b * L), torch.zeros_like(p))


def bracket_rows(z: Tensor, q, div: RowAlpha) -> tuple[Tensor, Tensor]:
    """[tau_lo, tau_hi] per row (``docs/math.md``, "Bracket"), with each row's own f'."""
    n, V = z.shape
    if isinstance(q, Tensor):
        qf = q.expand_as(z)
        lo = (z - div.f_prime(1.0 / qf)).amax(1)
        hi = -div.f_prime(1.0 / qf.sum(1, keepdim=True)).squeeze(1)
    else:
        lo = -div.f_prime(torch.full((n, 1), 1.0 / q, dtype=z.dtype, device=z.device)).squeeze(1)
        hi = -div.f_prime(torch.full((n, 1), 1.0 / (q * V), dtype=z.dtype, device=z.device)).squeeze(1)
    return lo, torch.maximum(hi, lo)


def solve_alpha_rows(
    x: Tensor,
    alpha: Tensor,
    q,
    alpha_range: tuple[float, float],
    *,
    rows: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
    backend: str = "chunked",
):
    """Solve p for the rows of ``x`` [N, V] with one alpha per row (``alpha`` [N], detached).

    Yields (sel, z, alpha_rows [n, 1], q_rows, tau [n], p [n, V]) per chunk, in the solve dtype (fp64 for
    fp64 logits or any alpha > 2, else fp32); z = x - max (excluded classes at -inf). ``chunked``: Newton
    with a host-side early exit; ``batched``/``triton``: fixed passes for every chunk, then one host
    synchronisation lists the rows not converged, which are re-solved with the early exit."""
    N, V = x.shape
    lo_a, hi_a = alpha_range
    dtype = torch.float64 if (x.dtype == torch.float64 or hi_a > 2) else torch.float32
    monotone = hi_a <= 2
    sync_free = backend != "chunked"
    step = backend_chunk_rows(backend, V)
    passes = max_iter if max_iter is not None else (BATCHED_PASSES if monotone else BATCHED_NON_MONOTONE_PASSES)
    total = N if rows is None else rows.numel()
    pending = []

    def solve(sel, x_rows, early_exit):
        qc = reference_rows(q, sel, V, dtype)
        if isinstance(qc, Tensor):
            x_rows = x_rows.masked_fill(qc == 0, -math.inf)
        m = x_rows.amax(1, keepdim=True).to(dtype)
        z = x_rows.to(dtype) - m
        a = (alpha[sel] if isinstance(sel, slice) else alpha.index_select(0, sel)).to(dtype)[:, None]
        div = RowAlpha(a, monotone)
        lo, hi = bracket_rows(z, qc, div)
        tau, p, converged = newton_solve(
            z, qc, div, lo, hi, max_iter if early_exit else passes, early_exit=early_exit
        )
        return z, a, qc, tau, p, converged

    for a0, b0, sel, x_rows in row_chunks(x, rows, step):
        bad = ~torch.isfinite(x_rows.amax(1))
        if not sync_free and bool(bad.any()):
            raise nonfinite_error(int(bad.sum()))
        z, a, qc, tau, p, converged = solve(sel, x_rows, not sync_free)
        if sync_free:
            pending.append(~converged | bad)
        yield sel, z, a, qc, tau, p
    if sync_free and total:
        redo = torch.cat(pending).nonzero().squeeze(1)  # the one host synchronisation
        if redo.numel():
            sub = redo if rows is None else rows.index_select(0, redo)
            yield from solve_alpha_rows(x, alpha, q, alpha_range, rows=sub, max_iter=max_iter, backend="chunked")


# ---------------------------------------------------------------------------------------------
# Series-stable pieces and the derivatives
# ---------------------------------------------------------------------------------------------

_SERIES_T = 0.1  # |t| below this: Taylor series (10 terms: truncation < 1e-19 relative)


def _series(t: Tensor, coeffs: list[float]) -> Tensor:
    acc = torch.full_like(t, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return acc


_PHI = [1.0 / math.factorial(k + 2) for k in range(11)]  # (e^t - 1 - t) / t^2
_E = [1.0 / math.factorial(k + 1) for k in range(11)]  # (e^t - 1) / t
_PSI = [(k + 1) / math.factorial(k + 2) for k in range(11)]  # E'(t)


def _phi(t: Tensor) -> Tensor:
    small = t.abs() < _SERIES_T
    ts = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, _series(t, _PHI), (torch.expm1(ts) - ts) / (ts * ts))


def _E_fn(t: Tensor) -> Tensor:
    small = t.abs() < _SERIES_T
    ts = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, _series(t, _E), torch.expm1(ts) / ts)


def _psi(t: Tensor) -> Tensor:
    small = t.abs() < _SERIES_T
    ts = torch.where(small, torch.ones_like(t), t)
    return torch.where(small, _series(t, _PSI), (ts * torch.exp(ts) - torch.expm1(ts)) / (ts * ts))


def _log_ratio(p: Tensor, q) -> tuple[Tensor, Tensor]:
    pos = p > 0
    return pos, torch.log(torch.where(pos, p / q, torch.ones_like(p)))


def alpha_softargmax_vjp(p: Tensor, q, alpha: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(J^T g [n, V], <g, dp/dalpha> [n]) at the solution p [n, V] for alpha [n, 1] (module docstring)."""
    b = alpha - 1.0
    pos, L = _log_ratio(p, q)
    zero = torch.zeros_like(p)
    s = torch.where(pos, p * torch.exp(-b * L), zero)
    w = torch.where(pos, -p * L * L * _phi(-b * L), zero)
    s_sum = s.sum(1)
    sg = torch.linalg.vecdot(s, g)
    dx = s * (g - (sg / s_sum)[:, None])
    dalpha = torch.linalg.vecdot(w, g) - sg * w.sum(1) / s_sum
    return dx, dalpha


def _F_and_dF(mass: Tensor, q, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: sum_j q_j F(u_j) and sum_j q_j dF/dalpha(u_j) for u_j = mass_j / q_j over mass_j > 0,
    with F(u) = (u^alpha - alpha u) / (alpha b) = u (L E(b L) - 1) / alpha."""
    b = alpha - 1.0
    pos, L = _log_ratio(mass, q)
    bL = b * L
    E = _E_fn(bL)
    zero = torch.zeros_like(mass)
    F = torch.where(pos, mass * (L * E - 1.0), zero).sum(1) / alpha[:, 0]
    dF = torch.where(pos, mass * (1.0 + alpha * L * L * _psi(bL) - L * E), zero).sum(1) / (alpha[:, 0] ** 2)
    return F, dF


def alpha_loss_terms(p: Tensor, y: Tensor, z: Tensor, tau: Tensor, q, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss l = tau + sum_j q_j u_j^alpha / alpha - <y, z> + sum_j q_j F(y_j / q_j) (the Bregman
    form of ``docs/math.md`` with c(u) = u^alpha / alpha) and d l / d alpha (envelope theorem), [n] each.
    Mass of y on a class with z = -inf gives +inf."""
    b = alpha - 1.0
    pos, L = _log_ratio(p, q)
    c = torch.where(pos, p * torch.exp(b * L), torch.zeros_like(p)).sum(1) / alpha[:, 0]  # sum q u^alpha / alpha
    yz = torch.where(y > 0, y * z, torch.zeros_like(y)).sum(1)
    Fy, dFy = _F_and_dF(y, q, alpha)
    _, dFp = _F_and_dF(p, q, alpha)
    return tau + c - yz + Fy, dFy - dFp


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


class AlphaSoftargmaxFunction(torch.autograd.Function):
    """p = f-softargmax(x; q) of x [N, V] for the alpha family with one alpha per row (``alpha`` [N];
    alpha-entmax for unit q); backward: the closed-form J^T g for x and <g, dp/dalpha> per row for alpha
    (module docstring). First derivatives only (a backward with create_graph=True raises)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, q, alpha_range, max_iter, backend):
        out = empty_like_output(x)
        a_det = alpha.detach()
        for sel, _, _, _, _, p in solve_alpha_rows(x, a_det, q, alpha_range, max_iter=max_iter, backend=backend):
            out[sel] = p.to(x.dtype)
        ctx.q, ctx.dtype, ctx.backend = q, torch.float64 if alpha_range[1] > 2 else compute_dtype(x.dtype), backend
        ctx.save_for_backward(out, a_det)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        first_order_only("f_softargmax with a learnable alpha")  # alpha is held detached: no silent 0
        p, alpha = ctx.saved_tensors
        N, V = p.shape
        dtype = ctx.dtype
        dx = empty_like_output(p) if ctx.needs_input_grad[0] else None
        da = torch.empty(N, dtype=dtype, device=p.device)
        step = backend_chunk_rows(ctx.backend, V)
        for _, _, sl, p_rows in row_chunks(p, None, step):
            qc = reference_rows(ctx.q, sl, V, dtype)
            d, a_grad = alpha_softargmax_vjp(p_rows.to(dtype), qc, alpha[sl].to(dtype)[:, None], grad_out[sl].to(dtype))
            if dx is not None:
                dx[sl] = d.to(dx.dtype)
            da[sl] = a_grad
        return dx, (da.to(alpha.dtype) if ctx.needs_input_grad[1] else None), None, None, None, None


class AlphaFYLossFunction(torch.autograd.Function):
    """Per-row Fenchel-Young losses [N] of the alpha family with one alpha per row (``alpha`` [N]).

    ``target``: ids [N] (only ``rows`` are fitted, others give 0) or a distribution [N, V];
    ``label_smoothing`` applies to ids. Forward writes p - y into a gradient buffer (as
    :class:`~hf_fdiv.losses.FDivLossFunction`: scaled in place by a backward that frees the graph, copied
    when it is retained) and d l_i / d alpha_i into an [N] vector."""

    @staticmethod
    def forward(ctx, x, alpha, target, q, rows, alpha_range, label_smoothing, max_iter, backend):
        N, V = x.shape
        a_det = alpha.detach()
        dtype = torch.float64 if (x.dtype == torch.float64 or alpha_range[1] > 2) else torch.float32
        losses = torch.zeros(N, dtype=compute_dtype(x.dtype), device=x.device)
        dl_da = torch.zeros(N, dtype=dtype, device=x.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = empty_like_output(x, zero=rows is not None)
        is_ids = not target.is_floating_point()
        for sel, z, a, qc, tau, p in solve_alpha_rows(
            x, a_det, q, alpha_range, rows=rows, max_iter=max_iter, backend=backend
        ):
            if is_ids:
                c = target[sel]
                y = torch.full_like(p, label_smoothing / V)
                y.scatter_add_(1, c[:, None], torch.full_like(p[:, :1], 1.0 - label_smoothing))
            else:
                y = (target[sel] if isinstance(sel, slice) else target.index_select(0, sel)).to(dtype)
            loss, dl = alpha_loss_terms(p, y, z, tau, qc, a)
            losses[sel] = loss.to(losses.dtype)
            dl_da[sel] = dl
            if grad is not None:
                if isinstance(sel, slice):
                    grad[sel] = p - y
                else:
                    grad.index_copy_(0, sel, (p - y).to(x.dtype))
        # per row, after the loop: a re-solved row replaces its first (uncertain) result
        if bool((~torch.isfinite(losses)).any()):  # one host check per call
            raise ValueError(
                "a target puts mass on a class with logit -inf or reference q = 0 (it is excluded), so the loss "
                "is infinite: give those classes zero target mass, or do not mask the target class."
            )
        ctx.grad_buffer, ctx.backend = grad, backend
        ctx.save_for_backward(dl_da)
        ctx.alpha_dtype = alpha.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        first_order_only("fdiv_loss")
        (dl_da,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            grad, keep = take_buffer(ctx, "grad_buffer", "fdiv_loss")
            dx = scale_rows(grad, grad_losses, not keep)
        da = (grad_losses.to(dl_da.dtype) * dl_da).to(ctx.alpha_dtype) if ctx.needs_input_grad[1] else None
        return dx, da, None, None, None, None, None, None, None

