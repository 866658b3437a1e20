"""Fenchel-Young losses: values against F.cross_entropy, entmax losses and an fp64 primal oracle;
gradients p - y; ignore_index, reductions, causal-LM shift, precision and error messages."""

import math

import entmax
import pytest
import torch
import torch.nn.functional as F

import hf_fdiv
from hf_fdiv import FDivLoss, FDivergence, causal_lm_fdiv_loss, f_softargmax, fdiv_loss, get_divergence

from oracles import primal_loss


def data(n=32, V=101, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, V, generator=g)).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    return x, t


# --------------------------------------------------------------------------------- KL = CE


@pytest.mark.parametrize("reference", ["unit", "uniform"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_equals_cross_entropy(reference, dtype, tol, reduction):
    x, t = data(dtype=dtype)
    t[::5] = -100
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = fdiv_loss(a, t, "kl", reference, reduction=reduction)
    lb = F.cross_entropy(b, t, reduction=reduction)
    torch.testing.assert_close(la.to(lb.dtype), lb, atol=tol, rtol=tol)
    (la.sum() if reduction == "none" else la).backward()
    (lb.sum() if reduction == "none" else lb).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0)


def test_kl_with_reference_is_logit_adjusted_cross_entropy():
    x, t = data()
    q = torch.rand(x.shape[-1], dtype=torch.float64) + 0.01
    torch.testing.assert_close(fdiv_loss(x, t, "kl", q), F.cross_entropy(x + q.log(), t), atol=1e-12, rtol=0)
    qpos = torch.rand(x.shape, dtype=torch.float64) + 0.01
    torch.testing.assert_close(fdiv_loss(x, t, "kl", qpos), F.cross_entropy(x + qpos.log(), t), atol=1e-12, rtol=0)


def test_kl_label_smoothing_and_soft_targets():
    x, t = data()
    eps = 0.1
    y = torch.full_like(x, eps / x.shape[-1]).scatter_add_(1, t[:, None], torch.full((x.shape[0], 1), 1 - eps, dtype=x.dtype))
    entropy = -(y * y.log()).sum(-1).mean()
    ce = F.cross_entropy(x, t, label_smoothing=eps)
    torch.testing.assert_close(fdiv_loss(x, t, "kl", label_smoothing=eps), ce - entropy, atol=1e-12, rtol=0)
    torch.testing.assert_close(fdiv_loss(x, y, "kl"), ce - entropy, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------- entmax losses


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_alpha_15_equals_entmax15_loss(scale):
    x, t = data(scale=scale)
    a = x.clone().requires_grad_()
    ref = entmax.Entmax15Loss(k=None, reduction="none")(x, t)
    loss = fdiv_loss(a, t, "alpha:1.5", reduction="none")
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(a.grad, entmax.entmax15(x, dim=-1) - F.one_hot(t, x.shape[-1]).double(), atol=1e-12, rtol=0)


def test_alpha_2_equals_sparsemax_loss():
    x, t = data()
    ref = entmax.SparsemaxLoss(k=None, reduction="none")(x, t)
    torch.testing.assert_close(fdiv_loss(x, t, "alpha:2", reduction="none"), ref, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------- generic f


ALL = ["kl", "alpha:1.5", "alpha:2", "chi2", "alpha:0.5", "alpha:1.25", "alpha:3", "js", "squared_hellinger", "reverse_kl"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ref_kind", ["unit", "uniform", "tensor"])
def test_value_equals_fp64_primal_oracle_and_gradient_is_p_minus_y(name, ref_kind):
    x, t = data(n=12, V=60, scale=2.0)
    V = x.shape[-1]
    q = {"unit": None, "uniform": torch.full((V,), 1.0 / V, dtype=torch.float64),
         "tensor": torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.1}[ref_kind]
    y = F.one_hot(t, V).double()
    ref, p_ref = primal_loss(x, y, name, q)
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, t, name, "unit" if q is None else q, reduction="none")
    if math.isinf(get_divergence(name).f_zero):
        # reverse KL: the infinite constant D_f(e_c, q) is dropped; compare up to that row constant
        fz = torch.zeros_like(ref)
        ref = ref  # primal_loss has inf - inf masked only where p = y = 0; recompute with dropped terms
        f = lambda u: -torch.log(u) + u - 1  # noqa: E731
        qq = torch.ones_like(x) if q is None else q.expand_as(x)
        dropped = (p_ref - y) * x - qq * torch.where(y > 0, -f(y / qq), torch.zeros_like(x)) - qq * f(p_ref / qq)
        ref = dropped.sum(-1) + fz
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-10)
    loss.sum().backward()
    torch.testing.assert_close(a.grad, p_ref - y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", [n for n in ALL if n != "reverse_kl"])
def test_loss_nonnegative_and_zero_at_target(name):
    x, t = data(n=16, V=40)
    assert bool((fdiv_loss(x, t, name, reduction="none") >= -1e-12).all())
    p = f_softargmax(x, name)
    zero = fdiv_loss(x, p, name, reduction="none")
    assert float(zero.abs().max()) < 1e-10
    # a soft target that is not p gives a positive loss, gradient p - y
    y = torch.softmax(torch.randn_like(x), -1)
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, y, name, reduction="sum")
    assert float(loss.detach()) > 0
    loss.backward()
    torch.testing.assert_close(a.grad, p - y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["alpha:1.5", "js", "kl", "alpha:1.25"])
def test_fp32_loss_at_lm_vocabulary_matches_fp64(name):
    x, t = data(n=8, V=32000, scale=3.0)
    l64 = fdiv_loss(x, t, name, reduction="none")
    l32 = fdiv_loss(x.float(), t, name, reduction="none")
    torch.testing.assert_close(l32.double(), l64, atol=1e-5, rtol=1e-6)


# --------------------------------------------------------------------------------- ignore / reductions


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(name, reduction):
    x, t = data(dtype=torch.float32)
    t[:] = -100
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, t, name, reduction=reduction)
    assert not bool(torch.isnan(loss).any())
    assert float(loss.abs().sum()) == 0.0
    loss.sum().backward()
    assert bool((a.grad == 0).all())


def test_ignored_rows_and_mean_reduction():
    x, t = data()
    t[3:9] = -100
    keep = t != -100
    full = fdiv_loss(x, t, "alpha:1.5", reduction="none")
    assert bool((full[~keep] == 0).all())
    torch.testing.assert_close(fdiv_loss(x, t, "alpha:1.5"), full[keep].mean(), atol=1e-14, rtol=0)
    torch.testing.assert_close(fdiv_loss(x[keep], t[keep], "alpha:1.5", reduction="sum"), full.sum(), atol=1e-12, rtol=0)
    # a custom ignore_index
    t2 = t.clone()
    t2[~keep] = 7_000
    torch.testing.assert_close(fdiv_loss(x, t2, "alpha:1.5", ignore_index=7_000), fdiv_loss(x, t, "alpha:1.5"))


def test_3d_logits_and_module():
    x, t = data(n=24)
    x3, t3 = x.reshape(2, 12, -1), t.reshape(2, 12)
    torch.testing.assert_close(fdiv_loss(x3, t3, "js", reduction="none"), fdiv_loss(x, t, "js", reduction="none").reshape(2, 12))
    module = FDivLoss("alpha:1.5", reduction="sum")
    torch.testing.assert_close(module(x3, t3), fdiv_loss(x, t, "alpha:1.5", reduction="sum"))
    assert "alpha:1.5" in repr(module)


def test_backward_after_the_graph_was_freed_raises_clearly():
    # retain_graph=True is supported (tests/test_backward_twice.py); a backward after one that freed the
    # graph finds the released buffer and says what to do.
    x, t = data(dtype=torch.float32)
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, t, reduction="sum")
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True to every backward but the last"):
        loss.backward()


