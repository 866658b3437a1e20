"""Decoding with f-softargmax: sample from (or greedily decode) the distribution the model was trained to
predict, p = f-softargmax(logits; q), instead of softmax(logits).

:class:`FSoftargmaxLogitsProcessor` replaces the scores by log p (``-inf`` outside the support), so
``model.generate``'s sampling, which applies a softmax, draws exactly from p and never emits a token
with p = 0; greedy decoding picks argmax p (= argmax of the logits). Put it last in the processor
list and disable the default top-k/top-p warpers (``top_k=0, top_p=1.0``) to sample from p itself.
For students trained with the teacher as reference measure (``teacher_mode="reference"``),
:class:`TeacherReference` supplies q from the teacher at every step.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor
from transformers import LogitsProcessor

from .divergences import DivergenceSpec, get_divergence
from .solver import ReferenceSpec, f_softargmax

__all__ = ["FSoftargmaxLogitsProcessor", "TeacherReference"]


class TeacherReference:
    """q = softmax(teacher logits / T) at the last position, recomputed from the running sequence.

    ``floor`` (default 1e-12) keeps every class possible, as in distillation's reference mode."""

    def __init__(self, teacher, temperature: float = 1.0, floor: float = 1e-12, num_classes: Optional[int] = None):
        self.teacher = teacher.eval()
        self.temperature = float(temperature)
        self.floor = float(floor)
        self.num_classes = num_classes

    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        device = next(self.teacher.parameters()).device
        logits = self.teacher(input_ids=input_ids.to(device)).logits[:, -1].float()
        if self.num_classes is not None:
            logits = logits[:, : self.num_classes]
        q = torch.softmax(logits / self.temperature, dim=-1)
        return q.clamp(min=self.floor).to(input_ids.device)


class FSoftargmaxLogitsProcessor(LogitsProcessor):
    """Logits processor: scores -> log f-softargmax(scores; q).

    Args:
        divergence: spec or FDivergence the model was trained with (``"alpha:1.5"``...).
        reference: ``"unit"``, ``"uniform"``, a [V] tensor, or a callable ``input_ids -> q [B, V]``
            (e.g. :class:`TeacherReference`).
    """

    def __init__(
        self,
        divergence: DivergenceSpec = "alpha:1.5",
        reference: Union[ReferenceSpec, Callable[[Tensor], Tensor]] = "unit",
    ):
        self.divergence = get_divergence(divergence)
        self.reference = reference

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        q = self.reference(input_ids) if callable(self.reference) else self.reference
        V = scores.shape[-1]
        if isinstance(q, Tensor) and q.shape[-1] != V:
            # model heads padded beyond the reference's vocabulary: the padding classes are excluded
            pad = torch.zeros(*q.shape[:-1], V - q.shape[-1], dtype=q.dtype, device=q.device)
            q = torch.cat([q, pad], -1) if q.shape[-1] < V else q[..., :V]
        p = f_softargmax(scores.float(), self.divergence, q, dim=-1)
        return torch.log(p).to(scores.dtype)  # log 0 = -inf: never sampled
