"""Trainers: ``FDivTrainer`` (transformers), ``FDivSFTTrainer`` (TRL), ``FDivDistillationTrainer`` and
their shared mixin."""

from .distillation_trainer import FDivDistillationConfig, FDivDistillationTrainer
from .fdiv_trainer import FDivTrainer, FDivTrainingArguments
from .mixin import FDivLossArguments, FDivTrainerMixin
from .on_policy_distillation_trainer import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer
from .sft_trainer import FDivSFTConfig, FDivSFTTrainer
from .teacher import add_teacher_topk

__all__ = [
    "FDivLossArguments",
    "FDivTrainerMixin",
    "FDivTrainer",
    "FDivTrainingArguments",
    "FDivSFTTrainer",
    "FDivSFTConfig",
    "FDivDistillationTrainer",
    "FDivDistillationConfig",
    "add_teacher_topk",
    "FDivOnPolicyDistillationTrainer",
    "FDivOnPolicyDistillationConfig",
    "FDivGKDTrainer",
    "FDivGKDConfig",
]


def __getattr__(name):
    # trl.experimental warns on import: load the GKD trainer only when it is asked for
    if name in ("FDivGKDTrainer", "FDivGKDConfig"):
        from . import gkd_trainer

        return getattr(gkd_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
