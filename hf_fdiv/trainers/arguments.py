"""The config fields of the f-divergence loss shared by every hf_fdiv config class, and the
reference measure they name (``unit``, ``uniform`` or a file holding a [V] prior).

Besides the loss fields, every hf_fdiv config changes two defaults so that a command line runs as
written on any machine: ``bf16="auto"`` (bf16 where a CUDA GPU supports it, fp32 elsewhere, with one
log line saying which) and a warning when ``torch_compile=True`` on a CPU. ``base_model_id`` records
the Hub id of a model loaded from a local path (model card ``base_model:``, adapter_config.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor
from transformers.utils import logging

from ..divergences import get_divergence

__all__ = ["FDivLossArguments", "LABEL_PRIOR", "load_reference", "resolve_bf16"]

logger = logging.get_logger("hf_fdiv")

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_bf16(value, use_cpu: bool = False, fp16: bool = False) -> bool:
    """``bf16`` as given (bool, "true"/"false", or "auto"/None) -> a bool.

    "auto": on where a CUDA GPU supports bf16 (and neither ``use_cpu`` nor ``fp16`` is set), else off:
    bf16 autocast on a CPU is legal but far slower than fp32."""
    if isinstance(value, bool):
        return value
    key = "auto" if value is None else str(value).strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    if key != "auto":
        raise ValueError(f"bf16 must be True, False or 'auto', got {value!r}.")
    if fp16:
        chosen, why = False, "fp16 is set"
    elif use_cpu:
        chosen, why = False, "use_cpu is set"
    elif cuda_supports_bf16():
        chosen, why = True, f"the CUDA GPU ({torch.cuda.get_device_name()}) supports bf16"
    elif torch.cuda.is_available():
        chosen, why = False, "the CUDA GPU does not support bf16"
    else:
        chosen, why = False, "no CUDA GPU (bf16 autocast on a CPU is much slower than fp32)"
    logger.warning_once(f"hf_fdiv: bf16='auto' -> bf16={chosen} because {why}; pass --bf16 True/False to choose.")
    return chosen

_NAMED_REFERENCES = ("unit", "uniform", "label_prior")
#: the reference counted from the training labels (see :func:`hf_fdiv.trainers.tasks.label_prior`)
LABEL_PRIOR = "label_prior"


def _is_reference_file(reference) -> bool:
    """True for a reference given as a file path (anything but 'unit' / 'uniform'); raises when the
    file does not exist."""
    if not isinstance(reference, str) or reference.strip().lower() in _NAMED_REFERENCES:
        return False
    if not os.path.isfile(reference):
        raise ValueError(
            f"reference={reference!r} is neither 'unit', 'uniform', 'label_prior' nor an existing file: pass one of "
            "those or the path of a torch.save'd [V] tensor."
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
            "help": "Reference measure q: 'unit' (all ones; alpha-divergence = alpha-entmax), 'uniform' (1/V), "
            "'label_prior' (the class frequencies of the training labels, counted once before training, with "
            "label_prior_smoothing), or the path of a torch-saved [V] tensor used as a class prior (a zero excludes "
            "the class)."
        },
    )
    label_prior_smoothing: float = field(
        default=1.0,
        metadata={"help": "reference='label_prior': pseudo-count added to every class (q_c = (n_c + s) / (N + C s)), so "
                  "that a class absent from the training labels keeps q_c > 0."},
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
    base_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id of the model you start from (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) when it is "
                  "loaded from a local path: written as `base_model:` in the model card and as base_model_name_or_path "
                  "in adapter_config.json, so that others can use what you push. Default: the model's own Hub id "
                  "when it has one."},
    )
    # Overrides TrainingArguments/TRL's bf16 (TRL: True whatever the machine): "auto" works everywhere.
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 mixed precision: 'auto' (default: on where a CUDA GPU supports bf16, off elsewhere, "
                  "with one log line saying which), True or False.", "nargs": "?", "const": "true"},
    )

    def _resolve_precision(self) -> None:
        """Before TrainingArguments.__post_init__ (which rejects bf16 without a GPU unless use_cpu)."""
        self.bf16 = resolve_bf16(self.bf16, bool(getattr(self, "use_cpu", False)), bool(getattr(self, "fp16", False)))
        compiling = getattr(self, "torch_compile", False) or getattr(self, "torch_compile_backend", None) or getattr(
            self, "torch_compile_mode", None)
        if compiling and (getattr(self, "use_cpu", False) or not torch.cuda.is_available()):
            logger.warning_once(
                "hf_fdiv: torch_compile=True on a CPU: the first training step compiles the model with inductor and can "
                "take minutes (5 min for a 135M model on 2 cores) before any progress is shown. Set torch_compile=False "
                "unless you train long enough to earn it back."
            )

    def _validate_fdiv(self) -> None:
        get_divergence(self.divergence)  # raises ValueError with the known names
        _is_reference_file(self.reference)
        if not self.label_prior_smoothing > 0:
            raise ValueError(f"label_prior_smoothing must be > 0 (a floor keeping every class possible), got "
                             f"{self.label_prior_smoothing}.")
        if self.fdiv_max_iter is not None and self.fdiv_max_iter < 1:
            raise ValueError(f"fdiv_max_iter must be >= 1, got {self.fdiv_max_iter}.")
        if self.base_model_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                if os.path.exists(self.base_model_id):
                    raise HFValidationError("it is a local path")
                validate_repo_id(self.base_model_id)
            except HFValidationError as err:
                raise ValueError(
                    f"base_model_id={self.base_model_id!r} is not a Hub model id ({err}): give the id the model has on "
                    "the Hub, like 'HuggingFaceTB/SmolLM2-135M-Instruct'."
                ) from None


def load_reference(reference: Union[str, float, Tensor]) -> Union[str, float, Tensor]:
    if _is_reference_file(reference):
        q = torch.load(reference, map_location="cpu", weights_only=True)
        if not isinstance(q, Tensor):
            raise ValueError(f"{reference} does not contain a tensor (got {type(q).__name__}).")
        return q
    return reference
