"""Teachers for distillation: loading, vocabulary checks, chunked log-probabilities, offline top-k.

A teacher's logits are never materialised for a whole batch: its backbone runs once per batch
(hidden states [tokens, H_t]) and its LM head is applied one chunk of token rows at a time, when the
loss asks for those rows (:class:`hf_fdiv.solver.RowProvider`). The offline path stores the top-k
log-probabilities once in dataset columns and rebuilds a full distribution per chunk.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fused import LogitTransform
from ..solver import work_chunk_rows
from .loss_path import engine_wraps, gathered_parameters, head_weight_problem, output_rows, run_inside_forward

TOPK_IDS = "teacher_topk_ids"
TOPK_LOGPROBS = "teacher_topk_logprobs"


def load_teacher(teacher: Any, init_kwargs: Optional[dict] = None):
    """A model object is used as is; a name or path is loaded with ``AutoModelForCausalLM``."""
    if teacher is None or not isinstance(teacher, str):
        if init_kwargs:
            raise ValueError("teacher_model_init_kwargs only apply when the teacher is given as a name or path.")
        return teacher
    from transformers import AutoModelForCausalLM

    kwargs = dict(init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(teacher, **kwargs)


def common_vocab(student_rows: int, teacher_rows: int, tokenizer_len: Optional[int]) -> int:
    """Classes shared by student and teacher. Different head sizes are fine when the extra rows are
    padding beyond the tokenizer (models pad vocabularies to multiples of 64/128); otherwise raise."""
    if student_rows == teacher_rows:
        return student_rows
    common = min(student_rows, teacher_rows)
    if tokenizer_len is not None and tokenizer_len <= common:
        return common
    raise ValueError(
        f"student and teacher vocabularies differ ({student_rows} vs {teacher_rows} output rows) and the "
        f"tokenizer has {tokenizer_len} tokens, so the extra rows are not just padding: distillation compares "
        "distributions token by token and needs one shared tokenizer. Use a teacher from the same family, or a "
        "cross-tokenizer method (e.g. TRL's GOLDTrainer)."
    )


def prepare_teacher(teacher, accelerator):
    """The teacher as TRL prepares reference models: sharded like the student under DeepSpeed ZeRO-3 /
    FSDP (a teacher larger than one device), in eval mode without gradients; placed on the device
    otherwise. Returns the wrapper (or the model)."""
    teacher.eval()
    teacher.requires_grad_(False)
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    if getattr(state, "fsdp_plugin", None) is not None:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(teacher, accelerator)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


class TeacherLogProbs:
    """Teacher log-probabilities at temperature T for rows of the flattened [B*T] token grid.

    The backbone runs once (no grad) and a whole fp32 copy of the head is taken, both inside the
    teacher wrapper's forward (``teacher``, e.g. FSDP or a DeepSpeed engine around ``unwrapped``), where
    a sharded teacher's parameters are gathered; ``__call__(rows)`` projects only those rows through the
    head. Falls back to one full forward for models without the backbone + head layout, or whose head
    is not readable whole (a DTensor shard)."""

    def __init__(self, teacher, model_inputs: dict, num_classes: int, temperature: float, out_device=None,
                 unwrapped=None):
        unwrapped = teacher if unwrapped is None else unwrapped
        self.num_classes = num_classes
        self.temperature = float(temperature)
        # The teacher may live on another device than the student: inputs go there, results come back.
        self.device = next(unwrapped.parameters()).device
        self.out_device = out_device
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in model_inputs.items() if k != "use_cache"}
        head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
        backbone = getattr(unwrapped, "base_model", None)
        split = head is not None and backbone is not None and backbone is not unwrapped

        def forward(run_model):
            weight = getattr(head, "weight", None)  # read here: inside the forward a sharded head is gathered
            whole = split and weight is not None and (
                getattr(weight, "ds_id", None) is not None or head_weight_problem(weight) is None
            )
            if not whole:
                out = run_model(**inputs, use_cache=False)
                return None, None, None, out.logits.reshape(-1, out.logits.shape[-1])[:, :num_classes]
            hidden = backbone(**inputs, use_cache=False).last_hidden_state
            bias = getattr(head, "bias", None)
            # an engine gathered the head for this forward only (FSDP, ZeRO-3): keep a copy; a plain
            # model's fp32 head is used as it is (no per-batch copy of [V, H])
            sharded = engine_wraps(teacher, unwrapped) or getattr(weight, "ds_id", None) is not None
            with gathered_parameters(head.weight, bias):
                w = head.weight[:num_classes].to(torch.float32, copy=sharded)
                b = None if bias is None else bias[:num_classes].to(torch.float32, copy=sharded)
            return hidden.reshape(-1, hidden.shape[-1]), w, b, None

        with torch.no_grad():
            self.hidden, self.weight, self.bias, self.logits = run_inside_forward(teacher, unwrapped, forward)
        self.transform = LogitTransform.from_config(unwrapped.config)

    @classmethod
    def from_hidden(cls, hidden: Tensor, head, config, num_classes: int, temperature: float,
                    out_device=None) -> "TeacherLogProbs":
        """Rows of teacher hidden states already computed ([N, H_t], e.g. by TRL's DistillationTrainer,
        which runs the teacher backbone inside its engine wrapper) projected through the teacher's
        ``head`` (an FSDP2 DTensor head is gathered once, a ZeRO-3 one inside this call)."""
        self = cls.__new__(cls)
        self.num_classes, self.temperature = num_classes, float(temperature)
        self.device, self.out_device = hidden.device, out_device
        self.hidden, self.logits = hidden.reshape(-1, hidden.shape[-1]), None
        weight, bias = head.weight, getattr(head, "bias", None)
        if hasattr(weight, "full_tensor"):  # FSDP2 shard: one all-gather for the whole batch
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with torch.no_grad(), gathered_parameters(weight, bias):
            self.weight = weight[:num_classes].to(torch.float32, copy=weight is not head.weight)
            self.bias = None if bias is None else bias[:num_classes].to(torch.float32, copy=bias is not head.bias)
        self.transform = LogitTransform.from_config(config)
        return self

    def __call__(self, rows) -> Tensor:
        if torch.is_tensor(rows):
            rows = rows.to(self.device)
        with torch.no_grad():
            if self.logits is not None:
                z = self.logits[rows].float()
            else:
                z = self.transform.apply(F.linear(self.hidden[rows].float(), self.weight, self.bias))
            out = torch.log_softmax(z / self.temperature, dim=-1)
        return out if self.out_device is None else out.to(self.out_device)


class TopKLogProbs:
    """Teacher log-probabilities rebuilt from stored top-k columns ([B, T, k] ids and log-probs).

    The mass outside the top k, 1 - sum exp(top-k), is spread uniformly over the other V - k classes
    (with k = V this is the exact teacher); temperature T re-normalises log p / T."""

    def __init__(self, topk_ids: Tensor, topk_logprobs: Tensor, num_classes: int, temperature: float):
        self.ids = topk_ids.reshape(-1, topk_ids.shape[-1]).long()
        self.logprobs = topk_logprobs.reshape(-1, topk_logprobs.shape[-1]).float()
        self.num_classes = num_classes
        self.temperature = float(temperature)
        k = self.ids.shape[-1]
        if k > num_classes:
            raise ValueError(f"stored teacher top-k has k={k} > V={num_classes} classes.")
        largest = int(self.ids.max()) if self.ids.numel() else -1  # checked once per batch, not per chunk
        if largest >= num_classes:
            raise ValueError(
                f"stored teacher top-k ids reach {largest} but the student has {num_classes} classes: "
                "the columns were computed with another vocabulary."
            )

    def __call__(self, rows) -> Tensor:
        ids, lp = self.ids[rows], self.logprobs[rows]
        k = ids.shape[-1]
        rest = torch.full((ids.shape[0], 1), -math.inf, dtype=lp.dtype, device=lp.device)
        if k < self.num_classes:
            mass = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
            rest = torch.log(mass / (self.num_classes - k))
        full = rest.expand(ids.shape[0], self.num_classes).clone()
        full.scatter_(1, ids, lp)
        return torch.log_softmax(full / self.temperature, dim=-1)


def add_teacher_topk(
    dataset,
    teacher,
    k: int,
    batch_size: int = 8,
    pad_token_id: int = 0,
    accelerator=None,
):
    """Store the teacher's top-k next-token log-probabilities (temperature 1) in dataset columns.

    ``dataset`` is tokenized (``input_ids``, e.g. the ``train_dataset`` of an FDivSFTTrainer or
    FDivDistillationTrainer after preparation). Adds ``teacher_topk_ids`` and
    ``teacher_topk_logprobs``: one list of k entries per position, aligned with the logits (position i
    predicts token i + 1). Distil from them with no teacher in memory: pass the dataset to
    :class:`~hf_fdiv.FDivDistillationTrainer` without a teacher.

    With ``accelerator`` (e.g. a trainer's, under ``accelerate launch``) the teacher is prepared like
    the distillation trainer's: sharded under FSDP / DeepSpeed ZeRO-3, so a teacher larger than one
    device works; every process computes the same columns.
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError("add_teacher_topk needs a tokenized dataset with an `input_ids` column.")
    was_training = teacher.training
    teacher.eval()
    V = output_rows(teacher)
    wrapper = prepare_teacher(teacher, accelerator) if accelerator is not None else teacher
    device = next(teacher.parameters()).device
    if not (1 <= k <= V):
        raise ValueError(f"k must be in [1, {V}], got {k}.")

    def compute(batch):
        seqs = batch["input_ids"]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        lp = TeacherLogProbs(wrapper, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, V, 1.0,
                             unwrapped=teacher)
        rows = torch.arange(ids.numel(), device=device)
        out_ids, out_lp = [], []
        step = work_chunk_rows(rows, V)
        for a in range(0, rows.numel(), step):
            vals, idx = lp(rows[a : a + step]).topk(k, dim=-1)
            out_ids.append(idx.cpu())
            out_lp.append(vals.cpu())
        top_ids = torch.cat(out_ids).view(len(seqs), L, k)
        top_lp = torch.cat(out_lp).view(len(seqs), L, k)
        return {
            TOPK_IDS: [top_ids[i, : len(s)].tolist() for i, s in enumerate(seqs)],
            TOPK_LOGPROBS: [top_lp[i, : len(s)].tolist() for i, s in enumerate(seqs)],
        }

    try:
        return dataset.map(compute, batched=True, batch_size=batch_size, desc=f"Teacher top-{k} log-probs")
    finally:
        teacher.train(was_training)


def pad_topk(features: list, key: str, length: int, value: Union[int, float]) -> Tensor:
    k = len(features[0][key][0])
    dtype = torch.long if key == TOPK_IDS else torch.float32
    out = torch.full((len(features), length, k), value, dtype=dtype)
    for i, f in enumerate(features):
        rows = torch.tensor(f[key], dtype=dtype)[:length]
        out[i, : rows.shape[0]] = rows
    return out
