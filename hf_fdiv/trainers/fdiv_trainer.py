"""``FDivTrainer``: ``transformers.Trainer`` trained with an f-divergence Fenchel-Young loss."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Trainer, TrainingArguments

from .mixin import FDivLossArguments, FDivTrainerMixin


@dataclass
class FDivTrainingArguments(FDivLossArguments, TrainingArguments):
    """``TrainingArguments`` plus ``divergence``, ``reference`` and ``fdiv_max_iter``."""

    def __post_init__(self):
        super().__post_init__()
        self._validate_fdiv()


class FDivTrainer(FDivTrainerMixin, Trainer):
    """Drop-in ``transformers.Trainer`` for causal LMs whose loss is l_f instead of cross-entropy.

    Everything else is the Trainer you know (collators, callbacks, evaluation with
    ``compute_metrics``, checkpoints, ``push_to_hub``). ``divergence="kl"`` reproduces the stock loss.

    Example::

        trainer = FDivTrainer(model=model, args=FDivTrainingArguments("out", divergence="alpha:1.5"),
                              train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    """

    _fdiv_trainer_name = "FDivTrainer"
    _tag_names = ["hf-fdiv"]
