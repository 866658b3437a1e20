"""``FDivTrainer``: ``transformers.Trainer`` trained with an f-divergence Fenchel-Young loss, for every
model whose stock loss is a cross-entropy over classes (see :mod:`.tasks`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from transformers import Trainer, TrainingArguments

from . import checks
from .tasks import check_label_column, task_of
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
    """Drop-in ``transformers.Trainer`` whose loss is l_f instead of the model's cross-entropy.

    Trains every model whose stock loss is a class cross-entropy (``model.loss_type`` in transformers'
    ``LOSS_MAPPING``): causal and masked LMs, sequence / image / audio / video classification, token
    classification, question answering (start and end positions), semantic segmentation (upsampled
    logits, the config's ignore index) and encoder-decoders (decoder logits vs ``labels``), with the
    stock loss's conventions, so ``divergence="kl"`` is the stock loss. The loss is normalised by the
    targets of the whole accumulated batch (tokens, examples, pixels, positions). Regression,
    multi-label, CTC and detection heads are refused before training.

    Everything else is the Trainer you know (collators, callbacks, evaluation with
    ``compute_metrics``, checkpoints, ``push_to_hub``). ``divergence="kl"`` reproduces the stock loss.

    Example::

        trainer = FDivTrainer(model=model, args=FDivTrainingArguments("out", divergence="alpha:1.5"),
                              train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    """

    _fdiv_trainer_name = "FDivTrainer"
    _tag_names = ["hf-fdiv"]
    _fdiv_seq2seq = False  # the seq2seq trainer needs an encoder-decoder

    def __init__(self, *args, **kwargs):
        fdiv_kwargs = {k: kwargs.pop(k) for k in ("divergence", "reference") if k in kwargs}
        bound = _TRAINER_SIGNATURE.bind_partial(self, *args, **kwargs).arguments
        model = bound.get("model")
        if model is not None and not isinstance(model, str):
            task = task_of(model, type(self).__name__, seq2seq=self._fdiv_seq2seq)
            for which in ("train_dataset", "eval_dataset"):
                data = bound.get(which)
                for name, part in (data.items() if isinstance(data, dict) else [(which, data)]):
                    check_label_column(part, task, name, type(self).__name__)
        super().__init__(*args, **kwargs, **fdiv_kwargs)
        record_base_model(self)

    def init_hf_repo(self, *args, **kwargs) -> None:
        checks.init_hub_repo(self, super().init_hf_repo, *args, **kwargs)

    def fdiv_card_fields(self) -> dict:
        return card_fields(self, super().fdiv_card_fields())
