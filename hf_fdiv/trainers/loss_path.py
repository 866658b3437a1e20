"""The trainers' loss: fused with the LM head or from materialised logits, and what the metrics need.

``compute_loss`` of every hf_fdiv trainer goes through :func:`fdiv_token_loss`. It returns the summed
loss over target tokens and :class:`~hf_fdiv.losses.RowStats` (per token: support size, entropy,
argmax); :func:`metric_sums` turns those into the sums the trainer logs.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..divergences import FDivergence
from ..fused import LogitTransform, fused_linear_fdiv_loss
from ..losses import IGNORE_INDEX, RowStats, check_targets, fdiv_loss_rows
from ..solver import RowProvider, as_rows, flatten_reference, prepare_reference

__all__ = [
    "LossInputs",
    "LossSettings",
    "fdiv_token_loss",
    "outputs_loss",
    "fused_head",
    "fused_head_input",
    "metric_sums",
    "run_inside_forward",
    "engine_wraps",
    "gathered_parameters",
    "head_weight_problem",
    "output_rows",
    "virtual_tokens",
    "align_to_virtual_tokens",
    "text_config",
    "METRIC_KEYS",
]

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


def text_config(config):
    """The language model's config: a vision-language model's text config, else ``config`` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fused_head(unwrapped_model):
    """(backbone, head, config) when the loss can be fused with the LM head, else None.

    Raises when the head is adapted by PEFT (its weight is not the one the model uses)."""
    base = unwrapped_model.get_base_model() if hasattr(unwrapped_model, "get_base_model") else unwrapped_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "base_model", None)
    if head is None or backbone is None or backbone is base or not isinstance(head, torch.nn.Module):
        return None
    if not any(child is head for child in base.children()):
        # the head sits inside a prediction head (BERT's cls.predictions: dense + LayerNorm, then the decoder):
        # the backbone's output is not its input, so only the model's own logits are right
        return None
    if not _is_plain_linear(head):
        raise ValueError(
            "the fused f-divergence loss reads the LM head weight directly, but the lm_head is adapted (LoRA / "
            "modules_to_save): leave lm_head out of the PEFT target modules, or set fdiv_fused=False to use the "
            "materialised logits."
        )
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    # A vision-language model keeps the logit scale / softcap on its text config: read it there, as TRL's fused
    # LM head (trl.trainer.utils.add_fused_lm_head) does.
    return backbone, head, text_config(base.config)


def fused_head_input(unwrapped_model):
    """(None, head, config) when the loss can be fused at the input of the output layer, else None: for
    models without ``logits_to_keep`` (masked LMs, encoder-decoders) whose logits are exactly
    ``head(x)``, a plain linear layer (weight [V, H], optional bias) over whatever the model feeds it
    (BERT's transformed hidden states, T5's rescaled decoder states). The head's forward is stood in for
    during the model's forward (see :func:`_fused_inside_forward`), so no [tokens x V] logits are made.

    Not fused: an adapted (PEFT) or missing head, models that add to ``head(x)`` (BART/Marian's
    ``final_logits_bias`` makes [tokens x V] logits whatever the head returns), and configs with a logit
    scale or softcap."""
    base = unwrapped_model.get_base_model() if hasattr(unwrapped_model, "get_base_model") else unwrapped_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not _is_plain_linear(head):
        return None
    if getattr(base, "final_logits_bias", None) is not None:  # added to head(x) by the model: [tokens x V] anyway
        return None
    config = text_config(base.config)
    transform = LogitTransform.from_config(config)
    if transform.scale != 1.0 or transform.softcap:
        return None
    return None, head, config


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


