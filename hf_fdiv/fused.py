"""Fused LM-head + f-divergence loss: never materialise the [tokens x vocab] logits.

For hidden states h [N, H] and an LM head W [V, H] (+ bias b), the loss is
sum_{valid tokens} l_f(s(h W^T + b), y; q) with s the architecture's logit transform (scale, soft-cap).
Tokens are processed in chunks: per chunk the fp32 logits are formed, f-softargmax is solved, and
d loss / d logits = p - y is pushed through the head at once,

    grad_h = (p - y) W,        grad_W += (p - y)^T h,        grad_b += sum (p - y),

all during the forward pass; the backward only rescales them (the output is a scalar sum): in place
when the backward frees the graph, as copies when it is retained (``retain_graph=True``, gradcheck).
For sparse f (alpha > 1) p - y has a handful of non-zeros per token: both products use only those
columns of W (exact, like Cut Cross-Entropy's gradient filtering but with no threshold), so the
backward costs O(tokens x support x H) instead of O(tokens x V x H).

On the sync-free backends (CUDA) rows whose solution is not certified contribute nothing in the first
sweep; after the last token chunk one host synchronisation lists them and they are recomputed exactly.
On the ``triton`` backend, class ids with a scalar q are solved by the Triton loss kernel, which writes
p - e_c over the chunk's logits in place; the products with W are then dense (as in Liger-Kernel's fused
linear cross-entropy), with no per-support gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .divergences import DivergenceSpec, FDivergence, get_divergence
from .losses import IGNORE_INDEX, RowStats, check_target_ids, onehot_loss, soft_target_loss
from .solver import RowProvider, prepare_reference, rows_per_chunk, solve_rows, solver_backend
from .solver.grad_buffer import first_order_only, scale_all, take_buffer

__all__ = ["fused_linear_fdiv_loss", "LogitTransform", "FUSED_CHUNK_ELEMENTS", "FUSED_DEVICE_CHUNK_ELEMENTS"]

#: token rows per chunk = FUSED_CHUNK_ELEMENTS // V on CPU (two fp32 [rows, V] buffers live at a time)
FUSED_CHUNK_ELEMENTS = 1 << 24
#: the same on accelerators: fewer, larger matmuls (256 MiB per fp32 buffer)
FUSED_DEVICE_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * (h W^T + b) / softcap) (softcap None: no capping)."""

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def from_config(cls, config) -> "LogitTransform":
        scale = 1.0
        logit_scale = getattr(config, "logit_scale", None)  # Cohere
        if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
            scale *= float(logit_scale)
        logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides
        if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling:
            scale /= float(logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        return cls(scale, float(softcap) if softcap else None)

    def apply(self, z: Tensor) -> Tensor:
        """In place on ``z`` (and returned)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def transformed(self, z: Tensor) -> Tensor:
        """Out of place (differentiable): the same map as :meth:`apply`."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, z_out: Tensor) -> Optional[Tensor]:
        """d logits / d (h W^T + b) from the transformed logits, or None when it is 1."""
        if self.softcap:
            t = z_out / self.softcap
            return (1 - t * t) * self.scale
        if self.scale != 1.0:
            return torch.full_like(z_out[:, :1], self.scale)
        return None


@dataclass
class _FusedProblem:
    """What the fused function fits: targets (ids [N] or a RowProvider), the rows to fit, q, f."""

    target: Union[Tensor, RowProvider]
    rows: Tensor
    reference: object
    div: FDivergence
    transform: LogitTransform
    max_iter: Optional[int]
    chunk_rows: int
    skip_nonfinite: bool
    backend: str
    stats: Optional[RowStats]


class _Head:
    """The LM head as the chunk loop uses it: logits in the work dtype (fp32, fp64 for fp64 heads), W
    rows and W products for the gradient pushes.

    bf16/fp16 heads use low-precision GEMMs with fp32 output (``out_dtype``, cuBLAS on CUDA) where the
    device has them: no fp32 copy of W and no bf16 rounding of the logits before the solve. Elsewhere
    (CPU) W is cast once."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], work_dtype: torch.dtype):
        self.work_dtype = work_dtype
        self.low_precision = weight.dtype in (torch.bfloat16, torch.float16) and _has_fp32_out_gemm(weight)
        self.weight = weight if self.low_precision else weight.to(work_dtype)
        self.bias = None if bias is None else bias.to(work_dtype)

    def logits(self, h: Tensor, out: Tensor) -> Tensor:
        """h W^T + b for h [n, H] (any dtype), into ``out`` [n, V] or a new fp32 tensor."""
        if self.low_precision:
            try:
                z = torch.mm(h.to(self.weight.dtype), self.weight.T, out_dtype=torch.float32)
            except (TypeError, RuntimeError):  # a torch without low-precision GEMMs to fp32: cast W once
                self.low_precision, self.weight = False, self.weight.to(self.work_dtype)
                return self.logits(h, out)
            return z if self.bias is None else z.add_(self.bias)
        h = h.to(self.work_dtype)
        if self.bias is None:
            return torch.matmul(h, self.weight.T, out=out)
        return torch.addmm(self.bias, h, self.weight.T, out=out)

    def rows(self, index: Tensor) -> Tensor:
        """W[index] in the work dtype."""
        return self.weight.index_select(0, index).to(self.work_dtype)

    def left_multiply(self, dz: Tensor) -> Tensor:
        """dz @ W for dz [n, V] in the work dtype."""
        if self.low_precision:
            return dz.to(self.weight.dtype) @ self.weight
        return dz @ self.weight


def _has_fp32_out_gemm(weight: Tensor) -> bool:
    """``torch.mm(..., out_dtype=torch.float32)`` runs for this weight's dtype and device (a 1 x 1 product)."""
    try:
        torch.mm(weight[:1], weight[:1].T, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # CPU builds have no low-precision GEMM to fp32 (NotImplementedError)
        return False
    return True


class _HeadGradients:
    """fp32 accumulators of the loss sum and of its gradients w.r.t. hidden, weight and bias."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need, work_dtype):
        V, H = weight.shape
        dev = hidden.device
        self.total = torch.zeros((), dtype=torch.float64, device=dev)
        self.h = torch.zeros_like(hidden) if need[0] else None
        self.w = torch.zeros((V, H), dtype=work_dtype, device=dev) if need[1] else None
        self.b = torch.zeros(V, dtype=work_dtype, device=dev) if (bias is not None and need[2]) else None

    @property
    def wanted(self) -> bool:
        return self.h is not None or self.w is not None or self.b is not None

    def push_dense(self, dz: Tensor, h: Tensor, head: _Head, rows: Tensor) -> None:
        if self.h is not None:
            self.h.index_copy_(0, rows, head.left_multiply(dz).to(self.h.dtype))
        if self.w is not None:
            self.w.addmm_(dz.T, h)
        if self.b is not None:
            self.b.add_(dz.sum(0))

    def push_sparse(self, val: Tensor, idx: Tensor, h: Tensor, head: _Head, rows: Tensor) -> None:
        """grad_h[rows] = sum_k val_k W[idx_k], grad_W[idx_k] += val_k h, grad_b[idx_k] += val_k."""
        n, k = idx.shape
        flat = idx.reshape(-1)
        if self.h is not None:
            wk = head.rows(flat).view(n, k, -1)
            self.h.index_copy_(0, rows, torch.bmm(val[:, None, :], wk).squeeze(1).to(self.h.dtype))
        if self.w is not None:
            self.w.index_add_(0, flat, (val[:, :, None] * h[:, None, :]).reshape(n * k, -1))
        if self.b is not None:
            self.b.index_add_(0, flat, val.reshape(-1))


def _fit_chunk(hidden, head: _Head, problem: _FusedProblem, rows: Tensor, acc: _HeadGradients, backend: str, bufs):
    """Loss and gradient pushes of the token rows ``rows``; returns (rows, uncertain) pairs of the
    solutions whose rows were left out because they are not certified (sync-free backend)."""
    n = rows.numel()
    work_dtype = head.work_dtype
    div, onehot = problem.div, not isinstance(problem.target, RowProvider)
    h_chunk = hidden.index_select(0, rows)
    z = problem.transform.apply(head.logits(h_chunk, None if bufs["z"] is None else bufs["z"][:n]))
    h = h_chunk.to(work_dtype)
    q = problem.reference(rows) if isinstance(problem.reference, RowProvider) else problem.reference
    t_chunk = problem.target[rows] if onehot else None
    y_chunk = None if onehot else problem.target(rows).to(work_dtype)
    deriv_chunk = problem.transform.derivative(z)
    # Dense p - y rows are gathered in dz_all and pushed through the head with one matmul per token
    # chunk; dense f write p straight into it.
    dz_all = bufs["dz"][:n]
    dense_subs, left_out = [], []
    out = None if div.sparse else dz_all
    options = {"workspace": bufs["work"]} if backend == "chunked" else {"resolve": False}
    for sol in solve_rows(
        z, q, div, out=out, max_iter=problem.max_iter, skip_nonfinite=problem.skip_nonfinite, backend=backend,
        **options,
    ):
        sub = sol.rows  # slice of this token chunk
        g_rows = rows[sub]
        drop = sol.skipped
        if sol.uncertain is not None:
            left_out.append((g_rows, sol.uncertain))
            drop = sol.uncertain if drop is None else drop | sol.uncertain
        if onehot:
            t = t_chunk[sub]
            per_row = onehot_loss(sol, t, div)
        else:
            y = y_chunk[sub]
            per_row = soft_target_loss(sol.dense_p(), y, sol, div)
        if drop is not None:
            per_row = per_row.masked_fill(drop, 0.0)
        acc.total += per_row.sum()
        if problem.stats is not None:
            problem.stats.write(g_rows, sol)
        if not acc.wanted:
            continue
        deriv = None if deriv_chunk is None else deriv_chunk[sub]
        if onehot and sol.index is not None:
            # sparse p - e_t: support columns plus the target column (duplicates add up)
            idx = torch.cat([sol.index, t[:, None]], 1)
            val = torch.cat([sol.p, torch.full_like(sol.p[:, :1], -1.0)], 1).to(work_dtype)
            if deriv is not None:
                val = val * (deriv if deriv.shape[1] == 1 else deriv.gather(1, idx))
            if drop is not None:
                val = val.masked_fill(drop[:, None], 0.0)
            acc.push_sparse(val, idx, h[sub], head, g_rows)
            continue
        dz = dz_all[sub]
        if out is None:
            dz.copy_(sol.dense_p())
        if onehot:
            dz.scatter_add_(1, t[:, None], torch.full_like(dz[:, :1], -1.0))
        else:
            dz.sub_(y)
        if deriv is not None:
            dz.mul_(deriv)
        if drop is not None:
            dz.masked_fill_(drop[:, None], 0.0)
        dense_subs.append(sub)
    if dense_subs:
        if sum(s.stop - s.start for s in dense_subs) == n:
            acc.push_dense(dz_all, h, head, rows)
        else:
            pick = torch.cat([torch.arange(s.start, s.stop, device=h.device) for s in dense_subs])
            acc.push_dense(dz_all[pick], h[pick], head, rows[pick])
    return left_out


def _fit_chunk_kernel(hidden, head: _Head, problem: _FusedProblem, rows: Tensor, acc: _HeadGradients, bufs):
    """:func:`_fit_chunk` on the Triton loss kernel (backend ``triton``: class ids, a scalar q): the kernel
    writes p - e_c over the fp32 logits in place, which go through the head in dense products, as
    Liger-Kernel's fused linear cross-entropy does. Rows the kernel does not certify are left out (returned
    for the exact re-solve)."""
    from .solver import triton_kernels

    n = rows.numel()
    h_chunk = hidden.index_select(0, rows)
    z = problem.transform.apply(head.logits(h_chunk, None if bufs["z"] is None else bufs["z"][:n]))
    deriv = problem.transform.derivative(z)  # before z is overwritten by p - e_c
    losses, _, kstats, converged = triton_kernels.fy_loss_rows(
        z, problem.target[rows], problem.div, problem.reference, grad=z if acc.wanted else None,
        n_iter=problem.max_iter, with_stats=problem.stats is not None,
    )
    uncertain = ~converged | ~torch.isfinite(losses)
    acc.total += losses.masked_fill(uncertain, 0.0).sum()
    if problem.stats is not None:  # the re-solve overwrites the uncertain rows
        support, entropy, pred = kstats
        st = problem.stats
        st.support[rows], st.entropy[rows], st.pred[rows] = support.to(st.support.dtype), entropy, pred.long()
        st.solved[rows], st.skipped[rows] = True, False
    if acc.wanted:
        if deriv is not None:
            z.mul_(deriv)
        acc.push_dense(z.masked_fill_(uncertain[:, None], 0.0), h_chunk.to(head.work_dtype), head, rows)
    return [(rows, uncertain)]


def _kernel_covers(problem: _FusedProblem, weight: Tensor) -> bool:
    """The Triton loss kernel can solve the chunks: class ids, a scalar q, a divergence it supports."""
    if isinstance(problem.target, RowProvider) or isinstance(problem.reference, (Tensor, RowProvider)):
        return False
    if weight.dtype == torch.float64:
        return False
    from .solver import triton_kernels

    return triton_kernels.supports(problem.div, problem.reference)


class FusedLinearFDivFunction(torch.autograd.Function):
    """Scalar sum of l_f over ``problem.rows`` for logits = transform(hidden @ weight^T + bias)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], problem: _FusedProblem):
        # logits, solve and gradients in fp32 (fp64 for fp64 heads), whatever the model's dtype
        work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        head = _Head(weight, bias, work_dtype)
        acc = _HeadGradients(hidden, weight, bias, ctx.needs_input_grad, work_dtype)
        c = problem.chunk_rows
        shape = (min(c, problem.rows.numel()), weight.shape[0])
        new = lambda: torch.empty(shape, dtype=work_dtype, device=hidden.device)  # noqa: E731
        # low-precision GEMMs allocate z; the kernel writes p - e_c over z (dz only for a re-solve)
        bufs = {"z": None if head.low_precision else new(), "dz": None if problem.backend == "triton" else new()}
        if problem.backend == "chunked":
            bufs["work"] = new()
        left_out = []
        for a in range(0, problem.rows.numel(), c):
            chunk = problem.rows[a : a + c]
            if problem.backend == "triton":
                left_out += _fit_chunk_kernel(hidden, head, problem, chunk, acc, bufs)
            else:
                left_out += _fit_chunk(hidden, head, problem, chunk, acc, problem.backend, bufs)
        if left_out:
            rows = torch.cat([r for r, _ in left_out])
            redo = rows[torch.cat([m for _, m in left_out])]  # the one host synchronisation of the sweep
            if redo.numel() and bufs["dz"] is None:
                bufs["dz"] = new()
            for a in range(0, redo.numel(), c):
                _fit_chunk(hidden, head, problem, redo[a : a + c], acc, "chunked", bufs | {"work": None})
        ctx.grads = (
            acc.h,
            None if acc.w is None else acc.w.to(weight.dtype),
            None if acc.b is None else acc.b.to(bias.dtype),
        )
        return acc.total.to(work_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # In place when this backward frees the graph, scaled copies when it is retained
        # (hf_fdiv.solver.grad_buffer): any number of backward calls, no extra memory in the common case.
        first_order_only("fused_linear_fdiv_loss")
        grads, keep = take_buffer(ctx, "grads", "fused_linear_fdiv_loss")
        out = [scale_all(g, grad_out, not keep) for g in grads]
        return out[0], out[1], out[2], None


def fused_linear_fdiv_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Union[Tensor, RowProvider],
    divergence: DivergenceSpec = "alpha:1.5",
    reference: Union[str, float, Tensor, RowProvider] = "unit",
    bias: Optional[Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitTransform = LogitTransform(),
    max_iter: Optional[int] = None,
    rows: Optional[Tensor] = None,
    chunk_elements: Optional[int] = None,
    skip_nonfinite: bool = False,
    return_stats: bool = False,
):
    """Sum over target tokens of l_f(transform(hidden @ weight^T + bias), target; q), with gradients
    w.r.t. ``hidden``, ``weight`` and ``bias``, without materialising the logits.

    Args:
        hidden: [N, H] (or [..., H]) final hidden states, aligned with the targets (shift beforehand).
        weight, bias: the LM head, [V, H] and [V].
        target: class ids [N] (``ignore_index`` skipped) or a :class:`~hf_fdiv.solver.RowProvider` of
            target distributions (then ``rows`` lists the rows to use).
        reference: ``"unit"``, ``"uniform"``, a number, a [V] prior or a RowProvider of per-token q.
        transform: the architecture's logit scale / soft-cap (:meth:`LogitTransform.from_config`).
        chunk_elements: token rows per chunk = chunk_elements // V (default: cache-sized on CPU,
            a memory budget on accelerators).
        return_stats: also return :class:`~hf_fdiv.losses.RowStats` over the N hidden rows.
    Returns:
        A 0-d fp32 tensor: the sum (divide by the token count yourself, e.g. ``num_items_in_batch``);
        with ``return_stats``, a tuple (sum, RowStats).
    """
    div = get_divergence(divergence)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    N, V = h2.shape[0], weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"LM head weight is {tuple(weight.shape)} but hidden states have H={H}: it must be [V, H].")
    if isinstance(target, RowProvider):
        if rows is None:
            raise ValueError("a RowProvider target needs `rows` (the token rows to train on).")
    else:
        target = target.reshape(-1).to(h2.device)
        if target.numel() != N:
            raise ValueError(f"{target.numel()} targets for {N} hidden rows: shift/flatten them consistently.")
        check_target_ids(target, V, ignore_index)
        if rows is None:
            rows = (target != ignore_index).nonzero().squeeze(1)
    if not isinstance(reference, RowProvider):
        probe = torch.empty((1, V), device=h2.device, dtype=torch.float32)
        reference = prepare_reference(reference, probe, -1)
        if isinstance(reference, Tensor):
            reference = reference.reshape(V)
    stats = RowStats.empty(N, h2.device) if return_stats else None
    if rows.numel() == 0:
        total = (h2.sum() * 0.0 + weight.sum() * 0.0).float()
        return (total, stats) if return_stats else total
    backend = solver_backend(h2)
    if chunk_elements is None:
        chunk_elements = FUSED_CHUNK_ELEMENTS if backend == "chunked" else FUSED_DEVICE_CHUNK_ELEMENTS
    problem = _FusedProblem(
        target=target, rows=rows, reference=reference, div=div, transform=transform, max_iter=max_iter,
        chunk_rows=rows_per_chunk(chunk_elements, V), skip_nonfinite=skip_nonfinite, backend=backend, stats=stats,
    )
    if backend == "triton" and not _kernel_covers(problem, weight):  # other cases: the sync-free PyTorch solve
        problem.backend = "batched"
    total = FusedLinearFDivFunction.apply(h2, weight, bias, problem)
    return (total, stats) if return_stats else total
