"""Trainers: ``FDivTrainer`` (transformers), ``FDivSFTTrainer`` (TRL) and their shared mixin."""

from .fdiv_trainer import FDivTrainer, FDivTrainingArguments
from .mixin import FDivLossArguments, FDivTrainerMixin
from .sft_trainer import FDivSFTConfig, FDivSFTTrainer

__all__ = [
    "FDivLossArguments",
    "FDivTrainerMixin",
    "FDivTrainer",
    "FDivTrainingArguments",
    "FDivSFTTrainer",
    "FDivSFTConfig",
]
