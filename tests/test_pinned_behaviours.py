"""Four behaviours that a plausible bug could break without another test noticing (issue 25).

Each is checked against an independent oracle: the online teacher, a hand-floored reference, the
materialised loss, the documented error.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_fdiv import FDivDistillationConfig, FDivDistillationTrainer, add_teacher_topk, f_softargmax, fdiv_loss
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.solver import NonFiniteLogitsError, triton_available

from tiny import SFT_COMMON, make_model, messages_dataset

TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"


def offline_distiller(tok, tmp_path, dataset, teacher=None, **cfg):
    """A distiller without a teacher model when ``dataset`` has the top-k columns (offline teacher)."""
    kwargs = dict(SFT_COMMON, per_device_train_batch_size=8, max_steps=1, learning_rate=0.1, optim="sgd")
    kwargs.update(cfg)
    return FDivDistillationTrainer(model=make_model(tok), teacher_model=teacher, processing_class=tok,
                                   args=FDivDistillationConfig(output_dir=str(tmp_path), **kwargs), train_dataset=dataset)


def first_batch(trainer):
    return dict(next(iter(trainer.get_train_dataloader())))


# ------------------------------------------------------------------------ 1. offline top-k at T != 1


@pytest.mark.parametrize("mode", ["target", "reference"])
def test_offline_topk_teacher_is_tempered_like_the_online_teacher(tok, tmp_path, mode):
    """Stored top-k log-probs (T = 1) at k = V are the whole teacher: at T = 2 the offline loss must equal
    the online one, whose teacher log-probs are log_softmax(logits / T)."""
    teacher = make_model(tok, hidden=32, seed=1)
    cfg = dict(divergence="alpha:1.5", teacher_mode=mode, temperature=2.0, reference_floor=0.0)
    kwargs = dict(SFT_COMMON, per_device_train_batch_size=8, max_steps=1, **cfg)
    online = FDivDistillationTrainer(model=make_model(tok), teacher_model=teacher, processing_class=tok,
                                     args=FDivDistillationConfig(output_dir=str(tmp_path / "on"), **kwargs),
                                     train_dataset=messages_dataset(8))
    with torch.no_grad():
        want = online.compute_loss(online.model, first_batch(online))
    full = add_teacher_topk(online.train_dataset, teacher, k=len(tok), pad_token_id=tok.pad_token_id)
    offline = offline_distiller(tok, tmp_path / "off", full, **cfg)
    assert offline.teacher_model is None
    with torch.no_grad():
        got = offline.compute_loss(offline.model, first_batch(offline))
    assert abs(float(got) - float(want)) <= 1e-5
    # the temperature matters at this tolerance: the untempered teacher is > 10x the tolerance away
    untempered = offline_distiller(tok, tmp_path / "t1", full, **dict(cfg, temperature=1.0))
    with torch.no_grad():
        other = untempered.compute_loss(untempered.model, first_batch(untempered))
    assert abs(float(other) - float(want)) > 1e-4


# ------------------------------------------------------------------------ 2. reference_floor


def renormalised_topk(dataset):
    """The stored top-k log-probs renormalised to sum to 1 per position: the teacher puts zero mass
    outside its top k."""

    def renorm(row):
        lp = torch.tensor(row[TOPK_LOGPROBS], dtype=torch.float64)
        return {TOPK_LOGPROBS: (lp - torch.logsumexp(lp, -1, keepdim=True)).tolist()}

    return dataset.map(renorm)


@pytest.mark.parametrize("divergence", ["kl", "alpha:1.5"])
def test_reference_floor_lifts_zero_teacher_mass_on_labels(tok, tmp_path, divergence):
    """Reference mode with a teacher that gives a label q = 0 (offline top-4 holding all the mass, label
    outside it): the loss equals fdiv_loss with the hand-floored q = max(q_teacher, floor), and training
    runs (without the floor the solve raises "reference q = 0")."""
    teacher = make_model(tok, hidden=32, seed=1)
    floor, k = 1e-3, 4
    base = offline_distiller(tok, tmp_path / "base", messages_dataset(8), teacher=teacher)  # for its tokenized dataset
    data = renormalised_topk(add_teacher_topk(base.train_dataset, teacher, k=k, pad_token_id=tok.pad_token_id))
    tr = offline_distiller(tok, tmp_path / "tr", data, divergence=divergence, teacher_mode="reference",
                           reference_floor=floor, max_steps=2)
    batch = first_batch(tr)
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch))
        s = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ids, lp = batch[TOPK_IDS][:, :-1][valid], batch[TOPK_LOGPROBS][:, :-1][valid]
    V = s.shape[-1]
    q = torch.zeros(ids.shape[0], V).scatter_(1, ids, lp.exp()).clamp_(min=floor)  # hand-floored oracle
    outside = (ids != labels[valid][:, None]).all(1)
    assert int(outside.sum()) >= 5  # labels the teacher gives zero mass: the floor is what makes them trainable
    want = fdiv_loss(s[valid], labels[valid], divergence, q, reduction="sum") / valid.sum()
    assert math.isfinite(float(loss))
    assert abs(float(loss) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------------ 3. fused ignore_index


@pytest.mark.parametrize("ignore_index", [7, 299, 300, 1000])
@pytest.mark.parametrize("name", ["alpha:1.5", "kl"])
def test_fused_loss_ignore_index_equals_materialised(name, ignore_index):
    """fused_linear_fdiv_loss(..., ignore_index=k) = fdiv_loss(h @ W.T + b, t, ignore_index=k, "sum"), value
    and gradients, for k a class id (rows with target k are skipped) and k >= V (an id no class has)."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 60, 10, 300
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * 2
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[::3] = ignore_index  # a third of the rows are ignored
    ref = [x.clone().requires_grad_() for x in (h, W, b)]
    got = [x.clone().requires_grad_() for x in (h, W, b)]
    want = fdiv_loss(ref[0] @ ref[1].T + ref[2], t, name, ignore_index=ignore_index, reduction="sum")
    want.backward()
    loss = fused_linear_fdiv_loss(got[0], got[1], t, name, bias=got[2], ignore_index=ignore_index,
                                  chunk_elements=16 * V)
    loss.backward()
    # the oracle skips the rows: the loss is smaller than over all rows
    assert float(want) < float(fdiv_loss(h @ W.T + b, t.clamp(max=V - 1), name, reduction="sum")) - 1.0
    assert abs(float(loss) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
    for a, c in zip(ref, got):
        torch.testing.assert_close(c.grad, a.grad, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------ 4. NaN logits on every backend

_TRITON_ON_CPU = triton_available() and not torch.cuda.is_available()
BACKENDS = [
    "chunked",
    "batched",
    pytest.param("triton", marks=pytest.mark.skipif(not _TRITON_ON_CPU, reason="the kernels run on CPU tensors "
                                                    "only under TRITON_INTERPRET=1 (tests/test_triton.py runs them on CUDA)")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kl", "js", "alpha:1.5"])
def test_nan_logit_raises_on_every_backend(monkeypatch, backend, name):
    """One NaN logit: the operator and the loss raise NonFiniteLogitsError naming 1 row (fp32, unit q: the
    case the Triton kernels cover), whichever backend solves."""
    monkeypatch.setenv("HF_FDIV_SOLVER", backend)
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(6, 301, generator=g)
    t = torch.randint(0, 301, (6,), generator=g)
    x[4, 17] = math.nan
    with pytest.raises(NonFiniteLogitsError, match=r"^1 row\(s\) of logits have no finite maximum"):
        f_softargmax(x, name)
    with pytest.raises(NonFiniteLogitsError, match=r"^1 row\(s\) of logits have no finite maximum"):
        fdiv_loss(x, t, name)
    with pytest.raises(NonFiniteLogitsError, match=r"^1 row\(s\) of logits have no finite maximum"):
        fdiv_loss(x, torch.softmax(x.nan_to_num(), -1), name)  # soft targets take another loss path
