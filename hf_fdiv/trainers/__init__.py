"""Trainers: ``FDivTrainer`` and ``FDivSeq2SeqTrainer`` (transformers), ``FDivSFTTrainer`` (TRL),
``FDivDistillationTrainer``, their shared mixin, and ``compute_loss_func`` for the stock Trainer."""

from .distillation_trainer import FDivDistillationConfig, FDivDistillationTrainer
from .fdiv_trainer import FDivTrainer, FDivTrainingArguments
from .loss_func import compute_loss_func
from .mixin import FDivLossArguments, FDivTrainerMixin
from .on_policy_distillation_trainer import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer
from .seq2seq_trainer import FDivSeq2SeqTrainer, FDivSeq2SeqTrainingArguments
from .sft_trainer import FDivSFTConfig, FDivSFTTrainer
from .teacher import add_teacher_topk

__all__ = [
    "FDivLossArguments",
    "FDivTrainerMixin",
    "FDivTrainer",
    "FDivTrainingArguments",
    "FDivSeq2SeqTrainer",
    "FDivSeq2SeqTrainingArguments",
    "compute_loss_func",
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
