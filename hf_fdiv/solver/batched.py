"""The sync-free backend (used for CUDA tensors): all rows at once, fixed passes, device-side checks.

On a GPU every host decision (``bool(t)``, ``.item()``, a data-dependent shape) drains the queue, and
small chunks leave the device launch-bound. Here chunks are sized by a memory budget
(``BATCHED_CHUNK_ELEMENTS``), every root search runs a fixed number of Newton passes with no early
exit, and each row gets a device-side certificate instead of a host check:

* KL: closed form, always exact;
* sparse f: Newton on the top-``BATCHED_TOPK`` entries of every row; exact for the whole row when it
  converged and every left-out entry is clipped (z_K - tau <= f'(0));
* dense f: Newton on the whole row; exact when tau is a fixed point to a few ulps.

Rows without a certificate (support larger than K, slow convergence, non-finite logits, a bad
computed reference) are ``uncertain``. After the last chunk one host synchronisation lists them;
sparse f retry them with a dense batched solve started at the top-K root (a valid lower bound), and
whatever is still uncertain is solved by the exact CPU-style path, which also raises the errors.
The common case costs one synchronisation per call; rare rows may be slow, never wrong.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from ..divergences import KL, FDivergence
from .chunked import CHUNK_ELEMENTS, solve_rows_chunked
from .core import RowSolution, bracket, newton_policy, newton_solve, row_chunks, rows_per_chunk, solve_dtype, solve_kl
from .reference import RowProvider, bad_reference_rows, reference_at_columns, reference_rows

__all__ = [
    "solve_rows_batched",
    "backend_chunk_rows",
    "BATCHED_CHUNK_ELEMENTS",
    "BATCHED_TOPK",
    "BATCHED_PASSES",
    "BATCHED_NON_MONOTONE_PASSES",
    "BATCHED_DENSE_PASSES",
    "BATCHED_DENSE_NON_MONOTONE_PASSES",
]

#: rows per chunk = BATCHED_CHUNK_ELEMENTS // V: a few fp32 [rows, V] temporaries of 256 MiB at most.
BATCHED_CHUNK_ELEMENTS = 1 << 26
#: the support guess for sparse f (measured supports of alpha = 1.5 on randn logits: <= 52).
BATCHED_TOPK = 64
#: fixed Newton passes of the searches over top-K columns (sparse f: [rows, K], cheap): monotone
#: generators need 1-9 in fp32 (solver.md), the others get more.
BATCHED_PASSES = 12
BATCHED_NON_MONOTONE_PASSES = 60
#: fixed passes of the dense searches, each a sweep of the [rows, V] block: from the solver's starts the
#: built-in dense generators certified every row of (1-5) * randn logits, a quarter of the rows with a
#: peaked top class, within 6 passes at V = 1 000, 32 000 and 128 256 (measured: reverse KL 1-2,
#: Hellinger and alpha = 0.5 2-5, JS 3-4, alpha = 0.75 2-6); rows that need more (scale 20: up to 7;
#: V = 10) are uncertain and re-solved by the exact path, never wrong.
BATCHED_DENSE_PASSES = 6
BATCHED_DENSE_NON_MONOTONE_PASSES = 12


def backend_chunk_rows(backend: str, V: int) -> int:
    """Rows of V classes per chunk of elementwise work on a backend: cache-sized for ``chunked``, the
    memory budget for the sync-free backends (read at call time)."""
    return rows_per_chunk(CHUNK_ELEMENTS if backend == "chunked" else BATCHED_CHUNK_ELEMENTS, V)


def _passes(div: FDivergence, max_iter: Optional[int], dense: bool) -> int:
    if max_iter is not None:
        return max_iter
    monotone = newton_policy(div).monotone
    if dense:
        return BATCHED_DENSE_PASSES if monotone else BATCHED_DENSE_NON_MONOTONE_PASSES
    return BATCHED_PASSES if monotone else BATCHED_NON_MONOTONE_PASSES


def _solve_pass(
    x: Tensor,
    q,
    div: FDivergence,
    rows: Optional[Tensor],
    out: Optional[Tensor],
    max_iter: Optional[int],
    skip_nonfinite: bool,
    chunk_elements: Optional[int],
    topk: Optional[int],
    lower: Optional[Tensor],
    uncertain_all: Tensor,
    tau_all: Optional[Tensor] = None,
) -> Iterator[RowSolution]:
    """One sync-free pass over ``rows`` (all rows when None); ``topk`` None solves densely; ``lower``
    [len(rows)] is a known lower bound of tau. Writes each row's uncertainty into ``uncertain_all``
    (and tau into ``tau_all`` when given)."""
    N, V = x.shape
    work_dtype = solve_dtype(div, x.dtype)
    step = rows_per_chunk(chunk_elements or BATCHED_CHUNK_ELEMENTS, V)
    passes = _passes(div, max_iter, dense=topk is None or min(V, topk) >= V)
    lazy_q = isinstance(q, RowProvider)
    scratch: list = []  # the root searches' buffers, shared by every chunk
    for a, b, sel, x_rows in row_chunks(x, rows, step):
        qc = reference_rows(q, sel, V, work_dtype)
        unsure = None
        if isinstance(qc, Tensor):
            if lazy_q:  # a bad computed row is re-solved by the exact path, which raises
                unsure = bad_reference_rows(qc)
            # A zero reference excludes the class (the exact perspective limit for super-linear f).
            x_rows = x_rows.masked_fill(qc == 0, -math.inf)
        m = x_rows.amax(1).to(work_dtype)
        nonfinite = ~torch.isfinite(m)
        skipped = None
        if skip_nonfinite:
            skipped = nonfinite
            x_rows = x_rows.masked_fill(nonfinite[:, None], 0.0)
        else:  # re-solved by the exact path, which raises NonFiniteLogitsError
            unsure = nonfinite if unsure is None else unsure | nonfinite
        m = m.masked_fill(nonfinite, 0.0)
        out_rows = out[sel] if out is not None and isinstance(sel, slice) else None
        if isinstance(div, KL):
            z = x_rows.to(work_dtype) - m[:, None]
            direct = out_rows is not None and out_rows.dtype == work_dtype and not isinstance(qc, Tensor)
            tau, p = solve_kl(z, qc, out_rows if direct else None)
            sol = RowSolution(sel, x_rows, m, qc, tau, p, None, qc, None)
        elif topk is not None and min(V, topk) < V:
            vals, idx = x_rows.topk(topk, dim=1, sorted=False)
            vals = vals.to(work_dtype) - m[:, None]
            qk = reference_at_columns(qc, idx)
            lo, hi = bracket(vals, qk, div)
            tau, pk, converged = newton_solve(vals, qk, div, lo, hi, passes, early_exit=False, scratch=scratch)
            # Exact for the whole row iff every left-out entry is clipped: z_j - tau <= f'(0).
            exact = converged & (vals.amin(1) - tau <= div.f_prime_zero)
            unsure = ~exact if unsure is None else unsure | ~exact
            sol = RowSolution(sel, x_rows, m, qc, tau, pk, vals, qk, idx)
        else:
            z = x_rows.to(work_dtype) - m[:, None]
            lo, hi = bracket(z, qc, div)
            if lower is not None:
                lo = torch.maximum(lo, lower[a:b])
                hi = torch.maximum(hi, lo)
            tau, p, converged = newton_solve(
                z, qc, div, lo, hi, passes, early_exit=False, out=out_rows, scratch=scratch
            )
            unsure = ~converged if unsure is None else unsure | ~converged
            sol = RowSolution(sel, x_rows, m, qc, tau, p, z, qc, None)
        if unsure is None:  # KL on finite rows: exact
            unsure = torch.zeros_like(m, dtype=torch.bool)
        if skipped is not None:
            unsure = unsure & ~skipped
            sol.skipped = skipped
        sol.uncertain = unsure
        uncertain_all[a:b] = unsure
        if tau_all is not None:
            tau_all[a:b] = tau
        sol.scratch = scratch
        sol.write_into(out)
        yield sol


def solve_rows_batched(
    x: Tensor,
    q: Union[float, Tensor, RowProvider],
    div: FDivergence,
    *,
    rows: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    max_iter: Optional[int] = None,
    skip_nonfinite: bool = False,
    resolve: bool = True,
    chunk_elements: Optional[int] = None,
    topk: int = BATCHED_TOPK,
) -> Iterator[RowSolution]:
    """Sync-free solve of the rows of ``x`` [N, V] (see :func:`hf_fdiv.solver.solve_rows`).

    Yields one :class:`RowSolution` per memory-budget chunk with its ``uncertain`` mask. With
    ``resolve`` (default) it then yields exact solutions for the uncertain rows, which replace the
    earlier ones (one host synchronisation when every row was certified). With ``resolve=False`` the
    caller collects ``uncertain`` and re-solves those rows itself (the fused LM head does, once per call).
    """
    total = x.shape[0] if rows is None else rows.numel()
    uncertain = torch.zeros(total, dtype=torch.bool, device=x.device)
    sparse_first = div.sparse and not isinstance(div, KL)
    # the top-K root is a lower bound of the full row's root (phi only grows with more classes)
    tau_topk = torch.empty(total, dtype=solve_dtype(div, x.dtype), device=x.device) if sparse_first else None
    yield from _solve_pass(
        x, q, div, rows, out, max_iter, skip_nonfinite, chunk_elements, topk if sparse_first else None, None,
        uncertain, tau_topk,
    )
    if not resolve:
        return
    pending = uncertain.nonzero().squeeze(1)  # the one host synchronisation of the common case
    if pending.numel() == 0:
        return
    if sparse_first and newton_policy(div).monotone:
        # Supports larger than K: a dense batched solve of those rows only.
        lower = tau_topk.index_select(0, pending)
        sub = pending if rows is None else rows.index_select(0, pending)
        retry = torch.zeros(sub.numel(), dtype=torch.bool, device=x.device)
        yield from _solve_pass(x, q, div, sub, out, max_iter, skip_nonfinite, chunk_elements, None, lower, retry)
        pending = pending.index_select(0, retry.nonzero().squeeze(1))
        if pending.numel() == 0:
            return
    sub = pending if rows is None else rows.index_select(0, pending)
    yield from solve_rows_chunked(x, q, div, rows=sub, out=out, max_iter=max_iter, skip_nonfinite=skip_nonfinite)
