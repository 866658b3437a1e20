"""``FDivSeq2SeqTrainer``: ``transformers.Seq2SeqTrainer`` trained with an f-divergence Fenchel-Young loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Seq2SeqTrainingArguments, Seq2SeqTrainer

from .fdiv_trainer import FDivTrainer
from .mixin import FDivLossArguments


@dataclass
class FDivSeq2SeqTrainingArguments(FDivLossArguments, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` (``predict_with_generate``, ``generation_max_length``, ...) plus
    ``divergence``, ``reference``, ``fdiv_max_iter``, ``fdiv_fused``, ``fdiv_skip_nonfinite`` and
    ``base_model_id``; ``bf16`` defaults to "auto"."""

    def __post_init__(self):
        self._resolve_precision()
        super().__post_init__()
        self._validate_fdiv()


class FDivSeq2SeqTrainer(FDivTrainer, Seq2SeqTrainer):
    """Drop-in ``transformers.Seq2SeqTrainer`` for encoder-decoders (T5, BART, Marian, Whisper,
    ``VisionEncoderDecoderModel``) whose loss is l_f over the decoder logits instead of cross-entropy.

    The loss is the stock model's: decoder logits [B, T, V] against ``labels`` [B, T] (no extra shift,
    -100 ignored), with ``decoder_input_ids`` from the collator (``DataCollatorForSeq2Seq(model=...)``)
    or made from the labels as the model does. ``predict_with_generate`` evaluation generates as the
    stock trainer does and reports the f-divergence loss. To decode with the trained operator, pass
    ``logits_processor=[FSoftargmaxLogitsProcessor(divergence)]`` to ``generate``.

    Example::

        trainer = FDivSeq2SeqTrainer(model=t5, args=FDivSeq2SeqTrainingArguments("out", divergence="alpha:1.5",
                                     predict_with_generate=True), train_dataset=ds,
                                     data_collator=DataCollatorForSeq2Seq(tok, model=t5))
    """

    _fdiv_trainer_name = "FDivSeq2SeqTrainer"
    _fdiv_seq2seq = True

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        loss, tokens, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys,
                                                       **gen_kwargs)
        if self.args.predict_with_generate and not prediction_loss_only and loss is not None:
            # the stock step read the model's own cross-entropy next to the generated tokens: report ours
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, self._prepare_inputs(inputs)).detach()
        return loss, tokens, labels
