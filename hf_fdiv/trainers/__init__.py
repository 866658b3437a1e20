"""Trainers: ``FDivTrainer`` (transformers), ``FDivSFTTrainer`` (TRL), ``FDivDistillationTrainer`` and
their shared mixin."""

from .distillation_trainer import FDivDistillationConfig, FDivDistillationTrainer
from .fdiv_trainer import FDivTrainer, FDivTrainingArguments
from .mixin import FDivLossArguments, FDivTrainerMixin
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
]
