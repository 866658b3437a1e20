"""Four behaviours that a plausible bug could break without another test noticing (issue 25).

Each is checked against an independent oracle: the online teacher, a hand-floored reference, the
materialised loss, the documented error.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_fdiv import (FDivDistillationConfig, FDivDistillationTrainer, FDivLoss, add_teacher_topk, causal_lm_fdiv_loss,
                     f_softargmax, f_softmax, fdiv_loss)
from hf_fdiv.divergences import KL, FDivergence, get_divergence
from hf_fdiv.losses import fdiv_loss_rows
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.solver import NonFiniteLogitsError, RowProvider, triton_available

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


# ------------------------------------------------------------------------ survivors of `make mutation`


def test_fused_loss_scaled_backward_twice_with_a_retained_graph():
    """(3 * loss).backward twice, the first keeping the graph: the first backward scales a copy of the
    stored gradient by 3, the second scales the buffer itself; together 6x the materialised gradients
    (an in-place first scaling, or a division, would give 12x or (3 + 1/3)x)."""
    g = torch.Generator().manual_seed(4)
    N, H, V = 20, 8, 50
    h, W = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    ref = [x.clone().requires_grad_() for x in (h, W)]
    got = [x.clone().requires_grad_() for x in (h, W)]
    (6 * fdiv_loss(ref[0] @ ref[1].T, t, "alpha:1.5", reduction="sum")).backward()
    loss = fused_linear_fdiv_loss(got[0], got[1], t, "alpha:1.5")
    (3 * loss).backward(retain_graph=True)
    (3 * loss).backward()
    for a, c in zip(ref, got):
        torch.testing.assert_close(c.grad, a.grad, atol=1e-10, rtol=1e-9)


GENERATORS = ["kl", "reverse_kl", "chi2", "squared_hellinger", "js", "alpha:0.5", "alpha:1.5", "alpha:2", "alpha:3"]


def custom_alpha_15(with_conj=True):
    """entmax15's generator from plain functions: f(u) = 4/3 (u^1.5 - 1.5 u + 0.5), f'(u) = 2 (sqrt u - 1),
    (f')^-1(v) = (v / 2 + 1)^2, f'' = 1 / sqrt u, and f*(v) = 2/3 (max(v / 2 + 1, 0)^3 - 1)."""
    conj = (lambda v: 2 / 3 * ((v / 2 + 1).clamp(min=0) ** 3 - 1)) if with_conj else None
    return FDivergence.from_functions(
        "custom15", lambda u: 4 / 3 * (u ** 1.5 - 1.5 * u + 0.5), lambda u: 2 * (u.sqrt() - 1),
        lambda v: (v / 2 + 1) ** 2, lambda u: 1 / u.sqrt(), conj=conj,
    )


def generator(spec):
    customs = {"custom": custom_alpha_15, "custom-no-conj": lambda: custom_alpha_15(False), "custom_chi2": lambda: custom_chi2()}
    return customs.get(spec, lambda: get_divergence(spec))()


@pytest.mark.parametrize("spec", GENERATORS + ["custom", "custom-no-conj"])
def test_generator_identities_against_f_and_autograd(spec):
    """Every method of a generator against f and f' alone (fp64): u = (f*)'(f'(u)), (f*)''(f'(u)) = 1 / f''(u)
    with f'' by autograd, f*(f'(u)) = u f'(u) - f(u) (Fenchel equality), the fused and Newton forms equal
    the plain ones, and the Jacobian weight is q / f''(p / q) on the support, 0 off it. Most of these
    methods are off the solver's hot path, so no solver test would see them drift."""
    div = generator(spec)
    u = torch.linspace(0.05, 4.0, 41, dtype=torch.float64).requires_grad_()
    fp = div.f_prime(u)
    (f2,) = torch.autograd.grad(fp.sum(), u)
    u, v = u.detach(), fp.detach()
    torch.testing.assert_close(div.conj_grad(v), u, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(div.conj_hess(v), 1 / f2, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(div.conj(v), u * v - div.f(u), atol=1e-9, rtol=1e-9)
    g, h = div.conj_grad_and_hess(v)
    torch.testing.assert_close(g, u, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(h, 1 / f2, atol=1e-9, rtol=1e-8)
    tau = torch.tensor([[0.0], [0.3]], dtype=torch.float64)
    z = v[None, :] + tau  # z - tau = v in both rows
    g2, h2 = div.newton_eval(div.newton_prepare(z), tau)
    torch.testing.assert_close(g2, u.expand(2, -1), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(h2, (1 / f2).expand(2, -1), atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(div.newton_eval_grad(div.newton_prepare(z), tau), u.expand(2, -1), atol=1e-9, rtol=1e-9)
    q = torch.linspace(0.2, 2.0, 41, dtype=torch.float64)
    on_support = torch.arange(41) > 0
    p = torch.where(on_support, u * q, 0.0)  # p / q = u, class 0 off the support
    torch.testing.assert_close(div.jacobian_weight(p, q), torch.where(on_support, q / f2, 0.0), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("spec", ["chi2", "alpha:1.5", "alpha:2", "alpha:3", "custom", "custom_chi2"])
def test_sparse_generators_are_zero_below_f_prime_at_zero(spec):
    """Below f'(0) the clip is active: (f*)' = (f*)'' = 0 and f* = -f(0) (p_j = 0 exactly)."""
    div = generator(spec)
    v = div.f_prime_zero - torch.tensor([0.0, 1e-3, 0.5, 7.0], dtype=torch.float64)  # from f'(0) itself down
    zero = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(div.conj_grad(v), zero, atol=0, rtol=0)
    torch.testing.assert_close(div.conj_hess(v), zero, atol=0, rtol=0)
    torch.testing.assert_close(div.conj_grad_and_hess(v)[1], zero, atol=0, rtol=0)
    torch.testing.assert_close(div.conj(v), torch.full((4,), -div.f_zero, dtype=torch.float64), atol=1e-12, rtol=0)


def test_custom_generators_are_equal_only_to_themselves():
    a, b = custom_alpha_15(), custom_alpha_15()
    assert a == a and a != b and hash(a) != hash(b)
    assert get_divergence("alpha:1.5") == get_divergence("entmax15") and get_divergence("js") != get_divergence("kl")


def custom_chi2():
    """Pearson chi2 from plain functions: f(u) = (u - 1)^2 / 2, f'(0) = -1 (sparse), f'' = 1 (finite at 0)."""
    return FDivergence.from_functions("custom_chi2", lambda u: (u - 1) ** 2 / 2, lambda u: u - 1, lambda v: v + 1,
                                      lambda u: torch.ones_like(u))


def test_custom_generator_with_finite_f_second_at_zero_is_zero_off_the_support():
    div = custom_chi2()
    v = torch.tensor([-3.0, -1.0, -0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(div.conj_grad(v), torch.tensor([0.0, 0.0, 0.5, 2.0], dtype=torch.float64), atol=0, rtol=0)
    torch.testing.assert_close(div.conj_hess(v), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64), atol=0, rtol=0)


def test_from_functions_explicit_values_and_errors():
    """f'(0) / f(0) given explicitly are used where the functions give NaN at 0; a NaN in either alone, or
    f(1) != 0, is a clear error."""
    f = lambda u: u * torch.log(u) - u + 1  # noqa: E731  (0 * log 0 = NaN in torch)
    f_prime = lambda u: torch.xlogy(u, u) / u  # noqa: E731  (0 / 0 = NaN at u = 0)
    div = FDivergence.from_functions("kl_nan_at_0", f, f_prime, torch.exp, lambda u: 1 / u, f_prime_zero=-math.inf,
                                     f_zero=1.0)
    assert div.f_prime_zero == -math.inf and div.f_zero == 1.0
    x = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(f_softargmax(x, div), torch.softmax(x, -1), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="f_zero= and f_prime_zero= explicitly"):
        FDivergence.from_functions("nan_fp0", lambda u: torch.xlogy(u, u) - u + 1, f_prime, torch.exp, lambda u: 1 / u)
    FDivergence.from_functions("within_tolerance", lambda u: (u - 1) ** 2 / 2 + 1e-9, lambda u: u - 1, lambda v: v + 1,
                               lambda u: torch.ones_like(u))  # |f(1)| <= 1e-9 is rounding, accepted
    with pytest.raises(ValueError, match=r"f\(1\) must be 0 \(got 0.5\)"):
        FDivergence.from_functions("shifted", lambda u: (u - 1) ** 2 / 2 + 0.5, lambda u: u - 1, lambda v: v + 1,
                                   lambda u: torch.ones_like(u))


def test_custom_generator_with_infinite_f_at_zero_drops_the_constant_like_reverse_kl():
    """f(u) = -log u + u - 1 from plain functions (f(0) = +inf) gives the built-in reverse-KL loss."""
    div = FDivergence.from_functions("rkl", lambda u: -torch.log(u) + u - 1, lambda u: 1 - 1 / u, lambda v: 1 / (1 - v),
                                     lambda u: 1 / u ** 2, f_prime_inf=1.0, f_prime_zero=-math.inf, f_zero=math.inf)
    x, t = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), torch.arange(5)
    torch.testing.assert_close(fdiv_loss(x, t, div, reduction="none"), fdiv_loss(x, t, "reverse_kl", reduction="none"),
                               atol=1e-10, rtol=1e-10)


def test_divergence_equality_is_type_and_name():
    class RenamedKL(KL):
        pass

    assert RenamedKL() != KL() and KL() == KL() and get_divergence("js") != get_divergence("kl")


POLE_FORMULAS = {  # (f*)'(v) written out, for v below the pole f'(+inf)
    "js": lambda v: math.exp(v) / (2 - math.exp(v)),
    "alpha:0.5": lambda v: (1 - 0.5 * v) ** (1 / -0.5),
    "alpha:0.25": lambda v: (1 - 0.75 * v) ** (1 / -0.75),
}


@pytest.mark.parametrize("spec", sorted(POLE_FORMULAS))
def test_arguments_at_or_above_the_pole_are_clipped_just_below_it(spec):
    """(f*)' has a pole at f'(+inf) for these generators: arguments at or above it are evaluated at
    pole - 1e-7 max(1, |pole|) (the formula there, written out), finite."""
    div = get_divergence(spec)
    pole = div.f_prime_inf
    v = torch.tensor([pole, pole + 1.0, 50.0], dtype=torch.float64)
    want = POLE_FORMULAS[spec](pole - 1e-7 * max(1.0, abs(pole)))
    torch.testing.assert_close(div.conj_grad(v), torch.full((3,), want, dtype=torch.float64), atol=0, rtol=1e-6)


@pytest.mark.parametrize("typo, meant", [("alpha1.5", "alpha:1.5"), ("alpha0.5", "alpha:0.5"), ("jss", "js"),
                                         ("jensen-shannon", "js")])
def test_unknown_divergence_names_the_closest_spec(typo, meant):
    with pytest.raises(ValueError, match=f"Did you mean '{meant}'"):
        get_divergence(typo)


@pytest.mark.parametrize("typo", ["zzz", "alpha0"])
def test_unknown_divergence_without_a_close_spec_suggests_none(typo):
    with pytest.raises(ValueError, match="unknown divergence") as err:
        get_divergence(typo)
    assert "Did you mean" not in str(err.value)


@pytest.mark.parametrize("spec", ["js", "kl", "alpha:1.5", "squared_hellinger", "reverse_kl"])
def test_scalar_reference_equals_the_same_constant_tensor(spec):
    """q = 0.3 as a number (scalar fast paths) and as a [V] tensor (general path) give the same p and loss."""
    x = 2 * torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.arange(6)
    q = torch.full((40,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(f_softargmax(x, spec, 0.3), f_softargmax(x, spec, q), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fdiv_loss(x, t, spec, 0.3, reduction="none"), fdiv_loss(x, t, spec, q, reduction="none"),
                               atol=1e-10, rtol=1e-9)


def test_f_softmax_keeps_the_leading_shape():
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = f_softmax(x, "kl")
    assert v.shape == (2, 3)
    torch.testing.assert_close(v, torch.logsumexp(x, -1) + 1 - 7, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "batched"])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_skipped_nonfinite_rows_get_zero_gradient_and_the_others_theirs(monkeypatch, backend, with_ignored):
    """skip_nonfinite: the NaN row's gradient is exactly 0, every other row's is p - e_c as without it."""
    monkeypatch.setenv("HF_FDIV_SOLVER", backend)
    x = 2 * torch.randn(8, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.arange(8)
    if with_ignored:
        t[1] = -100  # the solved rows are then an index list, not a slice
    bad = x.clone()
    bad[5, 3] = math.nan
    a = bad.clone().requires_grad_()
    fdiv_loss(a, t, "alpha:1.5", reduction="sum", skip_nonfinite=True).backward()
    clean = x.clone().requires_grad_()
    t_clean = t.clone()
    t_clean[5] = -100
    fdiv_loss(clean, t_clean, "alpha:1.5", reduction="sum").backward()
    assert bool((a.grad[5] == 0).all())
    torch.testing.assert_close(a.grad, clean.grad, atol=1e-12, rtol=0)


def test_causal_lm_loss_mean_over_one_target():
    logits = torch.randn(1, 4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([[-100, -100, 3, -100]])  # one target: position 1 predicts token 3
    got = causal_lm_fdiv_loss(logits, labels, divergence="kl")
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits[0, 1:2], labels[0, 2:3]), atol=1e-12, rtol=0)


def test_fdiv_loss_module_refuses_full_smoothing_and_prints_its_reference():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        FDivLoss("kl", label_smoothing=1.0)
    assert "reference=tensor, reduction='mean'" in repr(FDivLoss("kl", reference=torch.ones(3)))
    assert "reference='uniform'" in repr(FDivLoss("kl", reference="uniform"))


@pytest.mark.parametrize("spec", ["reverse_kl", "kl", "alpha:1.5"])
def test_soft_targets_with_zeros_equal_the_fp64_primal_oracle(spec):
    """Soft targets with zero entries: zero classes contribute nothing (no f(0) = +inf term for reverse KL)."""
    x = 2 * torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.softmax(torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7)), -1)
    y[:, :4] = 0
    y = y / y.sum(-1, keepdim=True)
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, y, spec, reduction="none")
    loss.sum().backward()
    ids = torch.arange(5)
    # the loss is linear in y for a fixed theta up to D_f(y, q); its gradient is p - y either way
    p = f_softargmax(x, spec)
    torch.testing.assert_close(a.grad, p - y, atol=1e-10, rtol=0)
    assert bool(torch.isfinite(loss).all())
    # value: l(theta, y) = l(theta, e_c) + <e_c - y, theta> + D_f(y, q) - D_f(e_c, q) (Fenchel-Young); with
    # generator f: D_f(y, 1) = sum_j f(y_j) over y_j > 0 plus f(0) per zero class (dropped when f(0) = inf)
    div = get_divergence(spec)
    f0 = 0.0 if math.isinf(div.f_zero) else div.f_zero

    def D(v):
        return torch.where(v > 0, div.f(torch.where(v > 0, v, 1.0)) - f0, 0.0).sum(-1)

    e = torch.nn.functional.one_hot(ids, 12).double()
    want = fdiv_loss(x, ids, spec, reduction="none") + ((e - y) * x).sum(-1) + D(y) - D(e)
    torch.testing.assert_close(loss.detach(), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["nan", "negative", "all_zero"])
@pytest.mark.parametrize("backend", ["chunked", "batched"])
def test_computed_reference_rows_are_checked(monkeypatch, backend, kind):
    """A RowProvider reference with one bad row (NaN, a negative entry, all zeros) is a ValueError; zero
    entries alone are fine (they exclude the class) and equal the same tensor reference."""
    monkeypatch.setenv("HF_FDIV_SOLVER", backend)
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t = torch.full((6,), 9)
    q = torch.rand(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.1
    q[:, 0] = 0  # a zero entry: class 0 excluded, fine
    torch.testing.assert_close(fdiv_loss_rows(x, t, RowProvider(lambda r: q[r]), get_divergence("alpha:1.5"))[0],
                               fdiv_loss(x, t, "alpha:1.5", q, reduction="none"), atol=1e-10, rtol=1e-10)
    bad = q.clone()
    bad[2] = {"nan": bad[2].index_fill(0, torch.tensor([4]), math.nan),
              "negative": bad[2].index_fill(0, torch.tensor([4]), -0.5),
              "all_zero": torch.zeros(10, dtype=torch.float64)}[kind]
    with pytest.raises(ValueError, match="a computed reference chunk has negative, NaN or inf entries, or an all-zero row"):
        fdiv_loss_rows(x, t, RowProvider(lambda r: bad[r]), get_divergence("alpha:1.5"))


def test_row_alpha_generator_equals_the_fixed_alpha_generators_row_by_row():
    """The learnable-alpha solver's per-row generator: each row's (f*)'' and Jacobian weight equal those of
    AlphaDivergence(alpha of that row)."""
    from hf_fdiv.divergences import AlphaDivergence
    from hf_fdiv.solver.learnable_alpha import RowAlpha

    alphas = [0.5, 1.25, 1.5, 2.0, 3.0]
    rows = RowAlpha(torch.tensor(alphas, dtype=torch.float64)[:, None], monotone=False)
    u = torch.linspace(0.05, 3.0, 25, dtype=torch.float64)
    q = torch.linspace(0.3, 1.7, 25, dtype=torch.float64)
    p = torch.where(torch.arange(25) > 0, u * q, 0.0)
    v = torch.stack([AlphaDivergence(a).f_prime(u) for a in alphas])
    want_h = torch.stack([AlphaDivergence(a).conj_hess(v[i]) for i, a in enumerate(alphas)])
    want_s = torch.stack([AlphaDivergence(a).jacobian_weight(p, q) for a in alphas])
    torch.testing.assert_close(rows.conj_hess(v), want_h, atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(rows.jacobian_weight(p.expand(5, -1), q), want_s, atol=1e-9, rtol=1e-8)


def test_logit_transform_out_of_place_equals_in_place_and_the_formula():
    from hf_fdiv.fused import LogitTransform

    z = 5 * torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    for transform, want in [(LogitTransform(0.5, 4.0), torch.tanh(z * 0.5 / 4.0) * 4.0), (LogitTransform(2.0, None), 2 * z),
                            (LogitTransform(), z)]:
        zz = z.clone().requires_grad_()
        out = transform.transformed(zz)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(transform.apply(z.clone()), want, atol=1e-12, rtol=1e-12)
        assert torch.equal(zz.detach(), z)  # out of place
        out.sum().backward()
        assert zz.grad is not None


@pytest.mark.parametrize("attrs, scale", [({"logit_scale": 0.25}, 0.25), ({"logits_scaling": 4.0}, 0.25),
                                          ({"logit_scale": 0.5, "logits_scaling": 2.0}, 0.25),
                                          ({"logit_scale": True, "logits_scaling": False}, 1.0),
                                          ({"logits_scaling": 0}, 1.0)])
def test_logit_transform_reads_cohere_and_granite_scales(attrs, scale):
    """Cohere multiplies the logits by ``logit_scale``, Granite divides them by ``logits_scaling``; booleans
    and a zero scaling are not scales."""
    from types import SimpleNamespace

    from hf_fdiv.fused import LogitTransform

    t = LogitTransform.from_config(SimpleNamespace(final_logit_softcapping=None, **attrs))
    assert t.scale == scale and t.softcap is None


@pytest.mark.skipif(not _TRITON_ON_CPU, reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")
def test_triton_loss_rows_the_kernel_does_not_certify_are_recomputed_exactly(monkeypatch):
    """With one Newton pass no row is certified: every row's loss and gradient come from the exact PyTorch
    path and equal the fp64 chunked solve; the loss keeps the logits' dtype (fp32)."""
    from hf_fdiv.solver import triton_kernels as tk

    g = torch.Generator().manual_seed(11)
    x, t = 2 * torch.randn(5, 301, generator=g), torch.randint(0, 301, (5,), generator=g)
    t[2] = -100
    monkeypatch.setenv("HF_FDIV_SOLVER", "chunked")
    ref = x.double().requires_grad_()
    want = fdiv_loss(ref, t, "alpha:1.5", reduction="none")
    want.sum().backward()
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    monkeypatch.setattr(tk, "DEFAULT_N_ITER_ALPHA", 1)
    a = x.clone().requires_grad_()
    got = fdiv_loss(a, t, "alpha:1.5", reduction="none")
    got.sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, ref.grad.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["chunked", "batched"])
def test_row_stats_equal_the_solution_and_mark_skipped_and_ignored_rows(monkeypatch, backend, fused):
    """return_stats: support = #{p > 0}, entropy = -sum p log p and pred = argmax of the logits, against
    f_softargmax of the same logits; a skipped (NaN) row has 0, 0, -1, not solved; an ignored row is
    not solved."""
    monkeypatch.setenv("HF_FDIV_SOLVER", backend)
    g = torch.Generator().manual_seed(12)
    h, W = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    t = torch.arange(8)
    t[2] = -100
    if fused:
        h[5, 0] = math.nan
        _, stats = fused_linear_fdiv_loss(h, W, t, "alpha:1.5", skip_nonfinite=True, return_stats=True)
    else:
        x = 3 * h @ W.T
        x[5, 0] = math.nan
        _, stats = fdiv_loss(x, t, "alpha:1.5", skip_nonfinite=True, return_stats=True)
    z = (h @ W.T if fused else 3 * h @ W.T)
    keep = torch.tensor([0, 1, 3, 4, 6, 7])
    p = f_softargmax(z[keep], "alpha:1.5")
    torch.testing.assert_close(stats.support[keep], (p > 0).sum(1).to(stats.support.dtype), atol=0, rtol=0)
    torch.testing.assert_close(stats.entropy[keep], -torch.xlogy(p, p).sum(1).to(stats.entropy.dtype), atol=1e-6, rtol=1e-6)
    assert torch.equal(stats.pred[keep], z[keep].argmax(1))
    assert float(stats.support[5]) == 0 and float(stats.entropy[5]) == 0 and int(stats.pred[5]) == -1
    assert stats.solved.tolist() == [True, True, False, True, True, False, True, True]
    assert stats.skipped.tolist() == [False] * 5 + [True, False, False]


# ------------------------------------------------------------------------ on-policy generation


def test_on_policy_completions_are_the_stock_sampler_from_the_same_prompts(tok, tmp_path):
    """lmbda > 0 replaces each completion by one the student samples: the prompt (the tokens before the
    row's first label; the whole row when it has none; at least one token) left-padded, sampled by
    ``model.generate`` at ``generation_temperature`` from the full distribution (top_k = 0, top_p = 1),
    cut after the first EOS. Oracle: the stock ``generate`` on prompts built here, from the same seed."""
    cfg = dict(SFT_COMMON, per_device_train_batch_size=4, max_steps=1, lmbda=1.0, max_new_tokens=24,
               generation_temperature=50.0)
    tr = FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1),
                                 processing_class=tok, args=FDivDistillationConfig(output_dir=str(tmp_path), **cfg),
                                 train_dataset=messages_dataset(4))
    batch = first_batch(tr)
    ids, labels, mask = batch["input_ids"], batch["labels"].clone(), batch["attention_mask"]
    labels[1] = -100  # no target: the whole row is the prompt
    labels[2, : int(mask[2].sum())] = ids[2, : int(mask[2].sum())]  # target from position 0: a 1-token prompt
    batch["labels"] = labels
    prompts = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        targets = [j for j in range(ids.shape[1]) if int(labels[i, j]) != -100]
        prompts.append(ids[i, : max(1, targets[0] if targets else n)].tolist())
    L = max(map(len, prompts))
    p_ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    p_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    model = tr.model
    for seed in range(3):
        torch.manual_seed(seed)
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=p_ids, attention_mask=p_mask, max_new_tokens=24, do_sample=True,
                                 temperature=50.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        new = tr._generate_on_policy(dict(batch))
        saw_eos = False
        for i, p in enumerate(prompts):
            completion = out[i, L:].tolist()
            if tok.eos_token_id in completion:
                completion = completion[: completion.index(tok.eos_token_id) + 1]
                saw_eos = saw_eos or len(completion) < 24
            n = len(p) + len(completion)
            assert new["input_ids"][i, :n].tolist() == p + completion
            assert new["labels"][i, :n].tolist() == [-100] * len(p) + completion
            assert bool((new["labels"][i, n:] == -100).all())
        if saw_eos:
            break
    assert saw_eos  # some completion stopped at an EOS before max_new_tokens
    # sampled, not greedy: four copies of one prompt do not all get the same completion
    same = dict(batch, input_ids=ids[[0] * 4], labels=batch["labels"][[0] * 4], attention_mask=mask[[0] * 4])
    torch.manual_seed(0)
    rows = tr._generate_on_policy(same)["input_ids"].tolist()
    assert len({tuple(r) for r in rows}) > 1


def test_add_teacher_topk_accepts_k_from_1_to_V(tok):
    """k = 1 stores the teacher's argmax and its log-probability (oracle: log_softmax of the teacher's
    own logits); k = 0 and k = V + 1 are refused."""
    from datasets import Dataset

    teacher = make_model(tok, hidden=32, seed=1)
    seqs = [tok("the cat sat.")["input_ids"], tok("hi")["input_ids"]]
    ds = add_teacher_topk(Dataset.from_dict({"input_ids": seqs}), teacher, k=1, pad_token_id=tok.pad_token_id)
    for s, ids, lps in zip(seqs, ds[TOPK_IDS], ds[TOPK_LOGPROBS]):
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=torch.tensor([s])).logits[0].double(), -1)
        assert [row[0] for row in ids] == lp.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor([row[0] for row in lps], dtype=torch.float64), lp.amax(-1),
                                   atol=1e-5, rtol=0)
    V = teacher.get_output_embeddings().weight.shape[0]
    for k in (0, V + 1):
        with pytest.raises(ValueError, match="k must be in"):
            add_teacher_topk(Dataset.from_dict({"input_ids": seqs}), teacher, k=k)


# ---- a tiny reference on the dominant class: the power tails' root next to the pole ------------------

@pytest.mark.parametrize("backend", ["chunked", "batched"])
@pytest.mark.parametrize("name,q0", [("reverse_kl", 1e-9), ("reverse_kl", 1e-8), ("alpha:0.25", 1e-12),
                                     ("squared_hellinger", 1e-9), ("alpha:0.5", 1e-10)])
def test_power_tail_with_a_tiny_reference_on_the_top_class(monkeypatch, backend, name, q0):
    # p_0 = q_0 / d_0^k with q_0 tiny puts the root within ~q_0^(1/k) of the pole (1.3e-9 for reverse KL
    # at q_0 = 1e-9): a guard that keeps d >= 1e-7 from the pole moved the mass elsewhere (p_0 = 0.04
    # instead of 0.75); fp64 resolves it, so the answer must be the fp64 bisection's (to 1e-6: one ulp
    # of tau is ~1e-7 of d there, for both)
    import oracles

    monkeypatch.setenv("HF_FDIV_SOLVER", backend)
    x = torch.tensor([[10.0, 0.0, -1.0, 0.5], [3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([q0, 1.0, 0.5, 1.0], dtype=torch.float64)
    want = oracles.reference_bisection(x, name, q=q)
    got = f_softargmax(x, name, reference=q)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["alpha:2.5", "alpha:3"])
@pytest.mark.parametrize("soft", [False, True], ids=["ids", "smoothed"])
def test_alpha_above_two_with_ignored_targets_on_low_precision_logits(name, dtype, soft):
    """alpha > 2 is solved in fp64 for fp32/bf16 logits; with ignored targets (the rows are then listed, not
    sliced) its fp64 losses must still land in the fp32 per-row vector (this raised a dtype error):
    each row's loss and gradient equal the fp64 loss of that row alone, and ignored rows give 0."""
    g = torch.Generator().manual_seed(11)
    x = (2 * torch.randn(6, 50, generator=g)).to(dtype)
    t = torch.randint(0, 50, (6,), generator=g)
    t[[1, 4]] = -100
    kw = {"label_smoothing": 0.1} if soft else {}
    xr = x.clone().requires_grad_()
    got = fdiv_loss(xr, t, name, reduction="none", **kw)
    got.sum().backward()
    valid = t != -100
    x64 = x[valid].double().requires_grad_()
    want = fdiv_loss(x64, t[valid], name, reduction="none", **kw)
    want.sum().backward()
    assert got.dtype == torch.float32 and bool((got[~valid] == 0).all()) and bool((xr.grad[~valid] == 0).all())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[valid].double(), want.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(xr.grad[valid].double(), x64.grad, atol=tol, rtol=tol)
