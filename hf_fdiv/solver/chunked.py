"""The CPU backend: cache-sized chunks of rows, early exit, exact fallbacks decided on the host.

Rows are shifted by their max and processed in chunks of ``CHUNK_ELEMENTS`` so that temporaries stay
in cache. KL has a closed form. Sparse f (f'(0) finite) are solved on the top-K entries of each row
and accepted when the K-th entry is below the threshold (then the solve is exact for the whole row);
otherwise the candidates z_j > tau_K + f'(0) are counted and solved exactly, or densely when there
are too many. Each chunk stops iterating once every row has converged. On a CPU each host decision
is cheap; on a GPU each one drains the queue, so CUDA tensors use :mod:`hf_fdiv.solver.batched`.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from ..divergences import KL, FDivergence
from .core import RowSolution, bracket, newton_solve, nonfinite_error, row_chunks, rows_per_chunk, solve_dtype, solve_kl
from .reference import RowProvider, bad_reference_rows, reference_at_columns, reference_rows

__all__ = ["solve_rows_chunked", "CHUNK_ELEMENTS", "SPARSE_TOPK", "SPARSE_MAX_SUPPORT_FRACTION"]

#: rows per chunk = max(1, CHUNK_ELEMENTS // V): temporaries stay a few MB, in cache.
CHUNK_ELEMENTS = 1 << 21
#: first guess of the support size for sparse f (top-K solve, exact when accepted).
SPARSE_TOPK = 32
#: beyond this many candidates per row, sparse f are solved densely.
SPARSE_MAX_SUPPORT_FRACTION = 0.125


def _solve_sparse(x_rows, m, q, div, max_iter, topk, workspace, out, scratch):
    """Sparse f: solve on the top-K entries, verify exactness, widen or fall back to dense.

    Returns (tau, p, z, q_cols, index); index None means dense [n, V]."""
    n, V = x_rows.shape
    threshold = div.f_prime_zero
    K = min(V, topk)
    lo_sub = None
    if K < V:
        vals, idx = x_rows.topk(K, dim=1, sorted=False)
        vals = vals.to(m.dtype) - m[:, None]
        qk = reference_at_columns(q, idx)
        lo, hi = bracket(vals, qk, div)
        tau, pk, _ = newton_solve(vals, qk, div, lo, hi, max_iter, early_exit=True, scratch=scratch)
        # Exact for the whole row iff every left-out entry is clipped: z_j - tau <= f'(0).
        if bool((vals.amin(1) - tau <= threshold).all()):
            return tau, pk, vals, qk, idx
        lo_sub = tau  # the root on a subset is a valid lower bound for the full row
        # Candidates: z_j > tau_sub + f'(0), i.e. x_j > max + tau_sub + f'(0).
        # (compared in the compute dtype: rounding the threshold to bf16 could drop the max itself)
        counts = (x_rows > (m + tau + threshold)[:, None]).sum(1)
        support_bound = max(1, int(counts.max()))
        if support_bound <= max(K, int(SPARSE_MAX_SUPPORT_FRACTION * V)) and support_bound < V:
            vals, idx = x_rows.topk(support_bound, dim=1, sorted=False)
            vals = vals.to(m.dtype) - m[:, None]
            qk = reference_at_columns(q, idx)
            _, hi = bracket(vals, qk, div)
            tau, pk, _ = newton_solve(
                vals, qk, div, lo_sub, torch.maximum(hi, lo_sub), max_iter, early_exit=True, scratch=scratch
            )
            return tau, pk, vals, qk, idx
    z = _shifted(x_rows, m, workspace)
    lo, hi = bracket(z, q, div)
    if lo_sub is not None:
        lo = torch.maximum(lo, lo_sub)
        hi = torch.maximum(hi, lo)
    tau, p, _ = newton_solve(z, q, div, lo, hi, max_iter, early_exit=True, out=out, scratch=scratch)
    return tau, p, z, q, None


def _shifted(x_rows: Tensor, m: Tensor, workspace: Tensor) -> Tensor:
    z = workspace[: x_rows.shape[0]]
    if x_rows.dtype == z.dtype:
        return torch.sub(x_rows, m[:, None], out=z)  # one pass
    z.copy_(x_rows)
    return z.sub_(m[:, None])


def solve_rows_chunked(
    x: Tensor,
    q: Union[float, Tensor, RowProvider],
    div: FDivergence,
    *,
    rows: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
    topk: int = SPARSE_TOPK,
    chunk_elements: Optional[int] = None,
    workspace: Optional[Tensor] = None,
    skip_nonfinite: bool = False,
) -> Iterator[RowSolution]:
    """Solve f-softargmax for the rows of ``x`` [N, V] chunk by chunk (see :func:`hf_fdiv.solver.solve_rows`).

    ``chunk_elements`` sets the rows per chunk (chunk_elements // V, at least 1; default
    ``CHUNK_ELEMENTS``, read at call time); ``workspace``
    (optional, [>= rows per chunk, V] in the compute dtype) is reused instead of allocated."""
    N, V = x.shape
    work_dtype = solve_dtype(div, x.dtype)
    step = rows_per_chunk(chunk_elements or CHUNK_ELEMENTS, V)
    total = N if rows is None else rows.numel()
    is_kl = isinstance(div, KL)
    chunk_rows = min(step, total)
    if workspace is None or workspace.dtype != work_dtype or workspace.shape[0] < chunk_rows or workspace.shape[1] != V:
        workspace = torch.empty((chunk_rows, V), dtype=work_dtype, device=x.device) if total else None
    lazy_q = isinstance(q, RowProvider)
    q_has_zero = isinstance(q, Tensor) and bool((q == 0).any())
    # the root searches' buffers, shared by every chunk: a fresh allocation per chunk costs page faults
    # (measured: most of a dense generator's time, and the process-to-process spread, issue 22)
    scratch: list = []
    for _, _, sel, x_rows in row_chunks(x, rows, step):
        qc = reference_rows(q, sel, V, work_dtype)
        if lazy_q and bool(bad_reference_rows(qc).any()):
            raise ValueError("a computed reference chunk has negative, NaN or inf entries, or an all-zero row.")
        if q_has_zero or (lazy_q and bool((qc == 0).any())):
            # A zero reference excludes the class (the exact perspective limit for super-linear f).
            x_rows = x_rows.masked_fill(qc == 0, -math.inf)
        m = x_rows.amax(1).to(work_dtype)
        skipped = ~torch.isfinite(m)
        if bool(skipped.any()):
            if not skip_nonfinite:
                raise nonfinite_error(int(skipped.sum()))
            x_rows = x_rows.masked_fill(skipped[:, None], 0.0)
            m = m.masked_fill(skipped, 0.0)
        else:
            skipped = None
        out_rows = None
        if out is not None and isinstance(sel, slice):
            out_rows = out[sel]
        if is_kl:
            z = _shifted(x_rows, m, workspace)
            direct = out_rows is not None and out_rows.dtype == work_dtype and not isinstance(qc, Tensor)
            tau, p = solve_kl(z, qc, out_rows if direct else None)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, None, qc, None)
        elif div.sparse:
            tau, p, zs, qs, idx = _solve_sparse(x_rows, m, qc, div, max_iter, topk, workspace, out_rows, scratch)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, zs, qs, idx)
        else:
            z = _shifted(x_rows, m, workspace)
            lo, hi = bracket(z, qc, div)
            tau, p, _ = newton_solve(z, qc, div, lo, hi, max_iter, early_exit=True, out=out_rows, scratch=scratch)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, z, qc, None)
        sol.skipped = skipped
        sol.scratch = scratch
        sol.write_into(out)
        yield sol
