"""Reference measures q of D_f(p, q): parsing, validation, and per-row slices.

A reference is held by the solver in one of four forms: a Python float (``"unit"`` = 1,
``"uniform"`` = 1/V, a positive number), a [V] class prior, [N, V] rows matching the flattened
logits, or a :class:`RowProvider` that computes rows on demand (e.g. a teacher's probabilities).
A zero q_j excludes class j (``docs/math.md``, "f-divergence").
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "ReferenceSpec",
    "RowProvider",
    "prepare_reference",
    "flatten_reference",
    "reference_rows",
    "reference_at_columns",
    "reference_at_targets",
    "reference_total",
    "bad_reference_rows",
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


def bad_reference_rows(q: Tensor) -> Tensor:
    """[n] bool: rows of a computed reference [n, V] with a NaN/inf or negative entry, or all zero
    (no host synchronisation)."""
    return (~torch.isfinite(q)).any(-1) | (q < 0).any(-1) | (q.sum(-1) <= 0)


def prepare_reference(reference: ReferenceSpec, logits: Tensor, dim: int = -1) -> Union[float, Tensor]:
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
    # one host synchronisation for all three checks; the messages say which one failed
    nonfinite, negative, empty = torch.stack(
        [(~torch.isfinite(q_last)).any(), (q_last < 0).any(), (q_last.sum(-1) <= 0).any()]
    ).tolist()
    if nonfinite:
        raise ValueError("reference contains NaN or inf entries: pass finite, non-negative values.")
    if negative:
        raise ValueError("reference has negative entries: a reference measure must be >= 0 (zero excludes a class).")
    if empty:
        raise ValueError(
            "reference has a row that is all zero: every row needs at least one class with q > 0 "
            "(a zero excludes that class)."
        )
    return q_last.to(device=logits.device)


def flatten_reference(q, shape: tuple[int, ...]):
    """Reference as a float, a [V] prior, or [N, V] rows matching logits flattened to [N, V]
    (``shape`` is the logits' shape with the class axis last)."""
    if isinstance(q, Tensor) and q.dim() > 1:
        if q.shape[:-1].numel() == 1:
            return q.reshape(shape[-1])
        return q.expand(shape).reshape(-1, shape[-1])
    return q


def reference_rows(q, rows, V: int, dtype: torch.dtype):
    """The reference for a chunk of rows (a slice or LongTensor): float, [1, V] or [n, V]."""
    if isinstance(q, RowProvider):
        return q(rows).to(dtype)
    if not isinstance(q, Tensor):
        return q
    if q.dim() == 1:
        return q.to(dtype).view(1, V)
    if isinstance(rows, slice):
        return q[rows].to(dtype)
    return q.index_select(0, rows).to(dtype)


def reference_at_columns(q, index: Tensor):
    """q at the columns ``index`` [n, K] of each row (q: float, [1, V] or [n, V])."""
    if not isinstance(q, Tensor):
        return q
    if q.shape[0] == 1:
        return q.expand(index.shape[0], -1).gather(1, index)
    return q.gather(1, index)


def reference_at_targets(q, c: Tensor, like: Tensor) -> Tensor:
    """q_c per row for one class id per row ``c`` [n], shaped and typed like ``like`` [n]."""
    if not isinstance(q, Tensor):
        return torch.full_like(like, q)
    if q.shape[0] == 1:
        return q[0].gather(0, c)
    return q.gather(1, c[:, None]).squeeze(1)


def reference_total(q, n: int, V: int, like: Tensor) -> Tensor:
    """sum_j q_j per row [n]."""
    if isinstance(q, Tensor):
        return q.sum(1).expand(n) if q.shape[0] == 1 else q.sum(1)
    return torch.full((n,), q * V, dtype=like.dtype, device=like.device)
