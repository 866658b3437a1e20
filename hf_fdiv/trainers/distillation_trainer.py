"""``FDivDistillationTrainer``: distil a teacher into a student with an f-divergence loss.

Two modes (``docs/math.md``, "Distillation"), with teacher log-probabilities t at temperature T:

* ``teacher_mode="target"`` (default, classic distillation): y = softmax(t / T), optionally mixed with
  the data label, y = label_weight * e_c + (1 - label_weight) * y, and q = ``reference``; the loss
  is l_f(theta_student, y; q), gradient f-softargmax(theta_student; q) - y. The student alone
  predicts f-softargmax(theta_student; q): it can be used and pushed without the teacher.
* ``teacher_mode="reference"``: q = softmax(t / T) (floored at ``reference_floor`` and optionally mixed
  with uniform), y = the data label; the loss is l_f(theta_student, e_c; q_teacher). With KL this is
  cross-entropy on theta_student + log q_teacher: **the student learns a correction to the teacher**,
  and the model it predicts is the combination f-softargmax(theta_student; q_teacher), which needs the
  teacher at inference (decode with the teacher's reference). The student's logits alone are not a
  language model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ..losses import check_target_ids
from ..solver import RowProvider
from .mixin import IGNORE_INDEX, LossInputs
from .reference_constant import ReferenceConstant
from .sft_trainer import FDivSFTConfig, FDivSFTTrainer
from .teacher import TOPK_IDS, TOPK_LOGPROBS, TeacherLogProbs, TopKLogProbs, common_vocab, load_teacher, prepare_teacher
from .loss_path import output_rows, virtual_tokens
from .teacher import pad_topk

TEACHER_MODES = ("target", "reference")
_MODE_TEXT = {
    "target": "the teacher's distribution at temperature T is the target y (classic distillation); the student "
    "is a standalone model",
    "reference": "the teacher's distribution at temperature T is the reference measure q and the data labels are "
    "the targets: the student learns a correction to the teacher, and the predictor is "
    "f-softargmax(student logits; q_teacher), which needs the teacher at inference",
}


@dataclass
class FDivDistillationConfig(FDivSFTConfig):
    """``FDivSFTConfig`` plus the teacher and the distillation mode."""

    teacher_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Teacher name or path, when `teacher_model` is not passed to the trainer."}
    )
    teacher_model_init_kwargs: Optional[dict] = field(
        default=None, metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained of the teacher."}
    )
    teacher_mode: str = field(
        default="target",
        metadata={"help": "'target': teacher probabilities are the target y (student usable alone). 'reference': "
                  "teacher probabilities are the reference measure q, data labels the target (student = correction)."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Teacher temperature T (teacher logits / T)."})
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
    lmbda: float = field(
        default=0.0,
        metadata={"help": "On-policy fraction: probability that an optimizer step trains on completions the student "
                  "generates from the prompts (the teacher scores them), as in GKD."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Completion length for on-policy generation."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature on-policy."})

    _VALID_DICT_FIELDS = FDivSFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {self.teacher_mode!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        for name in ("label_weight", "reference_mix", "lmbda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if self.reference_floor < 0:
            raise ValueError(f"reference_floor must be >= 0, got {self.reference_floor}.")
        if self.label_weight > 0 and self.teacher_mode != "target":
            raise ValueError("label_weight mixes the data label into the target: it needs teacher_mode='target'.")


class FDivDistillationTrainer(FDivSFTTrainer):
    """Distillation with an f-divergence loss, on FDivSFTTrainer's data formats (text,
    prompt/completion, messages). See the module docstring for what each ``teacher_mode`` means.

    The teacher (``teacher_model=`` object or name, or the config's ``teacher_model_name_or_path``)
    runs in eval mode under no_grad, prepared by accelerate for evaluation; its hidden size and depth
    may differ from the student's, its vocabulary may differ only by padding rows. Its logits are
    projected one chunk of tokens at a time. Without a teacher, the train dataset must carry the
    columns written by :func:`hf_fdiv.add_teacher_topk` (offline teacher).
    """

    _tag_names = ["trl", "distillation", "hf-fdiv"]
    _name = "FDivDistillation"
    _fdiv_trainer_name = "FDivDistillationTrainer"
    _fdiv_batch_keys = ("labels", "shift_labels", TOPK_IDS, TOPK_LOGPROBS)

    def __init__(self, model=None, teacher_model: Any = None, args: Optional[FDivDistillationConfig] = None, **kwargs):
        if args is None or not isinstance(args, FDivDistillationConfig):
            raise ValueError("FDivDistillationTrainer needs args=FDivDistillationConfig(...).")
        args.remove_unused_columns = False  # keep the offline teacher columns
        train_dataset = kwargs.get("train_dataset")
        self._offline = train_dataset is not None and TOPK_IDS in getattr(train_dataset, "column_names", [])
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None and not self._offline:
            raise ValueError(
                "FDivDistillationTrainer needs a teacher: pass teacher_model=, set teacher_model_name_or_path, or "
                "pass a train dataset with teacher top-k columns (hf_fdiv.add_teacher_topk)."
            )
        if self._offline and (args.lmbda > 0 or args.padding_free or args.packing):
            raise ValueError("the offline top-k teacher supports neither on-policy generation (lmbda) nor packing/padding-free.")
        if args.lmbda > 0 and (args.padding_free or args.packing):
            raise ValueError("on-policy generation (lmbda > 0) needs padded batches: disable packing/padding_free.")
        teacher = load_teacher(teacher_model, args.teacher_model_init_kwargs)
        super().__init__(model=model, args=args, **kwargs)
        tokenizer = self.processing_class
        tok_len = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        if virtual_tokens(self.accelerator.unwrap_model(self.model)):
            raise ValueError(
                "FDivDistillationTrainer does not support prompt-learning adapters (prompt tuning, P-tuning): the "
                "student's virtual tokens have no teacher counterpart. Use a weight-based adapter such as LoRA, or "
                "train the prompt with FDivSFTTrainer."
            )
        student_rows = output_rows(self.accelerator.unwrap_model(self.model))
        self.num_classes = student_rows
        self.teacher_model = None
        self._teacher_description = "stored top-k log-probabilities (offline teacher)"
        if teacher is not None:
            self.num_classes = common_vocab(student_rows, output_rows(teacher), tok_len)
            name = getattr(teacher.config, "_name_or_path", "") or f"a `{type(teacher).__name__}` built in code"
            self._teacher_description = name
            self.teacher_model = prepare_teacher(teacher, self.accelerator)
            self.teacher_model.eval()  # prepare_model leaves it in training mode
        if self._offline:
            base = self.data_collator
            self.data_collator = _TopKCollator(base)
        self._policy_rng = random.Random(args.seed)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([f"teacher-{args.teacher_mode}"])

    # ------------------------------------------------------------------ loss
    def _teacher_log_probs(self, inputs: dict):
        T = self.args.temperature
        if TOPK_IDS in inputs:
            return TopKLogProbs(inputs[TOPK_IDS], inputs[TOPK_LOGPROBS], self.num_classes, T)
        if self.teacher_model is None:
            raise ValueError("this batch has no teacher top-k columns and the trainer has no teacher model.")
        model_inputs = {k: v for k, v in inputs.items() if k not in self._fdiv_batch_keys}
        return TeacherLogProbs(self.teacher_model, model_inputs, self.num_classes, T, out_device=inputs["input_ids"].device,
                               unwrapped=self.accelerator.unwrap_model(self.teacher_model))

    def fdiv_num_classes(self, vocab_rows: int) -> int:
        return self.num_classes

    def fdiv_loss_spec(self, targets: Tensor, inputs: dict, num_classes: int) -> LossInputs:
        args = self.args
        V = num_classes
        t = targets.reshape(-1)
        check_target_ids(t, V)  # before any teacher row is read by these ids
        rows = (t != IGNORE_INDEX).nonzero().squeeze(1)
        teacher = self._teacher_log_probs(inputs)
        if args.teacher_mode == "target":
            lam = args.label_weight

            def target_rows(r):
                y = teacher(r).exp_()
                if lam > 0:
                    y.mul_(1 - lam).scatter_add_(1, t[r][:, None], torch.full_like(y[:, :1], lam))
                return y

            return LossInputs(RowProvider(target_rows), self._fdiv_reference_for(t.device), rows, t)
        floor, mix = args.reference_floor, args.reference_mix
        constant = self._reference_constant = ReferenceConstant(self.fdiv_divergence, t, rows)  # logged, see below

        def reference_rows(r):
            q = teacher(r).exp_()
            if mix > 0:
                q.mul_(1 - mix).add_(mix / V)
            q = q.clamp_(min=floor) if floor > 0 else q
            constant.record(r, q)
            return q

        return LossInputs(t, RowProvider(reference_rows), rows, None)

    def _record_fdiv_metrics(self, mode: str, sums: Tensor, inputs: dict) -> None:
        super()._record_fdiv_metrics(mode, sums, inputs)
        # reference mode: D_f(e_c, q_teacher), the part of the loss no student changes (`reference_constant`)
        constant, self._reference_constant = getattr(self, "_reference_constant", None), None
        if constant is not None:
            constant.log_to(self, mode)

    # ------------------------------------------------------------------ on-policy
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        # (get_batch_samples is only called by the training loop, once per optimizer step)
        if self.args.lmbda > 0 and batch_samples and self._policy_rng.random() < self.args.lmbda:
            batch_samples = [self._generate_on_policy(b) for b in batch_samples]
            # The student's completions replace the data: recount the targets of the whole window.
            num_items = self._get_num_items_in_batch(batch_samples, device)
        return batch_samples, num_items

    def _generate_on_policy(self, batch: dict) -> dict:
        """Replace each completion by one the student samples from the same prompt."""
        tok = self.processing_class
        labels, ids = batch["labels"], batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        prompts = []
        for i in range(ids.shape[0]):
            target = (labels[i] != IGNORE_INDEX).nonzero()
            n = int(mask[i].sum())
            start = int(target[0]) if len(target) else n
            prompts.append(ids[i, : max(1, start)].tolist())
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        L = max(len(p) for p in prompts)
        p_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
        p_mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding for generation
            p_ids[i, L - len(p):] = torch.tensor(p)
            p_mask[i, L - len(p):] = 1
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=p_ids.to(model.device), attention_mask=p_mask.to(model.device),
                max_new_tokens=self.args.max_new_tokens, do_sample=True, temperature=self.args.generation_temperature,
                top_k=0, top_p=1.0, pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
            )
        model.train(was_training)
        features = []
        for i, p in enumerate(prompts):
            completion = out[i, L:].tolist()
            if tok.eos_token_id in completion:
                completion = completion[: completion.index(tok.eos_token_id) + 1]
            features.append({"input_ids": p + completion, "labels": [IGNORE_INDEX] * len(p) + completion})
        collator = self.data_collator.base if isinstance(self.data_collator, _TopKCollator) else self.data_collator
        new = collator(features)
        return {k: v.to(ids.device) if torch.is_tensor(v) else v for k, v in new.items()}

    # ------------------------------------------------------------------ card
    def fdiv_card_fields(self) -> dict:
        fields = super().fdiv_card_fields()
        fields.update(
            teacher=self._teacher_description,
            teacher_mode=self.args.teacher_mode,
            teacher_mode_text=_MODE_TEXT[self.args.teacher_mode],
            temperature=self.args.temperature,
        )
        if self.args.teacher_mode == "reference":
            fields["reference"] = (
                f"the teacher's probabilities at T = {self.args.temperature:g} (floor {self.args.reference_floor:g}"
                + (f", uniform mix {self.args.reference_mix:g}" if self.args.reference_mix else "")
                + ")"
            )
        return fields


class _TopKCollator:
    """Wraps the SFT collator: pads the stored teacher top-k columns to the batch length."""

    def __init__(self, base):
        self.base = base

    def __call__(self, features: list) -> dict:
        plain = [{k: v for k, v in f.items() if k not in (TOPK_IDS, TOPK_LOGPROBS)} for f in features]
        batch = self.base(plain)
        length = batch["input_ids"].shape[-1]
        batch[TOPK_IDS] = pad_topk(features, TOPK_IDS, length, 0)
        batch[TOPK_LOGPROBS] = pad_topk(features, TOPK_LOGPROBS, length, float("-inf"))
        return batch
