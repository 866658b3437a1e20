"""``FDivTrainer``: ``transformers.Trainer`` trained with an f-divergence Fenchel-Young loss."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from transformers import Trainer, TrainingArguments

from . import checks
from .mixin import FDivLossArguments, FDivTrainerMixin
from .sft_trainer import card_fields, record_base_model

_TRAINER_SIGNATURE = inspect.signature(Trainer.__init__)


@dataclass
class FDivTrainingArguments(FDivLossArguments, TrainingArguments):
    """``TrainingArguments`` plus ``divergence``, ``reference``, ``fdiv_max_iter``, ``fdiv_fused``,
    ``fdiv_skip_nonfinite`` and ``base_model_id``; ``bf16`` defaults to "auto"."""

    def __post_init__(self):
        self._resolve_precision()
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

    def __init__(self, *args, **kwargs):
        fdiv_kwargs = {k: kwargs.pop(k) for k in ("divergence", "reference") if k in kwargs}
        model = _TRAINER_SIGNATURE.bind_partial(self, *args, **kwargs).arguments.get("model")
        if model is not None:
            checks.check_causal_lm(model, type(self).__name__)
        super().__init__(*args, **kwargs, **fdiv_kwargs)
        record_base_model(self)

    def init_hf_repo(self, *args, **kwargs) -> None:
        checks.init_hub_repo(self, super().init_hf_repo, *args, **kwargs)

    def fdiv_card_fields(self) -> dict:
        return card_fields(self, super().fdiv_card_fields())
