"""``FDivGKDTrainer``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with an f-divergence loss.

GKD keeps its data path and its generation (``lmbda``: probability that a micro-batch's completions
are sampled from the student, ``seq_kd``: else from the teacher, ``temperature`` for sampling; TRL
computes the loss at temperature 1, and so do we). The loss is the Fenchel-Young loss of
:mod:`.teacher_loss` (teacher as target y or as reference q), through the fused LM-head path of
:mod:`.loss_path` instead of GKD's full [B, T, V] logits of both models. With ``divergence="kl"`` and
``teacher_mode="target"`` it is KL(teacher || student) per token, GKD's ``beta=0``.

The token count of a gradient-accumulation window is the one the Trainer passes
(``num_items_in_batch``, counted before any generation, as for the stock GKD loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from trl.experimental.gkd import GKDConfig, GKDTrainer

from . import checks
from .mixin import FDivTrainerMixin
from .sft_trainer import FDivSFTConfig, card_fields, record_base_model
from .teacher_loss import TeacherLossMixin, TeacherModeArguments, reject_trl_beta, resolve_teacher

__all__ = ["FDivGKDConfig", "FDivGKDTrainer"]


@dataclass
class FDivGKDConfig(TeacherModeArguments, FDivSFTConfig, GKDConfig):
    """``trl.experimental.gkd.GKDConfig`` plus the f-divergence loss fields (``divergence``, default
    ``alpha:1.5``; ``reference``; ``teacher_mode`` ...); ``beta`` defaults to 0 (TRL: 0.5) and must stay 0."""

    beta: float = field(
        default=0.0,
        metadata={"help": "TRL's generalised-JSD mix; the f-divergence replaces it, so it must be 0."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_teacher_mode()
        reject_trl_beta(self)


class FDivGKDTrainer(TeacherLossMixin, FDivTrainerMixin, GKDTrainer):
    """Drop-in ``GKDTrainer`` (same arguments, plus ``divergence=`` / ``reference=``) whose loss is l_f
    with the teacher's distribution; see the module docstring."""

    _tag_names = ["trl", "gkd", "hf-fdiv"]
    _name = "FDivGKD"
    _fdiv_trainer_name = "FDivGKDTrainer"
    # DataCollatorForChatML's prompt columns feed generation, not the forward
    _fdiv_batch_keys = ("labels", "shift_labels", "prompts", "prompt_attention_mask")

    def __init__(self, model: Any = None, teacher_model: Any = None, args: Optional[FDivGKDConfig] = None, *pos,
                 **kwargs):
        if not isinstance(args, FDivGKDConfig):
            raise ValueError(f"{type(self).__name__} needs args=FDivGKDConfig(...), got {type(args).__name__}.")
        teacher_model = resolve_teacher(type(self).__name__, model, teacher_model, args)
        super().__init__(model, teacher_model, args, *pos, **kwargs)
        self._fdiv_setup_teacher_classes(self.accelerator.unwrap_model(self.teacher_model))
        record_base_model(self)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([f"teacher-{args.teacher_mode}"])

    def init_hf_repo(self, *args, **kwargs) -> None:
        checks.init_hub_repo(self, super().init_hf_repo, *args, **kwargs)

    def _fdiv_loss_temperature(self) -> float:
        return 1.0  # GKD's temperature is for sampling only

    def fdiv_card_fields(self) -> dict:
        return card_fields(self, super().fdiv_card_fields())