# --------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js"])
def test_bf16_logits_gradient_formed_in_fp32(name):
    # Liger PR #1329: p_y - 1 must be formed in fp32 before rounding to bf16.
    x = torch.zeros(4, 64)
    x[:, 0] = 9.0  # p_0 close to 1
    xb = x.to(torch.bfloat16).requires_grad_()
    t = torch.zeros(4, dtype=torch.long)
    loss = fdiv_loss(xb, t, name, reduction="sum")
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16
    p = f_softargmax(xb.detach().float(), name)
    expect = (p - F.one_hot(t, 64).float()).to(torch.bfloat16)
    assert bool((xb.grad == expect).all())
    ref = fdiv_loss(xb.detach().float(), t, name, reduction="sum")
    assert abs(float(loss) - float(ref)) <= 1e-6


# --------------------------------------------------------------------------------- causal LM helper


def test_causal_lm_helper_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 50, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    for n in (None, 17, torch.tensor(17)):
        ref = ForCausalLMLoss(logits, labels, vocab_size=50, num_items_in_batch=n)  # upcasts to fp32
        got = causal_lm_fdiv_loss(logits.float(), labels, num_items_in_batch=n, divergence="kl")
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(
        causal_lm_fdiv_loss(logits, shift_labels=shift, divergence="alpha:1.5"),
        fdiv_loss(logits, shift, "alpha:1.5"),
    )


