"""The constant part of the reference-mode distillation loss, logged as ``reference_constant``.

In ``teacher_mode="reference"`` the target is the data token c and q the teacher's probabilities, so
the Fenchel-Young loss l_f(theta, e_c; q) = f-softmax(theta; q) - theta_c + D_f(e_c, q) contains

    D_f(e_c, q) = q_c f(1 / q_c) + (sum_j q_j - q_c) f(0),

which does not depend on the student. It is the loss of the teacher alone (a zero correction,
theta = 0, gives f-softmax(0; q) = 0 for a normalised q) and grows like q_c^(1 - alpha) for the
alpha-divergence on tokens the teacher finds unlikely (-log q_c for KL), so a reference-mode loss in
the thousands is this constant, not a diverging student. ``loss - reference_constant`` < 0 means the
student improves on the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..divergences import FDivergence

__all__ = ["ReferenceConstant"]


class ReferenceConstant:
    """D_f(e_c, q) per target row, recorded as the loss path asks for the reference rows (a row asked
    for twice is written twice, never counted twice)."""

    def __init__(self, divergence: FDivergence, labels: Tensor, rows: Tensor):
        self.divergence = divergence
        self.labels = labels
        self.rows = rows
        self.values = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        f_zero = float(divergence.f(torch.zeros((), dtype=torch.float64)))
        # f(0) = +inf (reverse KL): the constant is infinite and the loss already drops it.
        self.f_zero = f_zero if math.isfinite(f_zero) else None

    def record(self, r: Tensor, q: Tensor) -> None:
        if self.f_zero is None:
            return
        q64 = q.double()
        qc = q64.gather(1, self.labels[r].to(q.device)[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
        value = qc * self.divergence.f(1.0 / qc) + (q64.sum(1) - qc) * self.f_zero
        self.values[r.to(self.values.device)] = value.to(self.values.device)

    def log_to(self, trainer, mode: str) -> None:
        """Append the mean over the target rows of every process to ``trainer._metrics[mode]``."""
        if self.f_zero is None:
            return
        local = torch.stack([self.values[self.rows].sum(), torch.tensor(float(self.rows.numel()), dtype=torch.float64,
                                                                         device=self.values.device)])
        total = trainer.accelerator.gather_for_metrics(local.to(trainer.accelerator.device)[None]).reshape(-1, 2).sum(0)
        if total[1] > 0:
            trainer._metrics[mode]["reference_constant"].append(float(total[0] / total[1]))
