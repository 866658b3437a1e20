"""The trainers' loss: fused with the LM head or from materialised logits, and what the metrics need.

``compute_loss`` of every hf_fdiv trainer goes through :func:`fdiv_token_loss`. It returns the summed
loss over target tokens and :class:`~hf_fdiv.losses.RowStats` (per token: support size, entropy,
argmax); :func:`metric_sums` turns those into the sums the trainer logs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..divergences import FDivergence
from ..fused import LogitTransform, fused_linear_fdiv_loss
from ..losses import IGNORE_INDEX, RowStats, check_targets, fdiv_loss_rows
from ..solver import RowProvider, as_rows, flatten_reference, prepare_reference

__all__ = ["LossInputs", "LossSettings", "fdiv_token_loss", "fused_head", "metric_sums", "METRIC_KEYS"]

#: what :func:`metric_sums` returns, in order
METRIC_KEYS = ("support", "entropy", "correct", "count", "nonfinite")


@dataclass
class LossInputs:
    """The loss inputs on the flattened token grid: ``target`` (ids with -100, or a RowProvider of
    target distributions), ``reference`` (spec, tensor or RowProvider), ``rows`` (rows to fit; None:
    the non-ignored ids) and ``stat_ids`` (ids for the accuracy metric when the target is soft)."""

    target: Any
    reference: Any
    rows: Optional[Tensor] = None
    stat_ids: Optional[Tensor] = None


@dataclass(frozen=True)
class LossSettings:
    """The trainer's loss configuration."""

    divergence: FDivergence
    max_iter: Optional[int] = None
    skip_nonfinite: bool = False


def _is_plain_linear(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper

        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            return False
    except ImportError:  # pragma: no cover
        pass
    return isinstance(getattr(module, "weight", None), Tensor)


def fused_head(unwrapped_model):
    """(backbone, head, config) when the loss can be fused with the LM head, else None.

    Raises when the head is adapted by PEFT (its weight is not the one the model uses)."""
    base = unwrapped_model.get_base_model() if hasattr(unwrapped_model, "get_base_model") else unwrapped_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "base_model", None)
    if head is None or backbone is None or backbone is base or not isinstance(head, torch.nn.Module):
        return None
    if not _is_plain_linear(head):
        raise ValueError(
            "the fused f-divergence loss reads the LM head weight directly, but the lm_head is adapted (LoRA / "
            "modules_to_save): leave lm_head out of the PEFT target modules, or set fdiv_fused=False to use the "
            "materialised logits."
        )
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    return backbone, head, base.config


def _loss_from_logits(logits, targets, make_inputs, num_classes, settings: LossSettings):
    V = num_classes
    x, shape = as_rows(logits[..., :V] if logits.shape[-1] != V else logits, -1)
    spec = make_inputs(targets.to(x.device), V)
    if isinstance(spec.reference, RowProvider):
        q = spec.reference
    else:
        q = flatten_reference(prepare_reference(spec.reference, x.view(*shape)), shape)
    if spec.rows is None:
        check_targets(spec.target, x, IGNORE_INDEX)
    per_row, stats = fdiv_loss_rows(
        x, spec.target, q, settings.divergence, rows=spec.rows, max_iter=settings.max_iter,
        skip_nonfinite=settings.skip_nonfinite, return_stats=True,
    )
    return per_row.sum(), stats, spec


def _loss_fused(model, model_inputs, targets, make_inputs, num_classes_of, settings: LossSettings, parts):
    backbone, head, config = parts
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)

    handle = backbone.register_forward_hook(grab)
    try:
        # Through the (possibly DDP-wrapped) model, computing the logits of one position only.
        outputs = model(**model_inputs, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured["h"]
    V = num_classes_of(head.weight.shape[0])
    spec = make_inputs(targets.to(hidden.device), V)
    reference = spec.reference
    if isinstance(reference, Tensor) and reference.dim() > 1:  # per-position q: serve it by rows
        q_rows = reference.expand(*targets.shape, V).reshape(-1, V)
        reference = RowProvider(lambda r: q_rows[r])
    weight = head.weight[:V] if head.weight.shape[0] != V else head.weight
    bias = getattr(head, "bias", None)
    bias = bias[:V] if bias is not None and bias.shape[0] != V else bias
    loss_sum, stats = fused_linear_fdiv_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, spec.target, settings.divergence, reference, bias=bias,
        transform=LogitTransform.from_config(config), max_iter=settings.max_iter, rows=spec.rows,
        skip_nonfinite=settings.skip_nonfinite, return_stats=True,
    )
    return outputs, loss_sum, stats, spec


def fdiv_token_loss(model, model_inputs: dict, targets: Tensor, make_inputs, num_classes_of, settings: LossSettings,
                    fused_parts=None):
    """Run the model and the loss. ``make_inputs(targets, V)`` gives the :class:`LossInputs`;
    ``num_classes_of(head_rows)`` the classes the loss is over. Returns (outputs, loss_sum, metric sums)."""
    if fused_parts is not None:
        outputs, loss_sum, stats, spec = _loss_fused(
            model, model_inputs, targets, make_inputs, num_classes_of, settings, fused_parts
        )
    else:
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss_sum, stats, spec = _loss_from_logits(
            logits, targets, make_inputs, num_classes_of(logits.shape[-1]), settings
        )
    ids = spec.stat_ids if spec.stat_ids is not None else spec.target
    return outputs, loss_sum, metric_sums(stats, ids if isinstance(ids, Tensor) else None)


def metric_sums(stats: RowStats, ids: Optional[Tensor]) -> Tensor:
    """[support, entropy, correct, count, nonfinite] summed over the solved rows, fp64, on device."""
    solved = stats.solved
    count = solved.sum()
    if ids is not None and not ids.is_floating_point():
        correct = ((stats.pred == ids.reshape(-1).to(stats.pred.device)) & solved).sum()
    else:
        correct = torch.zeros((), device=solved.device)
    return torch.stack([
        torch.where(solved, stats.support, 0).sum().double(),
        torch.where(solved, stats.entropy, 0).sum().double(),
        correct.double(),
        count.double(),
        stats.skipped.sum().double(),
    ])
