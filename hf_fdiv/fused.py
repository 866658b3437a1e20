"""Fused LM-head + f-divergence loss: never materialise the [tokens x vocab] logits.

For hidden states h [N, H] and an LM head W [V, H] (+ bias b), the loss is
sum_{valid tokens} l_f(s(h W^T + b), y; q) with s the architecture's logit transform (scale, soft-cap).
Tokens are processed in chunks: per chunk the fp32 logits are formed, f-softargmax is solved, and
d loss / d logits = p - y is pushed through the head at once,

    grad_h = (p - y) W,        grad_W += (p - y)^T h,        grad_b += sum (p - y),

all during the forward pass; the backward only rescales them (the output is a scalar sum).
For sparse f (alpha > 1) p - y has a handful of non-zeros per token: both products use only those
columns of W (exact, like Cut Cross-Entropy's gradient filtering but with no threshold), so the
backward costs O(tokens x support x H) instead of O(tokens x V x H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .divergences import DivergenceSpec, FDivergence, get_divergence
from .losses import _accumulate_stats, _add_stat, _onehot_value, _soft_value
from .solver import RowProvider, prepare_reference, solve_row_chunks

__all__ = ["fused_linear_fdiv_loss", "LogitTransform", "FUSED_CHUNK_ELEMENTS"]

#: token rows per chunk = FUSED_CHUNK_ELEMENTS // V (two fp32 [rows, V] buffers live at a time)
FUSED_CHUNK_ELEMENTS = 1 << 24


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
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
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
class _Spec:
    target: Union[Tensor, RowProvider]
    rows: Tensor
    reference: object
    div: FDivergence
    transform: LogitTransform
    max_iter: Optional[int]
    stats: Optional[dict]
    stat_ids: Optional[Tensor]
    chunk_rows: int
    skip_nonfinite: bool = False


class FusedLinearFDivFunction(torch.autograd.Function):
    """Scalar sum of l_f over ``spec.rows`` for logits = transform(hidden @ weight^T + bias)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], spec: _Spec):
        N, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        need = ctx.needs_input_grad
        # logits, solve and gradients in fp32 (fp64 for fp64 heads), whatever the model's dtype
        cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w32 = weight.to(cdt)
        b32 = None if bias is None else bias.to(cdt)
        grad_h = torch.zeros_like(hidden) if need[0] else None
        grad_w = torch.zeros((V, H), dtype=cdt, device=dev) if need[1] else None
        grad_b = torch.zeros(V, dtype=cdt, device=dev) if (bias is not None and need[2]) else None
        total = torch.zeros((), dtype=torch.float64, device=dev)
        onehot = not isinstance(spec.target, RowProvider)
        c = spec.chunk_rows
        zbuf = torch.empty((min(c, spec.rows.numel()), V), dtype=cdt, device=dev)
        dzbuf = torch.empty_like(zbuf)
        workspace = torch.empty_like(zbuf)
        for a in range(0, spec.rows.numel(), c):
            rows = spec.rows[a : a + c]
            n = rows.numel()
            h = hidden.index_select(0, rows).to(cdt)
            z = zbuf[:n]
            if b32 is None:
                torch.matmul(h, w32.T, out=z)
            else:
                torch.addmm(b32, h, w32.T, out=z)
            spec.transform.apply(z)
            q = spec.reference(rows) if isinstance(spec.reference, RowProvider) else spec.reference
            t_chunk = spec.target[rows] if onehot else None
            y_chunk = None if onehot else spec.target(rows).to(cdt)
            deriv_chunk = spec.transform.derivative(z)
            # The solver sub-chunks the token rows (its own chunk size keeps flat rows from forcing a whole
            # token chunk onto the dense path). Dense p - y rows are gathered in dzbuf and pushed through
            # the head with one matmul per token chunk; dense f write p straight into dzbuf.
            dz_all = dzbuf[:n]
            dense_subs = []
            out = None if spec.div.sparse else dz_all
            for sol in solve_row_chunks(
                z, q, spec.div, out=out, max_iter=spec.max_iter, workspace=workspace, skip_nonfinite=spec.skip_nonfinite
            ):
                sub = sol.rows  # slice of this token chunk
                g_rows = rows[sub]
                keep = None if sol.skipped is None else (~sol.skipped).to(cdt)[:, None]
                if onehot:
                    t = t_chunk[sub]
                    per_row = _onehot_value(sol, t, spec.div)
                else:
                    y = y_chunk[sub]
                    per_row = _soft_value(sol.dense_p(), y, sol, spec.div)
                if keep is not None:  # skip mode: rows with non-finite logits contribute nothing
                    per_row = per_row.masked_fill(sol.skipped, 0.0)
                    if spec.stats is not None:
                        _add_stat(spec.stats, "nonfinite", sol.skipped.sum())
                total += per_row.sum()
                if spec.stats is not None:
                    ids = spec.target if onehot else spec.stat_ids
                    _accumulate_stats(spec.stats, sol, ids[g_rows] if ids is not None else None)
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                deriv = None if deriv_chunk is None else deriv_chunk[sub]
                if onehot and sol.index is not None:
                    # sparse p - e_t: support columns plus the target column (duplicates add up)
                    idx = torch.cat([sol.index, t[:, None]], 1)
                    val = torch.cat([sol.p, torch.full_like(sol.p[:, :1], -1.0)], 1).to(cdt)
                    if deriv is not None:
                        val = val * (deriv if deriv.shape[1] == 1 else deriv.gather(1, idx))
                    if keep is not None:
                        val = val * keep
                    _push_sparse(val, idx, h[sub], w32, g_rows, grad_h, grad_w, grad_b)
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
                if keep is not None:
                    dz.mul_(keep)
                dense_subs.append(sub)
            if dense_subs:
                if sum(s.stop - s.start for s in dense_subs) == n:
                    dz, hs, g_rows = dz_all, h, rows
                else:
                    pick = torch.cat([torch.arange(s.start, s.stop, device=dev) for s in dense_subs])
                    dz, hs, g_rows = dz_all[pick], h[pick], rows[pick]
                if grad_h is not None:
                    grad_h.index_copy_(0, g_rows, (dz @ w32).to(grad_h.dtype))
                if grad_w is not None:
                    grad_w.addmm_(dz.T, hs)
                if grad_b is not None:
                    grad_b.add_(dz.sum(0))
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total.to(cdt)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("fused_linear_fdiv_loss backward ran twice: recompute the loss instead of retain_graph.")
        ctx.grads = None
        g = grad_out
        out = []
        for x in grads:
            if x is None:
                out.append(None)
            else:
                out.append(x.mul_(g.to(x.dtype)))
        return out[0], out[1], out[2], None