def run_inside_forward(wrapper, module, fn):
    """``fn(run_module)`` run as the forward of ``wrapper`` (DDP, FSDP, a DeepSpeed engine) around ``module``.

    A fused loss reads the LM head's weight directly. Inside the wrapper's forward the engine has gathered
    the parameters (FSDP's root unit, ZeRO-3's hooks) and arms its backward hooks on what the forward
    returns, so the head's gradient is reduced by the engine as usual. ``fn`` closes over its inputs,
    so nothing is cast or moved by the wrapper; it gets ``run_module(**inputs)``, the module's own
    forward without running the module's hooks a second time (FSDP2 would reshard the root after a
    nested call). FSDP2 shards the module in place (no wrapper): it is redirected through its own
    hooks too. Any other unwrapped module: ``fn(module)``."""
    if not engine_wraps(wrapper, module):
        return fn(module)
    had_own_forward = "forward" in module.__dict__
    original = module.forward

    def forward(*args, **kwargs):
        _restore_forward(module, original, had_own_forward)  # fn may call the module's real forward
        return fn(original)

    module.forward = forward
    try:
        return wrapper()
    finally:
        _restore_forward(module, original, had_own_forward)


def engine_wraps(wrapper, module) -> bool:
    """True when an engine gathers ``module``'s parameters only for the duration of a forward: a wrapper
    around it (DDP, FSDP1, DeepSpeed), or FSDP2 sharding it in place."""
    if wrapper is not module:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def _restore_forward(module, original, had_own_forward: bool) -> None:
    if had_own_forward:
        module.forward = original
    else:
        module.__dict__.pop("forward", None)


def gathered_parameters(*params):
    """A context in which ZeRO-3 partitioned parameters are whole (a null context otherwise)."""
    params = [p for p in params if p is not None and getattr(p, "ds_id", None) is not None]
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    if not params or not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # already gathered (tied embeddings keep the weight available): leave it to its owner
    unique = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(unique.values())) if unique else contextlib.nullcontext()


def head_weight_problem(weight) -> Optional[str]:
    """Why the fused loss cannot read this LM head weight directly, or None when it can."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(weight, DTensor):
        return "the LM head weight is a DTensor (FSDP2 shards the head as its own unit, outside the root)"
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
        return f"the LM head weight is not a whole [V, H] matrix here (shape {shape}: a shard or a flat parameter)"
    return None


def output_rows(model) -> int:
    """Rows of the model's output layer (the classes of its logits), read without touching a possibly
    partitioned weight: DeepSpeed's ``ds_shape``, a whole 2-D weight, else ``config.vocab_size``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", None)
    if shape is None and isinstance(weight, Tensor) and weight.dim() == 2 and weight.numel() > 0:
        shape = weight.shape
    if shape is not None and len(shape) == 2:
        return int(shape[0])
    return int(text_config(base.config).vocab_size)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _fused_inside_forward(run_model, model_inputs, targets, make_inputs, num_classes_of, settings, parts):
    """The model's forward with the logits of one position, then the fused loss on its last hidden
    states (run inside the wrapper's forward, see :func:`run_inside_forward`). Without a backbone
    (:func:`fused_head_input`) the head's forward is stood in for by one that keeps its input and
    returns zeros expanded to the logits' shape (no memory). Where the head's weight cannot be read
    whole afterwards (see :func:`head_weight_problem`), the head module itself gives the logits of every
    position (its engine hooks gather it and reduce its gradient)."""
    backbone, head, config = parts
    captured = {}
    if backbone is None:
        had_own_forward, original = "forward" in head.__dict__, head.forward

        def stand_in(x):
            captured["h"] = x
            return x.new_zeros(()).expand(*x.shape[:-1], head.out_features)

        head.forward = stand_in
        try:
            outputs = run_model(**model_inputs)
        finally:
            _restore_forward(head, original, had_own_forward)
    else:
        def grab(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)

        handle = backbone.register_forward_hook(grab)
        try:
            outputs = run_model(**model_inputs, logits_to_keep=1)
        finally:
            handle.remove()
    hidden = captured["h"]
    bias = getattr(head, "bias", None)
    # read after the model ran (an engine may gather the head for its own forward and keep it whole);
    # a ZeRO-3 parameter (ds_id) is whole under gathered_parameters
    problem = None if getattr(head.weight, "ds_id", None) is not None else head_weight_problem(head.weight)
    if problem is not None:
        _warn_once(f"hf_fdiv: {problem}; using the materialised logits instead of the fused LM-head loss.")
        logits = LogitTransform.from_config(config).transformed(head(hidden).float())
        loss_sum, stats, spec = _loss_from_logits(logits, targets, make_inputs, num_classes_of(logits.shape[-1]),
                                                  settings)
        return outputs, loss_sum, stats, spec
    with gathered_parameters(head.weight, bias):
        V = num_classes_of(head.weight.shape[0])
        spec = make_inputs(targets.to(hidden.device), V)
        reference = spec.reference
        if isinstance(reference, Tensor) and reference.dim() > 1:  # per-position q: serve it by rows
            q_rows = reference.expand(*targets.shape, V).reshape(-1, V)
            reference = RowProvider(lambda r: q_rows[r])
        weight = head.weight[:V] if head.weight.shape[0] != V else head.weight
        bias = bias[:V] if bias is not None and bias.shape[0] != V else bias
        loss_sum, stats = fused_linear_fdiv_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, spec.target, settings.divergence, reference, bias=bias,
            transform=LogitTransform.from_config(config), max_iter=settings.max_iter, rows=spec.rows,
            skip_nonfinite=settings.skip_nonfinite, return_stats=True,
        )
    return outputs, loss_sum, stats, spec


