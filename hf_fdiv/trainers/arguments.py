"""The config fields of the f-divergence loss shared by every hf_fdiv config class, and the
reference measure they name (``unit``, ``uniform`` or a file holding a [V] prior)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from ..divergences import get_divergence

__all__ = ["FDivLossArguments", "load_reference"]

_NAMED_REFERENCES = ("unit", "uniform")


def _is_reference_file(reference) -> bool:
    """True for a reference given as a file path (anything but 'unit' / 'uniform'); raises when the
    file does not exist."""
    if not isinstance(reference, str) or reference.strip().lower() in _NAMED_REFERENCES:
        return False
    if not os.path.isfile(reference):
        raise ValueError(
            f"reference={reference!r} is neither 'unit', 'uniform' nor an existing file: pass one of those or the "
            "path of a torch.save'd [V] tensor."
        )
    return True


@dataclass
class FDivLossArguments:
    """Config fields of the f-divergence loss, shared by every hf_fdiv config class."""

    divergence: str = field(
        default="alpha:1.5",
        metadata={
            "help": "f-divergence generating the loss: kl (= cross-entropy), reverse_kl, chi2, squared_hellinger, "
            "js, alpha:<a> for any a > 0 (alpha:1.5 = entmax15, the paper's headline; alpha:2 = sparsemax)."
        },
    )
    reference: str = field(
        default="unit",
        metadata={
            "help": "Reference measure q: 'unit' (all ones; alpha-divergence = alpha-entmax), 'uniform' (1/V), or "
            "the path of a torch-saved [V] tensor used as a class prior (a zero excludes the class)."
        },
    )
    fdiv_max_iter: Optional[int] = field(
        default=None,
        metadata={"help": "Cap on root-search passes per chunk of rows (default 60, 200 for alpha > 2)."},
    )
    fdiv_skip_nonfinite: bool = field(
        default=False,
        metadata={"help": "Skip token rows whose logits contain NaN/inf (loss 0, gradient 0) and count them in the "
                  "`nonfinite_rows` metric, instead of stopping with an error."},
    )
    fdiv_fused: bool = field(
        default=True,
        metadata={"help": "Fuse the loss with the LM head (never materialise [tokens x vocab] logits) when the model has "
                  "the standard backbone + lm_head layout. False: use the model's logits."},
    )

    def _validate_fdiv(self) -> None:
        get_divergence(self.divergence)  # raises ValueError with the known names
        _is_reference_file(self.reference)
        if self.fdiv_max_iter is not None and self.fdiv_max_iter < 1:
            raise ValueError(f"fdiv_max_iter must be >= 1, got {self.fdiv_max_iter}.")


def load_reference(reference: Union[str, float, Tensor]) -> Union[str, float, Tensor]:
    if _is_reference_file(reference):
        q = torch.load(reference, map_location="cpu", weights_only=True)
        if not isinstance(q, Tensor):
            raise ValueError(f"{reference} does not contain a tensor (got {type(q).__name__}).")
        return q
    return reference
