"""The f-softargmax solver: p = argmax_{p in simplex} <p, theta> - D_f(p, q), row by row.

For every row, p_j = q_j (f*)'(theta_j - tau) with (f*)'(v) = (f')^{-1}(max(v, f'(0))), and the
normaliser tau is the root of phi(tau) = sum_j p_j(tau) - 1 (``docs/math.md``).
All arithmetic is in fp32 (fp64 for fp64 inputs, and for alpha > 2).

Backends (``docs/solver.md``), chosen per call by :func:`solver_backend`:

* ``chunked`` (:mod:`.chunked`): cache-sized chunks and host-side early exits, for CPU tensors;
* ``batched`` (:mod:`.batched`): all rows at once, fixed passes and device-side exactness
  certificates, one host synchronisation per call in the common case, for CUDA tensors;
* ``triton``: CUDA kernels for the losses, the operator and the fused LM head
  (:mod:`hf_fdiv.solver.triton_kernels`); cases they do not cover use ``batched``.

``HF_FDIV_SOLVER=auto|chunked|batched|triton`` forces one (``auto``: ``chunked`` on CPU; on CUDA
``triton`` when Triton can be imported, else ``batched``), so that CPU CI runs every path.

Differentiation never unrolls the iterations: :class:`FSoftargmaxFunction` uses the closed-form
Jacobian J = diag(s) - s s^T / sum(s), s_j = q_j / f''(p_j / q_j) (zero off the support).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from ..divergences import KL, DivergenceSpec, FDivergence, get_divergence
from . import learnable_alpha
from .batched import backend_chunk_rows, solve_rows_batched
from .chunked import CHUNK_ELEMENTS, SPARSE_TOPK, solve_rows_chunked
from .cpu_allocator import empty_like_output, release_cached_outputs, tune_cpu_allocator
from .core import (
    DEFAULT_MAX_ITER,
    NewtonPolicy,
    NonFiniteLogitsError,
    RowSolution,
    as_rows,
    compute_dtype,
    f_softmax_shifted,
    kl_softargmax,
    newton_policy,
    row_statistics,
    rows_per_chunk,
    softargmax_vjp,
    sum_q_bregman,
)
from .reference import (
    ReferenceSpec,
    RowProvider,
    flatten_reference,
    prepare_reference,
    reference_at_targets,
    reference_rows,
    reference_total,
)

__all__ = [
    "f_softargmax",
    "f_softmax",
    "FSoftargmaxFunction",
    "FSoftmaxFunction",
    "solve_rows",
    "solver_backend",
    "triton_available",
    "BACKENDS",
    "ReferenceSpec",
    "RowSolution",
    "RowProvider",
    "NonFiniteLogitsError",
    "NewtonPolicy",
    "newton_policy",
    "prepare_reference",
    "flatten_reference",
    "reference_rows",
    "reference_at_targets",
    "reference_total",
    "as_rows",
    "compute_dtype",
    "sum_q_bregman",
    "row_statistics",
    "work_chunk_rows",
    "tune_cpu_allocator",
    "empty_like_output",
    "release_cached_outputs",
    "rows_per_chunk",
    "CHUNK_ELEMENTS",
    "DEFAULT_MAX_ITER",
    "SPARSE_TOPK",
]

BACKENDS = ("auto", "chunked", "batched", "triton")
#: what ``auto`` picks for tensors on an accelerator other than CUDA, or on CUDA without Triton
GPU_DEFAULT_BACKEND = "batched"
ENV_VAR = "HF_FDIV_SOLVER"


def triton_available() -> bool:
    """True when the Triton kernels can be imported (a CUDA build of torch with triton, or
    ``TRITON_INTERPRET=1`` for testing them on CPU tensors)."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def solver_backend(x: Tensor) -> str:
    """The backend for a tensor: ``HF_FDIV_SOLVER`` if set, else ``chunked`` on CPU, ``triton`` on CUDA
    when Triton can be imported and ``GPU_DEFAULT_BACKEND`` otherwise. Read at every call."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r} is not a solver backend: use one of {', '.join(BACKENDS)}.")
    if choice == "auto":
        if x.device.type == "cpu":
            return "chunked"
        # the kernels meet issue 23's traffic and launch budgets by the cost meter; batched makes ~500
        # launches per chunk (benchmarks/gpu_cost.py)
        return "triton" if x.device.type == "cuda" and triton_available() else GPU_DEFAULT_BACKEND
    if choice == "triton" and not triton_available():
        raise ValueError(
            f"{ENV_VAR}=triton but Triton cannot be imported: install it (`pip install hf-fdiv[gpu]`) or use "
            f"{ENV_VAR}=batched."
        )
    return choice


def _use_triton(x: Tensor, q, div: FDivergence) -> bool:
    """The Triton operator kernels cover this call (backend ``triton``, scalar q, KL / JS / 1 < alpha <= 2,
    fp32/bf16/fp16)."""
    if solver_backend(x) != "triton":
        return False
    from . import triton_kernels  # its supports() refuses tensor references and fp64 logits

    return triton_kernels.supports(div, q, x)


def work_chunk_rows(x: Tensor, V: int) -> int:
    """Rows per chunk of elementwise work after a solve (gradient scaling, backward products):
    cache-sized on CPU, a memory budget on other devices."""
    return backend_chunk_rows(solver_backend(x), V)


def solve_rows(
    x: Tensor,
    q: Union[float, Tensor, RowProvider],
    div: FDivergence,
    *,
    rows: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
    skip_nonfinite: bool = False,
    resolve: bool = True,
    backend: Optional[str] = None,
    **chunk_options,
) -> Iterator[RowSolution]:
    """Solve f-softargmax for the rows of ``x`` [N, V]: the one entry point of every consumer.

    Args:
        x: logits [N, V] (any float dtype; solved in fp32, fp64 for fp64 inputs).
        q: a float, a [V] prior, [N, V] rows (see :func:`prepare_reference` / :func:`flatten_reference`)
            or a :class:`RowProvider`.
        rows: optional LongTensor restricting the solve to those rows (e.g. non-ignored targets).
        out: optional [N, V] buffer (any float dtype): dense p is written into ``out[rows]``.
        skip_nonfinite: rows with NaN/+inf logits (or no finite logit) are solved as all-zero rows and
            flagged in ``RowSolution.skipped`` instead of raising :class:`NonFiniteLogitsError`.
        resolve: see :func:`~hf_fdiv.solver.batched.solve_rows_batched` (``batched`` only).
        backend: ``chunked`` or ``batched``; default from :func:`solver_backend` (``triton`` solves
            with ``batched`` here: the kernels compute whole losses, see :mod:`hf_fdiv.losses`).

    Yields :class:`RowSolution` objects in order; consume each before advancing. A later solution for
    the same rows replaces an earlier ``uncertain`` one (``batched``), so write results per row.
    """
    backend = backend or solver_backend(x)
    if x.device.type == "cpu":
        tune_cpu_allocator()  # once per process: chunk temporaries reuse freed memory (issue 22)
    if backend == "chunked":
        return solve_rows_chunked(
            x, q, div, rows=rows, out=out, max_iter=max_iter, skip_nonfinite=skip_nonfinite, **chunk_options
        )
    return solve_rows_batched(
        x, q, div, rows=rows, out=out, max_iter=max_iter, skip_nonfinite=skip_nonfinite, resolve=resolve,
        **chunk_options,
    )


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


class FSoftargmaxFunction(torch.autograd.Function):
    """p = f-softargmax(x; q) over the last axis of x [N, V]; VJP from the closed-form Jacobian.

    For rows solved on a compact support (sparse f, CPU path) the backward works on the support only."""

    @staticmethod
    def forward(ctx, x: Tensor, q, div: FDivergence, max_iter: Optional[int]):
        ctx.triton = _use_triton(x, q, div)
        if ctx.triton:
            from . import triton_kernels

            p, tau, converged = triton_kernels.softargmax_rows(x, div, q, n_iter=max_iter)
            # rows with a non-finite logit are not certified (nor is a non-finite tau): no [N, V] scan of p
            redo = (~converged | ~torch.isfinite(tau)).nonzero().squeeze(1)  # one host synchronisation
            if redo.numel():  # exact PyTorch solve of the rows the kernel did not certify (raises on NaN)
                for _ in solve_rows(x, q, div, rows=redo, out=p, max_iter=max_iter, backend="batched"):
                    pass
            ctx.div, ctx.q = div, q
            ctx.save_for_backward(p)
            return p
        out = empty_like_output(x)
        compact = []  # (rows, index, p, q) of chunks with a certified compact support
        for sol in solve_rows(x, q, div, out=out, max_iter=max_iter):
            if sol.index is not None and sol.uncertain is None and x.requires_grad:
                compact.append((sol.rows, sol.index, sol.p, sol.q_cols))
        ctx.div, ctx.q, ctx.compact = div, q, compact
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (p,) = ctx.saved_tensors
        div, q = ctx.div, ctx.q
        if ctx.triton:
            from . import triton_kernels

            return triton_kernels.softargmax_backward_rows(p, grad_out.contiguous(), div, q), None, None, None
        N, V = p.shape
        work_dtype = compute_dtype(p.dtype)
        dx = empty_like_output(p)
        covered = 0
        for rows, index, pk, qk in ctx.compact:
            gk = grad_out[rows].gather(1, index).to(work_dtype)
            d = dx[rows]
            d.zero_()
            d.scatter_(1, index, softargmax_vjp(div, pk, qk, gk).to(dx.dtype))
            covered += d.shape[0]
        if covered < N:  # dense rows (compact chunks are the leading slices of a CPU solve only when all are)
            done = torch.zeros(N, dtype=torch.bool, device=p.device)
            for rows, *_ in ctx.compact:
                done[rows] = True
            step = work_chunk_rows(p, V)
            for a in range(0, N, step):
                sl = slice(a, min(N, a + step))
                if ctx.compact and bool(done[sl].all()):
                    continue
                qc = reference_rows(q, sl, V, work_dtype)
                softargmax_vjp(div, p[sl].to(work_dtype), qc, grad_out[sl].to(work_dtype), out=dx[sl])
        return dx, None, None, None


class FSoftmaxFunction(torch.autograd.Function):
    """Value max_p <p, x> - D_f(p, q) per row of x [N, V]; its gradient is p."""

    @staticmethod
    def forward(ctx, x: Tensor, q, div: FDivergence, max_iter: Optional[int]):
        N, V = x.shape
        value = torch.empty(N, dtype=compute_dtype(x.dtype), device=x.device)
        p_out = empty_like_output(x) if x.requires_grad else None
        for sol in solve_rows(x, q, div, out=p_out, max_iter=max_iter):
            value[sol.rows] = sol.row_max + f_softmax_shifted(sol, div)
        if p_out is not None:
            ctx.save_for_backward(p_out)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (p,) = ctx.saved_tensors
        return grad_out[:, None].to(p.dtype) * p, None, None, None


def f_softargmax(
    logits: Tensor,
    divergence: Union[DivergenceSpec, Tensor] = "alpha:1.5",
    reference: ReferenceSpec = "unit",
    dim: int = -1,
    max_iter: Optional[int] = None,
) -> Tensor:
    """f-softargmax: argmax_{p in simplex} <p, logits> - D_f(p, q) along ``dim``.

    Args:
        logits: float tensor of any shape [..., V, ...]; bf16/fp16 are solved in fp32.
        divergence: spec string (``"kl"``, ``"alpha:1.5"``, ``"js"``, ...) or an FDivergence; or a
            **learnable alpha**: a float tensor of alpha-divergence parameters (alpha > 0, alpha != 1),
            broadcastable to the logits' shape without ``dim`` (a scalar, one per row, ``[H, 1]`` per
            head of ``[B, H, T, V]`` logits). It gets a gradient d p / d alpha in closed form at the
            solution (:mod:`hf_fdiv.solver.learnable_alpha`); with unit q this is
            ``entmax.entmax_bisect(logits, alpha)``. Rows are solved densely.
        reference: ``"unit"`` (q = 1), ``"uniform"`` (q = 1/V), a positive number, or a non-negative
            tensor ([V] class prior or broadcastable to the logits); q_j = 0 excludes class j.
        dim: the class dimension.
        max_iter: root-search passes (CPU: a cap, default 60, 200 for alpha > 2; GPU: a fixed count).

    Returns:
        p with the shape and dtype of ``logits``: p >= 0, sums to 1 along ``dim``; KL with unit q is
        ``torch.softmax``, alpha = 1.5 is entmax15, alpha = 2 is sparsemax, chi2 is sparsemax(logits/2).
        Differentiable w.r.t. ``logits`` (closed-form Jacobian) and a tensor alpha; ``reference`` gets
        no gradient.
    """
    if isinstance(divergence, Tensor):
        alpha_range = learnable_alpha.check_alpha(divergence)
        q = prepare_reference(reference, logits, dim)
        x, shape = as_rows(logits, dim)
        alpha = learnable_alpha.alpha_rows(divergence, shape[:-1], x.device)
        p = learnable_alpha.AlphaSoftargmaxFunction.apply(
            x, alpha, flatten_reference(q, shape), alpha_range, max_iter, solver_backend(x)
        )
        return p.reshape(shape).movedim(-1, dim)
    div = get_divergence(divergence)
    q = prepare_reference(reference, logits, dim)
    x, shape = as_rows(logits, dim)
    qf = flatten_reference(q, shape)
    if isinstance(div, KL) and not isinstance(qf, (Tensor, RowProvider)):
        p = kl_softargmax(x)  # torch's own softmax kernels and their backward
    else:
        p = FSoftargmaxFunction.apply(x, qf, div, max_iter)
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
    ``logits`` without ``dim``. (A learnable alpha tensor is taken by :func:`f_softargmax` and the loss.)
    """
    if isinstance(divergence, Tensor):
        raise ValueError(
            "f_softmax takes a divergence spec; a learnable alpha tensor is supported by f_softargmax and "
            "fdiv_loss (whose value includes f-softmax): use a spec such as divergence='alpha:1.5' for a fixed alpha."
        )
    div = get_divergence(divergence)
    q = prepare_reference(reference, logits, dim)
    x, shape = as_rows(logits, dim)
    v = FSoftmaxFunction.apply(x, flatten_reference(q, shape), div, max_iter)
    return v.reshape(shape[:-1])
