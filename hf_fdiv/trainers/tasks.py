"""Which cross-entropy a model's stock loss is, read from transformers' own seam, and the same
convention for the f-divergence loss.

``PreTrainedModel.__init__`` sets ``model.loss_type`` from the class-name suffix and
``transformers.loss.loss_utils.LOSS_MAPPING[loss_type]`` is the loss the stock model computes;
encoder-decoders (T5, BART, Whisper, ``VisionEncoderDecoderModel``) compute theirs inline over the
decoder logits. :func:`task_of` turns that into a :class:`TaskConvention`: which batch keys are the
targets, how they line up with the logits (shift or not, ignore index, upsampling), so that
``divergence="kl"`` *is* the stock loss:

============================  =========================================  ===========================
kind                          rows of the loss (class dim last)          targets
============================  =========================================  ===========================
causal_lm                     logits [B, T, V]                           labels shifted left by one
masked_lm, token_class.       logits [B, T, C]                           labels [B, T]
seq2seq                       decoder logits [B, T, V]                   labels [B, T] (no shift)
classification                logits [B, C] (text, image, audio, video)  labels [B]
question_answering            [start_logits, end_logits] [B, 2, T]       positions clamped to [0, T],
                                                                         T = ignored (as the stock)
semantic_segmentation         logits [B, C, h, w] upsampled (bilinear)   labels [B, H, W]; the config's
                              to [B, H, W, C]                            ``semantic_loss_ignore_index``
============================  =========================================  ===========================

Everything else (regression, multi-label BCE, CTC, detection, instance segmentation, TTS) is not a
distribution over classes: :func:`task_of` refuses it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..losses import IGNORE_INDEX
from .checks import ConfigurationError, check_causal_lm

__all__ = ["TaskConvention", "task_of", "check_label_column", "label_prior"]

_SHIFTED_LM = ("ForCausalLM", "ForConditionalGeneration", "CsmForConditionalGeneration")
_CLASSIFICATION = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForVideoClassification": "video-classification",
    "ForAudioClassification": "audio-classification",
}
_PIPELINES = {
    "causal_lm": "text-generation",
    "masked_lm": "fill-mask",
    "token_classification": "token-classification",
    "question_answering": "question-answering",
    "semantic_segmentation": "image-segmentation",
}
#: kinds whose targets are one token per position (their accuracy is a token accuracy)
TOKEN_KINDS = ("causal_lm", "masked_lm", "token_classification", "seq2seq")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class TaskConvention:
    """How the stock loss of one kind of model lines targets up with logits (see the module table).

    ``kind``: one of the module table's kinds; ``label_keys``: the batch keys that are targets (not
    model inputs); ``ignore_index``: the ignored label value as the data gives it (-100, or the
    segmentation config's ``semantic_loss_ignore_index``); ``num_classes``: the head's classes when
    fixed by the config (None for LMs, whose head says it, and QA, whose classes are positions)."""

    kind: str
    pipeline_tag: str
    label_keys: tuple = ("labels",)
    ignore_index: int = IGNORE_INDEX
    num_classes: Optional[int] = None
    decoder_start: Optional[tuple] = None  # (pad id, decoder start id) for encoder-decoders without their own rule

    @property
    def shift(self) -> bool:
        return self.kind == "causal_lm"

    @property
    def accuracy_key(self) -> str:
        return "mean_token_accuracy" if self.kind in TOKEN_KINDS else "accuracy"

    @property
    def remaps_labels(self) -> bool:
        """True when the Trainer's ``labels != -100`` count is not the count of targets."""
        return self.kind in ("question_answering", "semantic_segmentation")

    # ------------------------------------------------------------------ targets
    def targets(self, inputs: dict) -> Tensor:
        """Class ids aligned with the rows of :meth:`logits` (without the class dim), -100 = ignored."""
        if self.kind == "question_answering":
            return self._positions(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"every batch needs `labels` to train a {self.kind.replace('_', ' ')} model (the "
                             "collator or the dataset's label column gives them).")
        if labels.is_floating_point():
            raise ConfigurationError(
                f"the labels are floats ({labels.dtype}): the stock loss would be MSE (regression) or BCE (multi-label), "
                "not a distribution over classes. hf_fdiv trains class ids: give integer labels in [0, num_labels), or "
                "train this head with the stock Trainer."
            )
        if self.shift:
            return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        if self.kind == "classification":
            labels = labels.reshape(-1)
        if self.ignore_index != IGNORE_INDEX:
            labels = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        return labels

    def _positions(self, inputs: dict) -> Tensor:
        missing = [k for k in self.label_keys if inputs.get(k) is None]
        if missing:
            raise ValueError(f"every question-answering batch needs {list(self.label_keys)} (missing {missing}): "
                             "prepare the features as transformers' run_qa.py does.")
        main = inputs.get("input_ids", inputs.get("inputs_embeds"))
        length = main.shape[1]  # the logits have one score per input position
        # the stock ForQuestionAnsweringLoss: clamp to [0, T], T is the ignored index
        rows = [inputs[k].reshape(-1).clamp(0, length) for k in self.label_keys]
        positions = torch.stack(rows, 1)
        return positions.masked_fill(positions == length, IGNORE_INDEX)

    # ------------------------------------------------------------------ logits
    def logits(self, outputs: Any, targets: Tensor) -> Tensor:
        """The model's scores with the class dim last, one row per entry of ``targets``."""
        get = (lambda k: outputs.get(k)) if isinstance(outputs, dict) else (lambda k: getattr(outputs, k, None))
        if self.kind == "question_answering":
            return torch.stack([get("start_logits"), get("end_logits")], 1)
        logits = get("logits")
        if logits is None:
            logits = outputs[0]
        if self.kind == "semantic_segmentation":
            # the stock loss upsamples the low-resolution logits to the label map (bilinear, not aligned)
            up = torch.nn.functional.interpolate(logits, size=targets.shape[-2:], mode="bilinear",
                                                 align_corners=False)
            return up.permute(0, 2, 3, 1)
        return logits

    # ------------------------------------------------------------------ model inputs
    def model_inputs(self, inputs: dict, unwrapped, drop: tuple = ()) -> dict:
        """The batch without its targets; an encoder-decoder gets ``decoder_input_ids`` made from the
        labels as its own forward makes them (the labels are not passed, so it cannot)."""
        out = {k: v for k, v in inputs.items() if k not in self.label_keys and k not in drop}
        if (self.kind == "seq2seq" and "decoder_input_ids" not in out and "decoder_inputs_embeds" not in out
                and inputs.get("labels") is not None):
            out["decoder_input_ids"] = decoder_input_ids_from(unwrapped, inputs["labels"], self.decoder_start)
        return out


def decoder_input_ids_from(model, labels: Tensor, decoder_start: Optional[tuple]) -> Tensor:
    """The decoder inputs an encoder-decoder makes from ``labels``: its own
    ``prepare_decoder_input_ids_from_labels`` (T5, BART, Marian, VisionEncoderDecoder), else labels shifted
    right after the decoder start token with -100 replaced by the pad id (Whisper's ``shift_tokens_right``)."""
    base = _base(model)
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    pad, start = decoder_start
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def _refusal(name: str, what: str, use: str) -> ConfigurationError:
    return ConfigurationError(f"{name}: {what}, not a cross-entropy over classes, so an f-divergence loss does not "
                              f"apply; {use}")


def task_of(model, trainer_name: str = "FDivTrainer", seq2seq: bool = False) -> TaskConvention:
    """The :class:`TaskConvention` of ``model`` (a transformers model, possibly PEFT-wrapped), or a
    :class:`ConfigurationError` saying in one line why its stock loss is not a class cross-entropy.

    ``seq2seq``: the caller is the seq2seq trainer, which needs an encoder-decoder."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    base = _base(model)
    config = getattr(base, "config", None)
    arch = type(base).__name__
    loss_type = getattr(base, "loss_type", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    lm_loss = loss_type is None or LOSS_MAPPING.get(loss_type) is ForCausalLMLoss
    if seq2seq and not (encoder_decoder and lm_loss):
        raise ConfigurationError(
            f"{trainer_name} trains encoder-decoder models (T5, BART, Marian, Whisper, VisionEncoderDecoderModel), but "
            f"got a {arch}, which has no decoder to generate with: use FDivTrainer for it, or load an encoder-decoder "
            "with AutoModelForSeq2SeqLM / AutoModelForSpeechSeq2Seq."
        )
    name = f"{trainer_name} cannot train a {arch}"
    num_labels = getattr(config, "num_labels", None)
    if loss_type in _CLASSIFICATION:
        problem = getattr(config, "problem_type", None)
        if problem == "regression" or (problem is None and num_labels == 1):
            raise _refusal(name, "with num_labels=1 / problem_type='regression' its stock loss is a mean squared "
                           "error (regression)", "train it with the stock Trainer, or set num_labels >= 2 for classes.")
        if problem == "multi_label_classification":
            raise _refusal(name, "with problem_type='multi_label_classification' its stock loss is a per-label "
                           "binary cross-entropy (BCE)", "train it with the stock Trainer, or use "
                           "problem_type='single_label_classification' with one class per example.")
        return TaskConvention("classification", _CLASSIFICATION[loss_type], num_classes=num_labels)
    if loss_type == "ForTokenClassification":
        return TaskConvention("token_classification", _PIPELINES["token_classification"], num_classes=num_labels)
    if loss_type == "ForMaskedLM":
        return TaskConvention("masked_lm", _PIPELINES["masked_lm"])
    if loss_type == "ForQuestionAnswering":
        return TaskConvention("question_answering", _PIPELINES["question_answering"],
                              label_keys=("start_positions", "end_positions"))
    if loss_type == "ForSemanticSegmentation":
        if num_labels is not None and num_labels < 2:
            raise _refusal(name, "with num_labels=1 its stock loss is a per-pixel binary cross-entropy",
                           "train it with the stock Trainer, or set num_labels >= 2 (background + classes).")
        if getattr(config, "use_auxiliary_head", False):
            raise ConfigurationError(
                f"{name} with use_auxiliary_head=True: its stock loss adds an auxiliary head's loss that the model "
                "does not return, so hf_fdiv would train something else; load it with use_auxiliary_head=False."
            )
        ignore = int(getattr(config, "semantic_loss_ignore_index", 255))
        return TaskConvention("semantic_segmentation", _PIPELINES["semantic_segmentation"], ignore_index=ignore,
                              num_classes=num_labels)
    if loss_type == "ForCTC":
        raise _refusal(name, "its stock loss is CTC, a sum over alignments of a label sequence with audio frames",
                       "train it with the stock Trainer, or use an encoder-decoder (Whisper) with FDivSeq2SeqTrainer.")
    if not lm_loss:
        raise _refusal(name, f"its stock loss is {LOSS_MAPPING[loss_type].__name__} (loss_type={loss_type!r}: "
                       "box / mask matching or a non-class objective)", "train it with the stock Trainer.")
    if encoder_decoder:
        main = getattr(base, "main_input_name", "input_ids")
        tag = {"input_features": "automatic-speech-recognition", "input_values": "automatic-speech-recognition",
               "pixel_values": "image-to-text"}.get(main, "text2text-generation")
        generation = getattr(base, "generation_config", None)
        decoder = getattr(config, "decoder", config)
        start = getattr(generation, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "decoder_start_token_id", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(decoder, "pad_token_id", None)
        return TaskConvention("seq2seq", tag, decoder_start=(pad, start))
    if isinstance(base, PreTrainedModel):
        check_causal_lm(model, trainer_name)
    return TaskConvention("causal_lm", _PIPELINES["causal_lm"])


def check_label_column(dataset: Any, task: TaskConvention, which: str, trainer_name: str) -> None:
    """Before training: a classification dataset's labels must fit the head's ``num_labels``.

    Reads the ``label``/``labels`` feature: floats are refused (a regression / multi-label target); a
    ``ClassLabel`` (or a sequence of them for token classification) must have ``num_labels`` names; a
    plain integer column must lie in [0, num_labels) (or be -100)."""
    if dataset is None or task.num_classes is None or task.kind == "semantic_segmentation":
        return
    features = getattr(dataset, "features", None)
    if not features:
        return
    key = next((k for k in ("labels", "label") if k in features), None)
    if key is None:
        return
    feature = features[key]
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    dtype = str(getattr(inner if task.kind == "token_classification" else feature, "dtype", ""))
    if dtype.startswith("float"):
        raise ConfigurationError(
            f"{which}'s `{key}` column holds floats ({dtype}): for this head the stock loss would be MSE (regression) "
            f"or BCE (multi-label), not a distribution over classes. {trainer_name} trains class ids: cast the column "
            "to integers in [0, num_labels), or train this head with the stock Trainer."
        )
    declared = getattr(inner if task.kind == "token_classification" else feature, "num_classes", None)
    C = task.num_classes
    if declared is not None and declared != C:
        raise ConfigurationError(
            f"{which}'s `{key}` column has {declared} classes but the model's head has num_labels={C}: load the "
            f"model with num_labels={declared} (and its id2label / label2id) before giving it to {trainer_name}."
        )
    if declared is None and task.kind == "classification" and dtype.startswith("int"):
        import numpy as np

        values = np.asarray(dataset.with_format("numpy")[key])
        bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= C))]
        if bad.size:
            raise ConfigurationError(
                f"{which}'s `{key}` column has label {int(bad[0])} ({bad.size} such rows) outside [0, {C}) for a head "
                f"with num_labels={C}: load the model with num_labels={int(values.max()) + 1}, or map the labels to "
                "0..num_labels-1."
            )


def label_prior(batches, task: TaskConvention, num_classes: int, smoothing: float = 1.0, reduce=None):
    """The class prior of the training targets, q_c = (n_c + s) / (N + C s) (Laplace smoothing s > 0
    keeps every class possible), as a [C] float32 tensor, and N.

    ``batches``: the training batches as the loss sees them (their targets are :meth:`TaskConvention.targets`);
    ``reduce``: sums the [C] counts over processes (``accelerator.reduce(..., "sum")``) when the data is sharded."""
    from ..losses import check_target_ids

    counts = torch.zeros(num_classes, dtype=torch.float64)
    for batch in batches:
        targets = task.targets(batch).reshape(-1).cpu()
        check_target_ids(targets, num_classes)
        targets = targets[targets != IGNORE_INDEX]
        counts += torch.bincount(targets, minlength=num_classes).double()
    if reduce is not None:
        counts = reduce(counts)
    total = float(counts.sum())
    prior = (counts + smoothing) / (total + num_classes * smoothing)
    return prior.float(), int(total)
