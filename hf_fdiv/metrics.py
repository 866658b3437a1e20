"""Sparse-safe evaluation metrics for models trained with f-divergence losses.

A model trained with a sparse loss (alpha > 1, chi2) gives many tokens p = 0 exactly, so the usual
perplexity exp(-mean log p_target) can be infinite. Defined here, per target token (labels shifted
like a causal LM, -100 ignored), with p = f-softargmax(logits; q):

* ``token_accuracy``: argmax p = target (argmax p = argmax logits for every f);
* ``support_size``: number of classes with p > 0;
* ``eps_perplexity``: exp(-mean log p_eps(target)) with p_eps = (p + eps) / (1 + eps V), the
  epsilon-smoothed perplexity of the entmax literature (Peters et al., 2019; eps = 1e-6 by default).
  It equals the usual perplexity up to O(eps V) when p > 0 everywhere, and stays finite otherwise;
* ``zero_prob_rate``: fraction of targets with p_target = 0 (the tokens a plain perplexity drops to inf);
* ``jsd_to_target``: Jensen-Shannon divergence (natural log, in [0, log 2]) between p and the one-hot
  target, and ``jsd_to_teacher`` between p and a teacher distribution when one is given.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .divergences import DivergenceSpec, get_divergence
from .solver import ReferenceSpec, f_softargmax

__all__ = ["jensen_shannon", "sparse_safe_metrics", "make_compute_metrics"]


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """JSD(p, q) = KL(p||m)/2 + KL(q||m)/2 with m = (p + q)/2, per row (natural log, 0 log 0 = 0)."""
    p, q = p.double(), q.double()
    m = (p + q) / 2
    kl_pm = torch.xlogy(p, p).sum(-1) - torch.where(p > 0, p * torch.log(m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.xlogy(q, q).sum(-1) - torch.where(q > 0, q * torch.log(m), torch.zeros_like(q)).sum(-1)
    return (kl_pm + kl_qm) / 2


def sparse_safe_metrics(
    logits: Tensor,
    labels: Tensor,
    divergence: DivergenceSpec = "alpha:1.5",
    reference: ReferenceSpec = "unit",
    epsilon: float = 1e-6,
    teacher_probs: Optional[Tensor] = None,
    shift: bool = True,
) -> dict:
    """Metrics of the module docstring for logits [B, T, V] (or [N, V]) and labels [B, T] (or [N]).

    ``shift``: labels are aligned with the inputs (causal LM) and shifted here; ``teacher_probs``
    (same shape as the logits) adds ``jsd_to_teacher``."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if shift and logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
        if teacher_probs is not None:
            teacher_probs = torch.as_tensor(teacher_probs)[:, :-1]
    V = logits.shape[-1]
    valid = labels != -100
    x = logits[valid].float()
    t = labels[valid].long()
    if x.shape[0] == 0:
        return {"token_accuracy": 0.0, "support_size": 0.0, "eps_perplexity": float("nan"), "zero_prob_rate": 0.0,
                "jsd_to_target": 0.0, "tokens": 0}
    p = f_softargmax(x, get_divergence(divergence), reference).double()
    p_t = p.gather(1, t[:, None]).squeeze(1)
    p_eps = (p_t + epsilon) / (1 + epsilon * V)
    onehot = torch.zeros_like(p).scatter_(1, t[:, None], 1.0)
    out = {
        "token_accuracy": float((p.argmax(-1) == t).double().mean()),
        "support_size": float((p > 0).double().sum(-1).mean()),
        "eps_perplexity": float(torch.exp(-torch.log(p_eps).mean())),
        "zero_prob_rate": float((p_t == 0).double().mean()),
        "jsd_to_target": float(jensen_shannon(p, onehot).mean()),
        "tokens": int(t.numel()),
    }
    if teacher_probs is not None:
        tp = torch.as_tensor(teacher_probs)[valid].double()
        out["jsd_to_teacher"] = float(jensen_shannon(p, tp).mean())
    return out


def make_compute_metrics(
    divergence: DivergenceSpec = "alpha:1.5",
    reference: ReferenceSpec = "unit",
    epsilon: float = 1e-6,
    shift: bool = True,
) -> Callable:
    """A ``compute_metrics`` for the trainers (``Trainer(compute_metrics=...)``): receives the eval
    logits and labels and returns :func:`sparse_safe_metrics`.

    Logits [B, T, V] with labels [B, T] aligned with the inputs (causal LM: ``shift=True``, the default)
    or with the logits (token classification, masked LM, seq2seq decoders: ``shift=False``); or
    classification logits [B, C] with labels [B] (never shifted)."""

    def compute_metrics(eval_pred) -> dict:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        out = sparse_safe_metrics(torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(labels)),
                                  divergence, reference, epsilon, shift=shift)
        out.pop("tokens")
        return out

    return compute_metrics
