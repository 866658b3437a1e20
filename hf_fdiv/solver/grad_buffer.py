"""Gradients computed in the forward pass and scaled in the backward (the losses' memory design).

The Fenchel-Young losses know their gradient at the end of the forward pass: d l_i / d theta_i = p_i - y_i
(``docs/math.md``), so :mod:`hf_fdiv.losses` and :mod:`hf_fdiv.fused` write it into one buffer and the
backward only multiplies it by the incoming gradient (a per-row [N] vector, or a scalar for the fused
head's sum). How that product is formed decides the memory:

* **the graph is freed after this backward** (the common case: ``loss.backward()``): the buffer is
  scaled *in place*, released from the autograd context and returned; no [N, V] tensor is allocated in
  the backward at all, and the caller (e.g. ``AccumulateGrad`` of leaf logits) may keep the buffer itself;
* **the graph is kept** (``retain_graph=True``, ``create_graph=True``, ``torch.autograd.gradcheck``):
  a scaled *copy* is returned and the buffer stays unscaled, so any number of later backward calls are
  exact: each returns buffer * g for its own g (two backward calls with g = 1 give 2x the gradient).

Whether the running backward keeps the graph is asked from the autograd engine
(``torch._C._autograd._get_current_graph_task_keep_graph``, the query PyTorch's own AOT autograd uses to
donate saved buffers). A backward can run once more after a backward that freed the graph (custom
Functions hold no saved tensors here, so PyTorch does not stop it): the released buffer then raises
:func:`freed_error` instead of returning a wrong gradient.

Alternatives rejected: keeping the buffer unscaled and always returning a copy costs one extra [N, V]
per backward in the common case; scaling in place and undoing the scale later (divide by the remembered
g) is inexact and fails for g = 0 (``reduction="none"`` with one-hot grad outputs, gradcheck), and it
would modify a gradient tensor that the first backward already handed out.

Double backward is not supported: the buffer is a constant of the forward pass, not a function of the
logits, so its second derivative would silently be 0. :func:`first_order_only` refuses a backward run
with ``create_graph=True`` with a message.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cpu_allocator import empty_like_output

__all__ = [
    "graph_retained", "take_buffer", "scale_rows", "scale_all", "first_order_only", "freed_error", "CAN_DETECT_RETAIN",
]

_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
#: False on a torch without the engine query: buffers are then scaled in place and a second backward
#: raises (as in hf_fdiv <= 0.x); memory is the same.
CAN_DETECT_RETAIN = _KEEP_GRAPH is not None


def graph_retained() -> bool:
    """True inside a backward that keeps the graph (retain_graph / create_graph / gradcheck)."""
    if _KEEP_GRAPH is None:
        return False
    try:
        return bool(_KEEP_GRAPH())
    except RuntimeError:  # not inside an engine-run backward (e.g. a compiled autograd trace): be safe
        return True


def freed_error(name: str) -> RuntimeError:
    hint = (
        "pass retain_graph=True to every backward but the last"
        if CAN_DETECT_RETAIN
        else "this torch cannot report retain_graph to the loss (upgrade torch to use retain_graph=True), so "
        "recompute the loss instead"
    )
    return RuntimeError(
        f"{name}: backward ran again through a graph that an earlier backward freed (its gradient buffer "
        f"was scaled in place and released): {hint}."
    )


def take_buffer(ctx, attr: str, name: str):
    """(``ctx.<attr>``, keep): the gradient buffer(s) the forward stored and whether this backward keeps
    the graph. Released from ``ctx`` when it does not (the caller may then scale in place and hand the
    buffer out); raises :func:`freed_error` when an earlier backward already released it."""
    buffer = getattr(ctx, attr)
    if buffer is None:
        raise freed_error(name)
    keep = graph_retained()
    if not keep:
        setattr(ctx, attr, None)
    return buffer, keep


def scale_rows(buffer: Tensor, grad_rows: Tensor, in_place: bool) -> Tensor:
    """buffer [N, V] * grad_rows [N, 1]: in place, or into a new tensor. A low-precision buffer is
    multiplied by an fp32 g in one kernel that computes in fp32 and rounds once on the store (no fp32
    copy: one read and one write of the buffer, as cross-entropy's backward; issue 23)."""
    out = buffer if in_place else empty_like_output(buffer)
    g = grad_rows.reshape(-1, 1)
    return torch.mul(buffer, g.to(torch.promote_types(buffer.dtype, torch.float32)), out=out)


def scale_all(buffer: Optional[Tensor], grad: Tensor, in_place: bool) -> Optional[Tensor]:
    """buffer * scalar ``grad`` (None stays None)."""
    if buffer is None:
        return None
    g = grad.to(buffer.dtype)
    return buffer.mul_(g) if in_place else buffer * g


def first_order_only(name: str) -> None:
    """Raise when the running backward builds a graph of its own (``create_graph=True``: double
    backward, ``gradgradcheck``, a gradient penalty through the loss). Called at the start of backward.

    (Marking the results as not differentiable, as ``once_differentiable`` does, is not enough: a
    later ``torch.autograd.grad(grad, logits)`` prunes that marker and silently returns 0.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} supports first derivatives only: its gradient p - y is computed in the forward pass and "
            "is not differentiable again, so backward with create_graph=True (double backward, "
            "gradgradcheck, a gradient penalty through the loss) is refused rather than silently giving 0. "
            "For second-order terms differentiate the operator: the loss's Hessian in the logits is "
            "the Jacobian of f_softargmax."
        )
