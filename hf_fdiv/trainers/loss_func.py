"""``compute_loss_func``: the f-divergence loss for the stock ``transformers.Trainer``, no subclass.

``Trainer(..., compute_loss_func=hf_fdiv.compute_loss_func(model, divergence="alpha:1.5"))`` uses
transformers' own hook: the Trainer takes ``labels`` out of the batch, runs the model, and calls
``fn(outputs, labels, num_items_in_batch=...)``; with the hook set, it counts the targets of the whole
accumulated batch (``labels != -100``, over ``labels[..., 1:]`` for causal LMs) and does not divide by the
accumulation steps, so the loss returned is sum_rows l_f / ``num_items_in_batch``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..divergences import DivergenceSpec, get_divergence
from ..losses import IGNORE_INDEX
from .arguments import LABEL_PRIOR, load_reference
from .checks import ConfigurationError
from .loss_path import LossInputs, LossSettings, outputs_loss
from .tasks import task_of

__all__ = ["compute_loss_func"]


def compute_loss_func(
    model,
    divergence: DivergenceSpec = "alpha:1.5",
    reference: Any = "unit",
    max_iter: Optional[int] = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """A ``compute_loss_func`` for ``transformers.Trainer`` giving l_f with the model's own convention.

    The model (its ``loss_type``, see :mod:`hf_fdiv.trainers.tasks`) says how: labels shifted for
    causal LMs, as given for masked LMs, token and sequence / image / audio classification and the
    decoder of an encoder-decoder, logits upsampled to the label map for semantic segmentation. The
    result equals :class:`~hf_fdiv.FDivTrainer`'s loss for these kinds.

    * Question answering cannot use this hook: its targets are ``start_positions`` / ``end_positions``,
      which the Trainer passes to the model, never to the hook. Use ``FDivTrainer``.
    * Encoder-decoders (T5, BART, Whisper): the Trainer takes ``labels`` away before the forward, so
      the batch must carry ``decoder_input_ids``: ``DataCollatorForSeq2Seq(tokenizer, model=model)``
      makes them from the labels. (``FDivSeq2SeqTrainer`` makes them itself.)
    * Semantic segmentation: the Trainer counts ``labels != -100``, so ignored pixels count in
      ``num_items_in_batch`` unless the data marks them with -100 (FDivTrainer counts only the pixels
      its loss uses).

    Args:
        model: the model given to the Trainer (PEFT-wrapped or not).
        divergence: ``"kl"`` (the stock cross-entropy), ``"alpha:1.5"``, ``"chi2"``, ...
        reference: ``"unit"``, ``"uniform"``, a [C] tensor or the path of one.
    Returns:
        ``fn(outputs, labels, num_items_in_batch=None) -> loss`` (0-d tensor).
    """
    task = task_of(model, "compute_loss_func")
    if task.kind == "question_answering":
        raise ConfigurationError(
            "compute_loss_func cannot train question answering: the Trainer passes start_positions / end_positions to "
            "the model and only `labels` to the hook. Use hf_fdiv.FDivTrainer (the class swapped, same arguments)."
        )
    settings = LossSettings(get_divergence(divergence), max_iter, skip_nonfinite)
    ref = load_reference(reference)
    if isinstance(ref, str) and ref.strip().lower() == LABEL_PRIOR:
        raise ConfigurationError(
            "compute_loss_func has no training data to count a label prior from: pass the [C] tensor, e.g. "
            "hf_fdiv.trainers.tasks.label_prior(batches, task_of(model), C)[0], or use FDivTrainer with "
            "reference='label_prior'."
        )

    def make_inputs(targets, num_classes):
        q = ref.to(targets.device) if isinstance(ref, torch.Tensor) else ref
        return LossInputs(target=targets.reshape(-1), reference=q)

    def fdiv_compute_loss(outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("compute_loss_func got no labels: the batches need a `labels` column (the Trainer takes "
                             "it out and hands it to this function).")
        targets = task.targets({"labels": labels})
        loss_sum, _ = outputs_loss(outputs, targets, make_inputs, lambda rows: rows, settings,
                                   lambda out: task.logits(out, targets))
        if num_items_in_batch is None:
            count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            count = torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp(min=1)
        return loss_sum / count.to(loss_sum.device)

    return fdiv_compute_loss
