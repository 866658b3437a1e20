"""``FDivSFTTrainer``: TRL's ``SFTTrainer`` trained with an f-divergence Fenchel-Young loss."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig, SFTTrainer

from . import checks, model_card
from .mixin import FDivLossArguments, FDivTrainerMixin

_SFT_SIGNATURE = inspect.signature(SFTTrainer.__init__)


@dataclass
class FDivSFTConfig(FDivLossArguments, SFTConfig):
    """``SFTConfig`` plus ``divergence``, ``reference``, ``fdiv_max_iter``, ``fdiv_fused``,
    ``fdiv_skip_nonfinite`` and ``base_model_id``; ``bf16`` defaults to "auto".

    Activation checkpointing stays on by default as in TRL, under its current name
    (``activation_checkpointing``), so that no deprecation warning is raised for an option the user
    never set; ``gradient_checkpointing`` still works as TRL's deprecated alias."""

    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (default: on, as in TRL)."}
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, set under the non-deprecated name
        self._resolve_precision()
        super().__post_init__()
        self._validate_fdiv()


def record_base_model(trainer) -> None:
    """Write the base model's Hub id into every PEFT adapter config (``adapter_config.json``'s
    ``base_model_name_or_path``), instead of the local path it was loaded from, when the id is known."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "peft_config"):
        return
    hub_id, _, is_peft = model_card.base_model_of(model, getattr(trainer.args, "base_model_id", None))
    if is_peft and hub_id is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = hub_id


def card_fields(trainer, fields: dict) -> dict:
    """What every hf_fdiv card needs beyond the loss: the base model's Hub id, the teacher's, whether the
    tokenizer has a chat template (for the quick start)."""
    fields = dict(fields)
    fields["base_model_id"] = getattr(trainer.args, "base_model_id", None)
    teacher = getattr(trainer, "teacher_model", None)
    teacher_id = getattr(trainer, "teacher_hub_id", None)
    if teacher_id is None and teacher is not None:
        unwrapped = trainer.accelerator.unwrap_model(teacher)
        teacher_id = model_card.hub_id_of(getattr(unwrapped, "name_or_path", None)) or model_card.hub_id_of(
            getattr(getattr(unwrapped, "config", None), "_name_or_path", None))
    if teacher is not None or teacher_id is not None:
        fields["teacher_hub_id"] = teacher_id
    if hasattr(trainer.args, "reference_floor"):
        fields["reference_floor"] = trainer.args.reference_floor
    tok = trainer.processing_class
    tok = getattr(tok, "tokenizer", tok)
    fields["chat_template"] = bool(getattr(tok, "chat_template", None))
    return fields


class FDivSFTTrainer(FDivTrainerMixin, SFTTrainer):
    """Drop-in ``trl.SFTTrainer`` whose loss is l_f instead of the token NLL.

    Keeps SFTTrainer's dataset preparation (text, prompt/completion, messages), completion-only and
    assistant-only masks, packing and padding-free batches (no target crosses a document boundary:
    TRL's collator masks the first token of each document), ``peft_config``, model tags and cards.
    The model is called without SFT's fused NLL head: the f-softargmax needs the logits.

    Before TRL prepares anything it checks that the model is a causal LM and that the datasets are in
    a format SFT prepares, and with ``push_to_hub`` that the Hub is reachable (clear errors, nothing
    trained). Without ``args`` it uses ``FDivSFTConfig`` (bf16 "auto"), not TRL's ``SFTConfig``.
    """

    _tag_names = ["trl", "sft", "hf-fdiv"]
    _name = "FDivSFT"
    _fdiv_trainer_name = "FDivSFTTrainer"

    def __init__(self, *args, **kwargs):
        fdiv_kwargs = {k: kwargs.pop(k) for k in ("divergence", "reference") if k in kwargs}
        bound = _SFT_SIGNATURE.bind_partial(self, *args, **kwargs).arguments
        model, config = bound.get("model"), bound.get("args")
        if config is None and model is not None:
            # TRL would build SFTConfig(bf16=True), which fails on a machine without a GPU.
            name = model if isinstance(model, str) else (getattr(getattr(model, "config", None), "_name_or_path", "")
                                                          or type(model).__name__)
            config = FDivSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-{self._name}")
            bound["args"] = config
        if model is not None and not isinstance(model, str):
            checks.check_causal_lm(model, type(self).__name__)
        formatting_func = bound.get("formatting_func")
        checks.check_sft_columns(bound.get("train_dataset"), config, "train_dataset", formatting_func)
        checks.check_sft_columns(bound.get("eval_dataset"), config, "eval_dataset", formatting_func)
        bound.pop("self")
        with warnings.catch_warnings():
            # PEFT and TRL read the deprecated `is_gradient_checkpointing` property while wrapping the model:
            # a warning about their internals that the user can do nothing about.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            super().__init__(**bound, **fdiv_kwargs)
        record_base_model(self)

    def init_hf_repo(self, *args, **kwargs) -> None:
        checks.init_hub_repo(self, super().init_hf_repo, *args, **kwargs)

    def fdiv_card_fields(self) -> dict:
        return card_fields(self, super().fdiv_card_fields())