def _push_sparse(val, idx, h, w32, rows, grad_h, grad_w, grad_b) -> None:
    """grad_h[rows] = sum_k val_k W[idx_k], grad_W[idx_k] += val_k h, grad_b[idx_k] += val_k."""
    n, k = idx.shape
    H = h.shape[1]
    flat = idx.reshape(-1)
    if grad_h is not None:
        wk = w32.index_select(0, flat).view(n, k, H)
        grad_h.index_copy_(0, rows, torch.bmm(val[:, None, :], wk).squeeze(1).to(grad_h.dtype))
    if grad_w is not None:
        grad_w.index_add_(0, flat, (val[:, :, None] * h[:, None, :]).reshape(n * k, H))
    if grad_b is not None:
        grad_b.index_add_(0, flat, val.reshape(-1))


def fused_linear_fdiv_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Union[Tensor, RowProvider],
    divergence: DivergenceSpec = "alpha:1.5",
    reference: Union[str, float, Tensor, RowProvider] = "unit",
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    transform: LogitTransform = LogitTransform(),
    max_iter: Optional[int] = None,
    stats: Optional[dict] = None,
    rows: Optional[Tensor] = None,
    stat_ids: Optional[Tensor] = None,
    chunk_elements: int = FUSED_CHUNK_ELEMENTS,
    skip_nonfinite: bool = False,
) -> Tensor:
    """Sum over target tokens of l_f(transform(hidden @ weight^T + bias), target; q), with gradients
    w.r.t. ``hidden``, ``weight`` and ``bias``, without materialising the logits.

    Args:
        hidden: [N, H] (or [..., H]) final hidden states, aligned with the targets (shift beforehand).
        weight, bias: the LM head, [V, H] and [V].
        target: class ids [N] (``ignore_index`` skipped) or a :class:`~hf_fdiv.solver.RowProvider` of
            target distributions (then ``rows`` lists the rows to use).
        reference: ``"unit"``, ``"uniform"``, a number, a [V] prior or a RowProvider of per-token q.
        transform: the architecture's logit scale / soft-cap (:meth:`LogitTransform.from_config`).
    Returns:
        A 0-d fp32 tensor: the sum (divide by the token count yourself, e.g. ``num_items_in_batch``).
    """
    div = get_divergence(divergence)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    N, V = h2.shape[0], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"LM head weight is {tuple(weight.shape)} but hidden states have H={H}.")
    if isinstance(target, RowProvider):
        if rows is None:
            raise ValueError("a RowProvider target needs `rows` (the token rows to train on).")
    else:
        target = target.reshape(-1).to(h2.device)
        if target.numel() != N:
            raise ValueError(f"{target.numel()} targets for {N} hidden rows: shift/flatten them consistently.")
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= V))
        if bool(bad.any()):
            raise ValueError(
                f"target id {int(target[bad][0])} is out of range for V={V} and is not ignore_index={ignore_index}."
            )
        if rows is None:
            rows = valid.nonzero().squeeze(1)
    if not isinstance(reference, RowProvider):
        probe = torch.empty((1, V), device=h2.device, dtype=torch.float32)
        reference = prepare_reference(reference, probe, -1)
        if isinstance(reference, Tensor):
            reference = reference.reshape(V)
    if rows.numel() == 0:
        return (h2.sum() * 0.0 + weight.sum() * 0.0).float()
    spec = _Spec(
        target=target, rows=rows, reference=reference, div=div, transform=transform, max_iter=max_iter,
        stats=stats, stat_ids=stat_ids, chunk_rows=max(1, chunk_elements // max(V, 1)),
        skip_nonfinite=skip_nonfinite,
    )
    return FusedLinearFDivFunction.apply(h2, weight, bias, spec)
