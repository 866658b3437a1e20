"""``FDivOnPolicyDistillationTrainer``: TRL's on-policy ``DistillationTrainer`` with an f-divergence loss.

Everything TRL's trainer does is kept: the student generates the completions of each prompt
(transformers or vLLM, tool-calling loops, VLM inputs), once per gradient-accumulation window, the
teacher scores them, PEFT / FSDP2 / DeepSpeed engines, metrics. Only the loss changes. TRL's is a
generalised JSD between teacher and student next-token distributions (``beta``: 0 forward KL, 1
reverse KL); ours is the Fenchel-Young loss l_f(theta_student, y; q) of Roulet et al. (arXiv
2501.18537) on the same completion tokens, with the teacher as target y or as reference q
(:mod:`.teacher_loss`), fused with the LM head: the student's hidden states [tokens, H] are projected
one chunk of rows at a time, and the teacher's rows only when the chunk asks for them.

With ``divergence="kl"``, ``teacher_mode="target"``, ``temperature`` T: y = softmax(t / T) and
l_KL(theta / T, y) = KL(y || softmax(theta / T)), TRL's loss with ``beta=0`` (forward KL), hence the
same loss, gradients and updates. ``temperature`` keeps TRL's meaning (sampling, and both models'
logits in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from trl import DistillationConfig, DistillationTrainer

from ..fused import LogitTransform, fused_linear_fdiv_loss
from ..losses import IGNORE_INDEX
from . import checks
from .arguments import FDivLossArguments
from .loss_path import metric_sums, output_rows, text_config
from .mixin import FDivTrainerMixin
from .sft_trainer import card_fields, record_base_model
from .teacher import TeacherLogProbs, common_vocab
from .teacher_loss import (
    TeacherModeArguments,
    reject_trl_beta,
    resolve_teacher,
    teacher_card_fields,
    teacher_description,
    teacher_loss_inputs,
)

__all__ = ["FDivOnPolicyDistillationConfig", "FDivOnPolicyDistillationTrainer"]

# the multimodal fields TRL's generation step puts in a batch, passed on to both backbones
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class FDivOnPolicyDistillationConfig(TeacherModeArguments, FDivLossArguments, DistillationConfig):
    """``trl.DistillationConfig`` plus ``divergence`` (default ``alpha:1.5``), ``reference``,
    ``teacher_mode`` and the other loss fields; ``beta`` defaults to 0 (TRL: 1.0, reverse KL) and must
    stay 0, since ``divergence`` chooses the loss; ``bf16`` defaults to "auto"."""

    beta: float = field(
        default=0.0,
        metadata={"help": "TRL's forward/reverse KL mix; the f-divergence replaces it, so it must be 0."},
    )
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (default: on, as in TRL)."}
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under the non-deprecated name (as FDivSFTConfig)
        self._resolve_precision()
        super().__post_init__()
        self._validate_fdiv()
        self._validate_teacher_mode()
        reject_trl_beta(self)


def check_prompt_columns(dataset, name: str) -> None:
    """TRL's on-policy trainer reads a ``prompt`` column only: say so before any generation."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_prompt_columns(part, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{name} has columns {list(columns)} but on-policy distillation needs a 'prompt' column (text or chat "
            "messages) from which the student generates: rename the column, or use FDivDistillationTrainer for "
            "datasets with completions (text, prompt/completion, messages)."
        )


