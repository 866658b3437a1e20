"""``FDivSFTTrainer``: TRL's ``SFTTrainer`` trained with an f-divergence Fenchel-Young loss."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .mixin import FDivLossArguments, FDivTrainerMixin


@dataclass
class FDivSFTConfig(FDivLossArguments, SFTConfig):
    """``SFTConfig`` plus ``divergence``, ``reference`` and ``fdiv_max_iter``."""

    def __post_init__(self):
        super().__post_init__()
        self._validate_fdiv()


class FDivSFTTrainer(FDivTrainerMixin, SFTTrainer):
    """Drop-in ``trl.SFTTrainer`` whose loss is l_f instead of the token NLL.

    Keeps SFTTrainer's dataset preparation (text, prompt/completion, messages), completion-only and
    assistant-only masks, packing and padding-free batches (no target crosses a document boundary:
    TRL's collator masks the first token of each document), ``peft_config``, model tags and cards.
    The model is called without SFT's fused NLL head: the f-softargmax needs the logits.
    """

    _tag_names = ["trl", "sft", "hf-fdiv"]
    _name = "FDivSFT"
    _fdiv_trainer_name = "FDivSFTTrainer"
