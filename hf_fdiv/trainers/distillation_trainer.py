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

from .mixin import IGNORE_INDEX
from .sft_trainer import FDivSFTConfig, FDivSFTTrainer
from .teacher import TOPK_IDS, TOPK_LOGPROBS, TopKLogProbs, load_teacher, prepare_teacher
from .teacher_loss import TeacherLossMixin, TeacherModeArguments
from .loss_path import virtual_tokens
from .teacher import pad_topk


@dataclass
class FDivDistillationConfig(TeacherModeArguments, FDivSFTConfig):
    """``FDivSFTConfig`` plus the teacher and the distillation mode (:class:`TeacherModeArguments`)."""

    teacher_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Teacher name or path, when `teacher_model` is not passed to the trainer."}
    )
    teacher_model_init_kwargs: Optional[dict] = field(
        default=None, metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained of the teacher."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Teacher temperature T (teacher logits / T)."})
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
        self._validate_teacher_mode()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}.")


class FDivDistillationTrainer(TeacherLossMixin, FDivSFTTrainer):
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
        if virtual_tokens(self.accelerator.unwrap_model(self.model)):
            raise ValueError(
                "FDivDistillationTrainer does not support prompt-learning adapters (prompt tuning, P-tuning): the "
                "student's virtual tokens have no teacher counterpart. Use a weight-based adapter such as LoRA, or "
                "train the prompt with FDivSFTTrainer."
            )
        self.teacher_model = None
        self._teacher_description = "stored top-k log-probabilities (offline teacher)"
        self._fdiv_setup_teacher_classes(teacher)
        if teacher is not None:
            self.teacher_model = prepare_teacher(teacher, self.accelerator)
            self.teacher_model.eval()  # prepare_model leaves it in training mode
        if self._offline:
            base = self.data_collator
            self.data_collator = _TopKCollator(base)
        self._policy_rng = random.Random(args.seed)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([f"teacher-{args.teacher_mode}"])

    # ------------------------------------------------------------------ loss
    def _fdiv_teacher_log_probs(self, inputs: dict):
        if TOPK_IDS in inputs:
            return TopKLogProbs(inputs[TOPK_IDS], inputs[TOPK_LOGPROBS], self.num_classes, self.args.temperature)
        return super()._fdiv_teacher_log_probs(inputs)

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
