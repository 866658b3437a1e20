"""The teacher's part of every hf_fdiv distillation loss, in one place.

``FDivDistillationTrainer`` (off-policy data), ``FDivOnPolicyDistillationTrainer`` (TRL's
``DistillationTrainer``) and ``FDivGKDTrainer`` (TRL's ``GKDTrainer``) fit the same Fenchel-Young
loss l_f(theta_student, y; q) (``docs/math.md``, "Distillation"), with teacher log-probabilities
t at temperature T served one chunk of token rows at a time:

* ``teacher_mode="target"``: y = softmax(t / T), optionally y = w e_c + (1 - w) y with the token c
  (``label_weight`` w), q = the configured reference. With KL this is KL(teacher || student): TRL's
  forward KL (``beta=0``).
* ``teacher_mode="reference"``: q = softmax(t / T) (mixed with uniform, floored), y = e_c: the
  student learns a correction to the teacher, and the predictor f-softargmax(theta; q_teacher)
  needs the teacher at inference.

:class:`TeacherLossMixin` plugs this into :class:`~hf_fdiv.trainers.mixin.FDivTrainerMixin`;
:func:`teacher_loss_inputs` is the loss spec itself, also called by the on-policy trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..losses import IGNORE_INDEX, check_target_ids
from ..solver import RowProvider
from . import checks
from .loss_path import LossInputs, output_rows
from .reference_constant import ReferenceConstant
from .teacher import TeacherLogProbs, common_vocab

__all__ = [
    "TEACHER_MODES",
    "TeacherModeArguments",
    "TeacherLossMixin",
    "teacher_loss_inputs",
    "teacher_card_fields",
    "reject_trl_beta",
]

TEACHER_MODES = ("target", "reference")
MODE_TEXT = {
    "target": "the teacher's distribution at temperature T is the target y (classic distillation); the student "
    "is a standalone model",
    "reference": "the teacher's distribution at temperature T is the reference measure q and the data labels are "
    "the targets: the student learns a correction to the teacher, and the predictor is "
    "f-softargmax(student logits; q_teacher), which needs the teacher at inference",
}


@dataclass
class TeacherModeArguments:
    """Config fields of the teacher's role in the loss, shared by the hf_fdiv distillation configs."""

    teacher_mode: str = field(
        default="target",
        metadata={"help": "'target': teacher probabilities are the target y (student usable alone). 'reference': "
                  "teacher probabilities are the reference measure q, data labels the target (student = correction)."},
    )
    label_weight: float = field(
        default=0.0, metadata={"help": "target mode: y = label_weight * one-hot(label) + (1 - label_weight) * teacher."}
    )
    reference_floor: float = field(
        default=1e-12,
        metadata={"help": "reference mode: q = max(q_teacher, floor), so that no target class has q = 0."},
    )
    reference_mix: float = field(
        default=0.0, metadata={"help": "reference mode: q = (1 - mix) * q_teacher + mix / V before the floor."}
    )

    def _validate_teacher_mode(self) -> None:
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {self.teacher_mode!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        for name in ("label_weight", "reference_mix"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if self.reference_floor < 0:
            raise ValueError(f"reference_floor must be >= 0, got {self.reference_floor}.")
        if self.label_weight > 0 and self.teacher_mode != "target":
            raise ValueError("label_weight mixes the data label into the target: it needs teacher_mode='target'.")


def reject_trl_beta(config) -> None:
    """TRL's ``beta`` mixes forward (0) and reverse (1) KL; an hf_fdiv trainer's loss is set by ``divergence``
    instead, so a ``beta`` other than 0 is refused rather than silently ignored."""
    if config.beta != 0.0:
        raise ValueError(
            f"beta={config.beta} selects TRL's forward/reverse-KL mix, which {type(config).__name__} replaces by "
            f"divergence={config.divergence!r}: set beta=0 (--beta 0) and choose the loss with --divergence (kl is "
            "TRL's beta=0); for TRL's reverse KL or JSD mix use the stock TRL trainer."
        )


def resolve_teacher(trainer_name: str, model, teacher_model, args):
    """The teacher a TRL distillation trainer gets: ``teacher_model`` or the config's
    ``teacher_model_name_or_path``, refused when neither is set; a student given as a model must be a causal LM.
    Runs before TRL's constructor, so that a wrong input stops before any model is loaded or generation starts."""
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(f"{trainer_name} needs a teacher: pass teacher_model= or set teacher_model_name_or_path.")
    if model is not None and not isinstance(model, str):
        checks.check_causal_lm(model, trainer_name)
    return teacher_model


def teacher_loss_inputs(targets: Tensor, teacher, args, divergence, reference, num_classes: int):
    """The :class:`LossInputs` of the distillation loss on the flattened token grid, and the
    :class:`ReferenceConstant` to log in reference mode (else None).

    ``targets``: [N] token ids with -100 ignored; ``teacher(rows)``: [n, V] teacher log-probabilities at
    the loss temperature for those rows; ``args``: a config with :class:`TeacherModeArguments`;
    ``reference``: q of target mode."""
    V = num_classes
    t = targets.reshape(-1)
    check_target_ids(t, V)  # before any teacher row is read by these ids
    rows = (t != IGNORE_INDEX).nonzero().squeeze(1)
    if args.teacher_mode == "target":
        lam = args.label_weight

        def target_rows(r):
            y = teacher(r).exp_()
            if lam > 0:
                y.mul_(1 - lam).scatter_add_(1, t[r][:, None], torch.full_like(y[:, :1], lam))
            return y

        return LossInputs(RowProvider(target_rows), reference, rows, t), None
    floor, mix = args.reference_floor, args.reference_mix
    constant = ReferenceConstant(divergence, t, rows)

    def reference_rows(r):
        q = teacher(r).exp_()
        if mix > 0:
            q.mul_(1 - mix).add_(mix / V)
        q = q.clamp_(min=floor) if floor > 0 else q
        constant.record(r, q)
        return q

    return LossInputs(t, RowProvider(reference_rows), rows, None), constant


def teacher_card_fields(args, description: str, temperature: float) -> dict:
    """The model card's teacher fields: which teacher, its role, the loss temperature."""
    fields = dict(teacher=description, teacher_mode=args.teacher_mode, teacher_mode_text=MODE_TEXT[args.teacher_mode],
                  temperature=temperature)
    if args.teacher_mode == "reference":
        fields["reference"] = (
            f"the teacher's probabilities at T = {temperature:g} (floor {args.reference_floor:g}"
            + (f", uniform mix {args.reference_mix:g}" if args.reference_mix else "")
            + ")"
        )
    return fields


def teacher_description(teacher) -> str:
    return getattr(teacher.config, "_name_or_path", "") or f"a `{type(teacher).__name__}` built in code"


class TeacherLossMixin:
    """The distillation loss spec for an :class:`~hf_fdiv.trainers.mixin.FDivTrainerMixin` trainer with a
    ``teacher_model`` (goes before the mixin in the bases). Subclasses may override
    :meth:`_fdiv_teacher_log_probs` (offline top-k) and :meth:`_fdiv_loss_temperature`."""

    #: classes shared by student and teacher (set by the trainer)
    num_classes: int
    _teacher_description = ""

    def _fdiv_setup_teacher_classes(self, teacher) -> None:
        """``num_classes`` and the card's teacher name, from the student and an (unprepared) teacher."""
        tokenizer = self.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        tok_len = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        student_rows = output_rows(self.accelerator.unwrap_model(self.model))
        self.num_classes = (student_rows if teacher is None
                            else common_vocab(student_rows, output_rows(teacher), tok_len))
        if teacher is not None:
            self._teacher_description = teacher_description(teacher)

    def _fdiv_loss_temperature(self) -> float:
        return float(self.args.temperature)

    def _fdiv_teacher_log_probs(self, inputs: dict):
        if self.teacher_model is None:
            raise ValueError("this batch has no teacher top-k columns and the trainer has no teacher model.")
        self.teacher_model.eval()  # accelerate's prepare_model leaves it in training mode
        model_inputs = {k: v for k, v in inputs.items() if k not in self._fdiv_batch_keys}
        return TeacherLogProbs(self.teacher_model, model_inputs, self.num_classes, self._fdiv_loss_temperature(),
                               out_device=inputs["input_ids"].device,
                               unwrapped=self.accelerator.unwrap_model(self.teacher_model))

    def fdiv_num_classes(self, vocab_rows: int) -> int:
        return self.num_classes

    def fdiv_loss_spec(self, targets: Tensor, inputs: dict, num_classes: int) -> LossInputs:
        spec, self._reference_constant = teacher_loss_inputs(
            targets, self._fdiv_teacher_log_probs(inputs), self.args, self.fdiv_divergence,
            self._fdiv_reference_for(targets.device), num_classes,
        )
        return spec

    def _record_fdiv_metrics(self, mode: str, sums: Tensor, inputs: dict) -> None:
        super()._record_fdiv_metrics(mode, sums, inputs)
        # reference mode: D_f(e_c, q_teacher), the part of the loss no student changes (`reference_constant`)
        constant, self._reference_constant = getattr(self, "_reference_constant", None), None
        if constant is not None:
            constant.log_to(self, mode)

    def fdiv_card_fields(self) -> dict:
        fields = super().fdiv_card_fields()
        fields.update(teacher_card_fields(self.args, self._teacher_description, self._fdiv_loss_temperature()))
        return fields