def fdiv_token_loss(model, model_inputs: dict, targets: Tensor, make_inputs, num_classes_of, settings: LossSettings,
                    fused_parts=None, unwrapped=None, logits_of=None):
    """Run the model and the loss. ``make_inputs(targets, V)`` gives the :class:`LossInputs`;
    ``num_classes_of(head_rows)`` the classes the loss is over. With ``fused_parts`` (see
    :func:`fused_head`) the loss is fused with the LM head and runs inside the forward of ``model``
    (the engine's wrapper around ``unwrapped``); else see :func:`outputs_loss` (``logits_of``).
    Returns (outputs, loss_sum, metric sums)."""
    if fused_parts is not None:
        outputs, loss_sum, stats, spec = run_inside_forward(
            model, unwrapped if unwrapped is not None else model,
            lambda run_model: _fused_inside_forward(run_model, model_inputs, targets, make_inputs, num_classes_of,
                                                    settings, fused_parts),
        )
    else:
        outputs = model(**model_inputs)
        return (outputs, *outputs_loss(outputs, targets, make_inputs, num_classes_of, settings, logits_of))
    ids = spec.stat_ids if spec.stat_ids is not None else spec.target
    return outputs, loss_sum, metric_sums(stats, ids if isinstance(ids, Tensor) else None)


def outputs_loss(outputs, targets: Tensor, make_inputs, num_classes_of, settings: LossSettings, logits_of=None):
    """(loss_sum, metric sums) from a model's outputs: the logits are ``outputs["logits"]``, or
    ``logits_of(outputs)`` (class dim last, shaped ``targets.shape + [C]``: a task's view of its scores,
    see :mod:`.tasks`)."""
    if logits_of is not None:
        logits = logits_of(outputs)
    else:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    loss_sum, stats, spec = _loss_from_logits(logits, targets, make_inputs, num_classes_of(logits.shape[-1]), settings)
    ids = spec.stat_ids if spec.stat_ids is not None else spec.target
    return loss_sum, metric_sums(stats, ids if isinstance(ids, Tensor) else None)


def virtual_tokens(unwrapped) -> int:
    """Positions a prompt-learning PEFT adapter (prompt tuning, P-tuning) prepends to every sequence;
    0 for other models (prefix tuning adds keys/values, not positions)."""
    config = getattr(unwrapped, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config, "peft_type", "")).upper().endswith("PREFIX_TUNING"):
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def align_to_virtual_tokens(labels: Tensor, unwrapped) -> Tensor:
    """Labels [B, T] aligned with a prompt-learning model's positions [B, n + T]: the n virtual positions
    come first and are ignored (-100), as PEFT's own forward pads the labels (before the causal shift)."""
    n = 0 if unwrapped is None else virtual_tokens(unwrapped)
    if n == 0:
        return labels
    return torch.nn.functional.pad(labels, (n, 0), value=IGNORE_INDEX)


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