# --------------------------------------------------------------------------------- divergences


def test_spec_strings_and_objects():
    assert get_divergence("alpha:1").name == "kl"
    assert get_divergence("ALPHA:1.5") == get_divergence("entmax15")
    assert get_divergence("jensen_shannon").name == "js"
    d = get_divergence("alpha:0.5")
    assert get_divergence(d) is d
    assert get_divergence(hf_fdiv.KL).name == "kl"


def test_custom_divergence_from_functions_matches_builtin():
    kl2 = FDivergence.from_functions("my-kl", lambda u: torch.xlogy(u, u) - u + 1, torch.log, torch.exp, lambda u: 1 / u)
    x, t = data(n=8, V=30)
    torch.testing.assert_close(f_softargmax(x, kl2), torch.softmax(x, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(fdiv_loss(x, t, kl2), F.cross_entropy(x, t), atol=1e-12, rtol=0)
    a = 1.5
    ent = FDivergence.from_functions(
        "my-entmax",
        lambda u: (u**a - 1 - a * (u - 1)) / (a * (a - 1)),
        lambda u: (u ** (a - 1) - 1) / (a - 1),
        lambda v: (1 + (a - 1) * v) ** (1 / (a - 1)),
        lambda u: u ** (a - 2),
        f_prime_zero=-1 / (a - 1),
    )
    assert ent.sparse
    torch.testing.assert_close(f_softargmax(x, ent), entmax.entmax15(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(fdiv_loss(x, t, ent), fdiv_loss(x, t, "alpha:1.5"), atol=1e-12, rtol=0)


def test_subclassed_divergence():
    class Pearson(FDivergence):
        name = "pearson-by-hand"
        f_prime_zero = -2.0
        f_zero = 1.0

        def f(self, u):
            return (u - 1) ** 2

        def f_prime(self, u):
            return 2 * (u - 1)

        def conj_grad(self, v):
            return torch.clamp(1 + v / 2, min=0)

        def conj_hess(self, v):
            return (v > -2).to(v.dtype) / 2

    x, _ = data(n=5, V=40)
    torch.testing.assert_close(f_softargmax(x, Pearson()), entmax.sparsemax(x / 2, dim=-1), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------- errors


def test_errors_are_clear():
    x, t = data(n=4, V=10)
    with pytest.raises(ValueError, match=r"unknown divergence 'klx'. Known names:.*js, kl,.*alpha"):
        fdiv_loss(x, t, "klx")
    with pytest.raises(ValueError, match="alpha > 0"):
        get_divergence("alpha:-1")
    with pytest.raises(ValueError, match="alpha > 0"):
        get_divergence("alpha:0")
    with pytest.raises(ValueError, match="could not read alpha"):
        get_divergence("alpha:abc")
    with pytest.raises(ValueError, match="negative"):
        fdiv_loss(x, t, "kl", -torch.ones(10))
    q = torch.ones(4, 10)
    q[2] = 0
    with pytest.raises(ValueError, match="all zero"):
        f_softargmax(x, "alpha:1.5", q)
    with pytest.raises(ValueError, match=r"11 entries.*V=10"):
        fdiv_loss(x, t, "kl", torch.ones(11))
    with pytest.raises(ValueError, match="does not match"):
        fdiv_loss(x, t, "kl", torch.ones(3, 10))
    with pytest.raises(ValueError, match="unknown reference"):
        fdiv_loss(x, t, "kl", "unfiorm")
    bad = t.clone()
    bad[1] = 10
    with pytest.raises(ValueError, match=r"target id 10 is out of range for V=10.*ignore_index=-100"):
        fdiv_loss(x, bad)
    bad[1] = -3
    with pytest.raises(ValueError, match="out of range"):
        fdiv_loss(x, bad)
    with pytest.raises(ValueError, match=r"shape logits.shape\[:-1\]"):
        fdiv_loss(x, t[:3])
    with pytest.raises(ValueError, match="distribution must have the logits' shape"):
        fdiv_loss(x, torch.rand(4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to 1"):
        fdiv_loss(x, torch.rand(4, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        fdiv_loss(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fdiv_loss(x, t, label_smoothing=1.0)
    nan = x.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 row"):
        fdiv_loss(nan, t)
    masked = x.clone()
    masked[0, t[0]] = -math.inf
    with pytest.raises(ValueError, match="target class has logit -inf"):
        fdiv_loss(masked, t)
    with pytest.raises(ValueError, match="floating-point"):
        f_softargmax(torch.ones(3, 4, dtype=torch.long))
