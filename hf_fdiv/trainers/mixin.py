"""The trainer glue shared by every hf_fdiv trainer (one place, like TRL's trainers share a base).

:class:`FDivTrainerMixin` goes first in the bases of a ``transformers.Trainer`` subclass and provides
``compute_loss`` (shifted labels, the gradient-accumulation contract of ``num_items_in_batch``; the
loss itself is :mod:`.loss_path`), the metrics, and the model card. The config fields live in
:mod:`.arguments`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..divergences import FDivergence, get_divergence
from ..losses import IGNORE_INDEX
from ..solver import NonFiniteLogitsError
from . import model_card
from .arguments import LABEL_PRIOR, FDivLossArguments, load_reference
from .loss_path import (
    METRIC_KEYS,
    LossInputs,
    LossSettings,
    align_to_virtual_tokens,
    fdiv_token_loss,
    fused_head,
    fused_head_input,
    output_rows,
    text_config,
)
from .tasks import TaskConvention, label_prior, task_of

__all__ = ["FDivLossArguments", "FDivTrainerMixin", "LossInputs", "IGNORE_INDEX"]


def _output(outputs, key: str):
    if isinstance(outputs, dict):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _input_tokens(inputs: dict) -> Tensor:
    """The batch's input tokens, as TRL's SFT counts them for ``num_tokens`` (0-d, on the batch's device);
    a batch without tokens (images, audio) counts its examples."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "position_ids" in inputs:  # padding-free batches carry no attention mask
        return torch.tensor(inputs["position_ids"].numel(), device=inputs["position_ids"].device)
    if "input_ids" in inputs:
        return torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
    first = next(v for v in inputs.values() if isinstance(v, Tensor))
    return torch.tensor(first.shape[0], device=first.device)


class FDivTrainerMixin:
    """Shared ``compute_loss`` / metrics / model card for f-divergence trainers.

    Put it first: ``class MyTrainer(FDivTrainerMixin, transformers.Trainer)``. Extra constructor
    keywords ``divergence=`` and ``reference=`` (a spec, ``"unit"``/``"uniform"`` or a [V] tensor)
    override the config; a plain ``TrainingArguments``/``SFTConfig`` works with the defaults
    (``alpha:1.5``, unit reference).

    The loss of a micro-batch is sum_tokens l_f / ``num_items_in_batch`` (the token count of the
    whole gradient-accumulation window, across devices), and bs x GA splits give the same update. When
    the Trainer gives no count, the loss is the micro-batch mean and the Trainer divides it by the
    accumulation steps, as for the stock loss: ``loss_is_scaled_for_ga`` says which, call by call.
    Labels are aligned with ``input_ids`` (-100 = ignored) and shifted here exactly like
    transformers' ``ForCausalLMLoss``.
    """

    #: set by every compute_loss: True when the loss was divided by ``num_items_in_batch``
    loss_is_scaled_for_ga = True
    _fdiv_trainer_name = "FDivTrainer"
    #: batch keys that are loss inputs, not model inputs
    _fdiv_batch_keys: tuple = ("labels", "shift_labels")

    def __init__(self, *args, divergence: Any = None, reference: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_fdiv(divergence, reference)

    # ------------------------------------------------------------------ setup
    def _setup_fdiv(self, divergence, reference) -> None:
        args = self.args
        spec = divergence if divergence is not None else getattr(args, "divergence", "alpha:1.5")
        #: how the model's stock loss lines targets up with logits (see .tasks)
        self.fdiv_task: TaskConvention = task_of(self.accelerator.unwrap_model(self.model), type(self).__name__)
        self.fdiv_divergence: FDivergence = get_divergence(spec)
        ref = reference if reference is not None else getattr(args, "reference", "unit")
        self.fdiv_reference = load_reference(ref)
        self._fdiv_prior_text = None
        if isinstance(self.fdiv_reference, str) and self.fdiv_reference.strip().lower() == LABEL_PRIOR:
            self.fdiv_reference = self._count_label_prior(float(getattr(args, "label_prior_smoothing", 1.0)))
        self._check_reference_size()
        self.fdiv_max_iter = getattr(args, "fdiv_max_iter", None)
        self.fdiv_fused = bool(getattr(args, "fdiv_fused", True))
        self.fdiv_skip_nonfinite = bool(getattr(args, "fdiv_skip_nonfinite", False))
        self._total_nonfinite = 0
        if not hasattr(self, "_metrics"):
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if not hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = 0
        # We compute the loss ourselves, so make the Trainer count num_items_in_batch whatever the
        # model's forward signature, over labels[..., 1:] for causal LMs.
        self.model_accepts_loss_kwargs = True
        self._fdiv_shift_labels = self.fdiv_task.shift
        self._loss_shifts_labels = self._fdiv_shift_labels
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(["hf-fdiv", f"fdiv-{self.fdiv_divergence.name.replace(':', '-')}"])

    def _count_label_prior(self, smoothing: float) -> Tensor:
        """reference='label_prior': one pass over the training batches (no model), counting the targets the loss
        will see; the random state is restored, so the run draws what it would with another reference."""
        if self.train_dataset is None:
            raise ValueError("reference='label_prior' counts the training labels, but no train_dataset was given: pass "
                             "one, or a [C] prior tensor / file as reference.")
        if self.fdiv_task.kind == "question_answering":
            raise ValueError("reference='label_prior' is a prior over classes, but the classes of question answering "
                             "are the positions of each input: use reference='unit' or 'uniform'.")
        C = self.fdiv_task.num_classes or output_rows(self.accelerator.unwrap_model(self.model))
        with torch.random.fork_rng(devices=[]):
            prior, total = label_prior(self.get_train_dataloader(), self.fdiv_task, C, smoothing,
                                       reduce=lambda c: self.accelerator.reduce(c.to(self.accelerator.device),
                                                                                "sum").cpu())
        if total == 0:
            raise ValueError("reference='label_prior': the training data has no labelled target to count.")
        self._fdiv_prior_text = (
            f"label prior: class frequencies of the {total} training targets over {C} classes with pseudo-count "
            f"{smoothing:g} (q_c = (n_c + {smoothing:g}) / (N + C x {smoothing:g}); min q = {float(prior.min()):.4g}, "
            f"max q = {float(prior.max()):.4g}), saved as reference.pt"
        )
        return prior

    def _check_reference_size(self) -> None:
        ref = self.fdiv_reference
        if not isinstance(ref, Tensor):
            return
        if self.fdiv_task.kind == "question_answering":
            raise ValueError("a reference tensor is a prior over classes, but the classes of question answering are "
                             "the positions of each input: use reference='unit' or 'uniform'.")
        V = self.fdiv_task.num_classes or output_rows(self.accelerator.unwrap_model(self.model))
        if ref.dim() != 1 or ref.shape[0] != V:
            raise ValueError(
                f"reference tensor has shape {tuple(ref.shape)} but the model has V={V} output classes: pass a [V] "
                "class prior (per-token references come from a teacher, see FDivDistillationTrainer)."
            )

    # ------------------------------------------------------------------ loss
    def _fdiv_targets(self, inputs: dict, unwrapped=None) -> Tensor:
        """The target of every output position. A prompt-learning adapter's virtual tokens come first:
        their labels are -100 (the last one predicts the first real token), as in PEFT's own forward.
        Other kinds of models: see :meth:`.tasks.TaskConvention.targets`."""
        if not self.fdiv_task.shift:
            return self.fdiv_task.targets(inputs)
        if "shift_labels" in inputs:
            return align_to_virtual_tokens(inputs["shift_labels"], unwrapped)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                f"{type(self).__name__} needs `labels` in every batch (use a causal-LM collator such as "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False), or TRL's dataset preparation)."
            )
        labels = align_to_virtual_tokens(labels, unwrapped)
        if not self._fdiv_shift_labels:
            return labels
        return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]

    def _fdiv_reference_for(self, device):
        ref = self.fdiv_reference
        if isinstance(ref, Tensor) and ref.device != torch.device(device):
            ref = ref.to(device)
            self.fdiv_reference = ref
        return ref

    def fdiv_num_classes(self, vocab_rows: int) -> int:
        """Classes the loss is over (distillation: the part shared with the teacher)."""
        return vocab_rows

    def fdiv_loss_spec(self, targets: Tensor, inputs: dict, num_classes: int) -> LossInputs:
        """What to fit on the flattened token grid: the specialisation point of the trainers.

        Default: class ids with -100 ignored and the configured reference."""
        return LossInputs(target=targets.reshape(-1), reference=self._fdiv_reference_for(targets.device))

    def _fdiv_fused_parts(self, model):
        """(backbone, head, config) when the loss can be fused with the LM head, else None."""
        if not self.fdiv_fused:
            return None
        if self.fdiv_task.kind == "causal_lm":
            return fused_head(self.accelerator.unwrap_model(model))
        if self.fdiv_task.kind in ("masked_lm", "seq2seq"):  # large vocabularies: fused at the head's input
            return fused_head_input(self.accelerator.unwrap_model(model))
        return None  # classification heads have few classes: the logits are small

    def _fdiv_router_aux(self):
        """(enabled, coefficient) of an MoE model's router load-balancing loss: TRL's SFTTrainer settings
        when present (``router_aux_loss_coef``), else the model config's, as the model's own forward adds
        it to its loss when given labels."""
        if hasattr(self, "aux_loss_enabled"):  # SFTTrainer decided (and set the model config accordingly)
            return bool(self.aux_loss_enabled), float(getattr(self, "router_aux_loss_coef", 0.0) or 0.0)
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        text = text_config(config)
        coef = float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
        return bool(getattr(text, "output_router_logits", False)) and coef != 0.0, coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        task = self.fdiv_task
        targets = self._fdiv_targets(inputs, unwrapped)
        logits_of = None
        if task.kind == "causal_lm":
            model_inputs = {k: v for k, v in inputs.items() if k not in self._fdiv_batch_keys}
        else:
            model_inputs = task.model_inputs(inputs, unwrapped, drop=self._fdiv_batch_keys)
            logits_of = lambda outputs: task.logits(outputs, targets)  # noqa: E731
        # the KV cache follows args.use_cache, as with the stock Trainer (it sets the model config's at init)
        aux_enabled, aux_coef = self._fdiv_router_aux()
        if aux_enabled:  # MoE: the model then returns its router load-balancing loss
            model_inputs["output_router_logits"] = True
        parts = None if return_outputs else self._fdiv_fused_parts(model)  # logits wanted: materialise them
        settings = LossSettings(self.fdiv_divergence, self.fdiv_max_iter, self.fdiv_skip_nonfinite)
        try:
            outputs, loss_sum, sums = fdiv_token_loss(
                model, model_inputs, targets, lambda t, V: self.fdiv_loss_spec(t, inputs, V), self.fdiv_num_classes,
                settings, parts, unwrapped=unwrapped, logits_of=logits_of,
            )
        except NonFiniteLogitsError as err:
            where = self._fdiv_where(mode)
            raise NonFiniteLogitsError(
                f"{where}: {err.rows} token row(s) have NaN/inf logits (the model diverged or its inputs are "
                "broken). Lower the learning rate / check the data, or set fdiv_skip_nonfinite=True to skip such "
                "rows and count them in the `nonfinite_rows` metric.",
                err.rows,
            ) from err
        except ValueError as err:  # bad labels or references: say where training stopped
            raise ValueError(f"{self._fdiv_where(mode)}: {err}") from err
        loss = self._normalise(loss_sum, targets, num_items_in_batch)
        aux = _output(outputs, "aux_loss") if aux_enabled else None
        if aux is not None:
            # a per-micro-batch mean (DDP averages it over ranks); with num_items_in_batch the Trainer leaves
            # gradient accumulation to the loss, so it is averaged over the accumulation steps here
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + aux_coef * aux.to(loss.device) / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        # read by Trainer.training_step right after this call: without a count, it divides by the GA steps
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        self._record_fdiv_metrics(mode, sums, inputs)
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """The Trainer's count of the accumulated batch's targets (gathered across ranks as it does), over
        the targets of this kind of model where ``labels != -100`` is not that count (QA's positions,
        segmentation's ignore index)."""
        task = getattr(self, "fdiv_task", None)
        if task is not None and task.remaps_labels:
            batch_samples = [{"labels": task.targets(batch)} for batch in batch_samples]
        return super()._get_num_items_in_batch(batch_samples, device)

    def _fdiv_where(self, mode: str) -> str:
        return f"training step {self.state.global_step + 1}" if mode == "train" else "evaluation"

    def _normalise(self, loss_sum: Tensor, targets: Tensor, num_items_in_batch) -> Tensor:
        """sum / num_items_in_batch (local count when absent), x world size like Trainer.compute_loss."""
        if num_items_in_batch is None:
            return loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1).to(loss_sum.device)
        # clamped: a window without any target token gives a finite 0, not 0 / 0
        num_items_in_batch = torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp(min=1)
        loss = loss_sum / num_items_in_batch
        if self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    # ------------------------------------------------------------------ metrics
    def _record_fdiv_metrics(self, mode: str, sums: Tensor, inputs: dict) -> None:
        # one gather (and one host read) per step: the loss's metric sums and, in training, the batch's tokens
        local = sums.to(self.accelerator.device)
        if mode == "train":
            local = torch.cat([local, _input_tokens(inputs).reshape(1).to(local)])
        total = self.accelerator.gather_for_metrics(local[None]).reshape(-1, local.numel()).sum(0).tolist()
        support, entropy, correct, count, nonfinite = total[: len(METRIC_KEYS)]
        metrics = self._metrics[mode]
        if self.fdiv_skip_nonfinite:
            self._total_nonfinite += int(nonfinite)
            metrics["nonfinite_rows"] = [self._total_nonfinite]
        if count > 0:
            metrics["support_size"].append(support / count)
            metrics["entropy"].append(entropy / count)
            metrics[self.fdiv_task.accuracy_key].append(correct / count)
        if mode == "train":
            self._total_train_tokens += int(total[-1]) // max(1, self.get_tp_size())
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if len(val)}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
            if "eval_token_accuracy" in logs:  # compute_metrics gave it over the whole eval set: log one accuracy
                metrics.pop("eval_mean_token_accuracy", None)
        logs.update(metrics)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ model card
    def fdiv_card_fields(self) -> dict:
        """Loss description for the model card; subclasses (distillation) add their fields."""
        fields = model_card.loss_fields(self.fdiv_divergence, self.fdiv_reference)
        if self._fdiv_prior_text is not None:
            fields["reference"] = self._fdiv_prior_text
        fields["pipeline_tag"] = self.fdiv_task.pipeline_tag
        fields["task_kind"] = self.fdiv_task.kind
        return fields

    def create_model_card(
        self,
        model_name: Optional[str] = None,
        dataset_name: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
        **kwargs,
    ) -> None:
        """Write README.md in ``args.output_dir``: the loss, the base model, the paper and its BibTeX."""
        if not self.is_world_process_zero():
            return
        self._write_model_card(self.args.output_dir, model_name, dataset_name or kwargs.get("dataset"), tags)

    def _write_model_card(self, output_dir, model_name=None, dataset_name=None, tags=None) -> None:
        card = model_card.build_model_card(
            model=self.model,
            trainer_name=self._fdiv_trainer_name,
            fields=self.fdiv_card_fields(),
            model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
            hub_model_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            dataset_name=dataset_name,
            tags=tags,
            extra_tags=list(getattr(self, "_tag_names", [])),
            log_history=self.state.log_history,
            global_step=self.state.global_step,
        )
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # The card goes with every saved model (PEFT's save_pretrained writes its own README first).
        if self.args.should_save:
            self._write_model_card(output_dir or self.args.output_dir)
            if self._fdiv_prior_text is not None:  # the card's snippet loads it for decoding / scoring
                torch.save(self.fdiv_reference.cpu(), os.path.join(output_dir or self.args.output_dir, "reference.pt"))