class FDivOnPolicyDistillationTrainer(FDivTrainerMixin, DistillationTrainer):
    """Drop-in ``trl.DistillationTrainer`` (same arguments, plus ``divergence=`` / ``reference=``)
    whose loss is l_f instead of TRL's generalised JSD; see the module docstring.

    Logs TRL's metrics (entropy of the student's predicted distribution, completion lengths,
    ``step_time``, ``num_tokens``) plus ``support_size`` (classes with nonzero predicted probability)
    and, in reference mode, ``reference_constant``. Bad input (``beta`` != 0, a teacher with another
    vocabulary, a dataset without ``prompt``) stops in the constructor, before any generation."""

    _tag_names = ["trl", "distillation", "hf-fdiv"]
    _name = "FDivOnPolicyDistillation"
    _fdiv_trainer_name = "FDivOnPolicyDistillationTrainer"

    def __init__(self, model: Any, teacher_model: Any = None, args: Optional[FDivOnPolicyDistillationConfig] = None,
                 train_dataset=None, eval_dataset=None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else (getattr(model.config, "_name_or_path", "") or "model")
            args = FDivOnPolicyDistillationConfig(f"{str(name).rstrip('/').split('/')[-1]}-{self._name}")
        if not isinstance(args, FDivOnPolicyDistillationConfig):
            raise ValueError(f"{type(self).__name__} needs args=FDivOnPolicyDistillationConfig(...), got "
                             f"{type(args).__name__}: its beta and loss fields are what this trainer reads.")
        teacher_model = resolve_teacher(type(self).__name__, model, teacher_model, args)
        check_prompt_columns(train_dataset, "train_dataset")
        check_prompt_columns(eval_dataset, "eval_dataset")
        super().__init__(model, teacher_model, args, train_dataset, eval_dataset, *pos, **kwargs)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.num_classes = common_vocab(output_rows(self.accelerator.unwrap_model(self.model)),
                                        output_rows(unwrapped_teacher), len(self._tokenizer))
        self._teacher_description = teacher_description(unwrapped_teacher)
        self._fdiv_pending = None
        record_base_model(self)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([f"teacher-{args.teacher_mode}"])

    def init_hf_repo(self, *args, **kwargs) -> None:
        checks.init_hub_repo(self, super().init_hf_repo, *args, **kwargs)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's compute_loss: the generated-token count, the engine redirection around _compute_loss, entropy
        result = DistillationTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        self._record_on_policy_metrics("train" if self.model.training else "eval")
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The f-divergence loss of one micro-batch of generated completions (runs inside the student
        wrapper's forward, as TRL's does). Returns (loss, student entropy sum, rows counted)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool outputs inside a completion are not the student's tokens
            loss_mask = loss_mask * inputs["tool_mask"]
        completion_len = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        # [B, K, H]: position k predicts completion token k (TRL's shift)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completion_len,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher, input_ids,
                attention_mask, completion_len, **multimodal,
            )
        head = unwrapped_student.get_output_embeddings()
        device = head.weight.device
        T = float(self.args.temperature)
        V = self.num_classes
        teacher = TeacherLogProbs.from_hidden(teacher_hidden.to(device), unwrapped_teacher.get_output_embeddings(),
                                              text_config(unwrapped_teacher.config), V, T)
        targets = inputs["completion_ids"].to(device).masked_fill(loss_mask.to(device) == 0, IGNORE_INDEX)
        spec, constant = teacher_loss_inputs(targets, teacher, self.args, self.fdiv_divergence,
                                             self._fdiv_reference_for(device), V)
        # TRL divides both models' logits by T after scale and soft-cap: s * tanh(a z / s) / T is the
        # same map with a / T and s / T
        base = LogitTransform.from_config(text_config(unwrapped_student.config))
        transform = LogitTransform(base.scale / T, base.softcap / T if base.softcap else None)
        weight, bias = head.weight, getattr(head, "bias", None)
        if hasattr(weight, "full_tensor"):  # FSDP2: gather the head once per batch (its backward reduces it)
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        if weight.shape[0] != V:
            weight, bias = weight[:V], (bias[:V] if bias is not None else None)
        hidden = student_hidden.to(device)
        loss_sum, stats = fused_linear_fdiv_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, spec.target, self.fdiv_divergence, spec.reference, bias=bias,
            transform=transform, max_iter=self.fdiv_max_iter, rows=spec.rows, skip_nonfinite=self.fdiv_skip_nonfinite,
            return_stats=True,
        )
        sums = metric_sums(stats, None)
        self._fdiv_pending = (sums, constant)  # logged after the forward returns (no collective inside it)
        count = sums[3]
        if num_items_in_batch is None:
            loss = loss_sum / count.clamp(min=1).to(loss_sum.dtype)
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
        return loss, sums[1].to(loss_sum.dtype), count

    def _record_on_policy_metrics(self, mode: str) -> None:
        pending, self._fdiv_pending = self._fdiv_pending, None
        if pending is None:
            return
        sums, constant = pending
        local = sums.to(self.accelerator.device)[None]
        total = self.accelerator.gather_for_metrics(local).reshape(-1, sums.numel()).sum(0)
        support, _, _, count, nonfinite = total.tolist()
        if count > 0:
            self._metrics[mode]["support_size"].append(support / count)
        if self.fdiv_skip_nonfinite:
            self._total_nonfinite += int(nonfinite)
            self._metrics[mode]["nonfinite_rows"] = [self._total_nonfinite]
        if constant is not None:
            constant.log_to(self, mode)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        DistillationTrainer.log(self, logs, start_time)  # TRL's: NaN-filtered means, completion tables

    # ------------------------------------------------------------------ card
    def fdiv_card_fields(self) -> dict:
        fields = card_fields(self, super().fdiv_card_fields())
        fields.update(teacher_card_fields(self.args, self._teacher_description, float(self.args.temperature)))
        return fields
