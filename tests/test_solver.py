"""f-softargmax and f-softmax against independent oracles (torch.softmax, entmax, fp64 bisection)."""

import math

import entmax
import pytest
import torch

import hf_fdiv
from hf_fdiv import f_softargmax, f_softmax, get_divergence

from oracles import kkt_residual, reference_bisection


def logits(n=16, V=257, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, V, generator=g)).to(dtype)


# --------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("reference", ["unit", "uniform"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_kl_equals_softmax(reference, dtype, tol):
    x = logits(dtype=dtype)
    p = f_softargmax(x, "kl", reference)
    torch.testing.assert_close(p, torch.softmax(x, -1), atol=tol, rtol=0)


def test_kl_with_reference_tensor_equals_shifted_softmax():
    x = logits()
    q = torch.rand(x.shape[-1], dtype=torch.float64) + 0.01
    torch.testing.assert_close(f_softargmax(x, "kl", q), torch.softmax(x + q.log(), -1), atol=1e-12, rtol=0)
    qpos = torch.rand(x.shape, dtype=torch.float64) * 3  # per-position, unnormalised
    torch.testing.assert_close(f_softargmax(x, "kl", qpos), torch.softmax(x + qpos.log(), -1), atol=1e-12, rtol=0)


def test_kl_value_is_logsumexp_plus_constant():
    x = logits()
    V = x.shape[-1]
    torch.testing.assert_close(f_softmax(x, "kl"), torch.logsumexp(x, -1) + 1 - V, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------- entmax family


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_alpha_15_unit_equals_entmax15(scale):
    x = logits(scale=scale)
    torch.testing.assert_close(f_softargmax(x, "alpha:1.5"), entmax.entmax15(x, dim=-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_alpha_2_unit_equals_sparsemax(scale):
    x = logits(scale=scale)
    torch.testing.assert_close(f_softargmax(x, "alpha:2"), entmax.sparsemax(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(f_softargmax(x, "sparsemax"), entmax.sparsemax(x, dim=-1), atol=1e-12, rtol=0)


def test_chi2_unit_equals_sparsemax_half():
    x = logits()
    torch.testing.assert_close(f_softargmax(x, "chi2"), entmax.sparsemax(x / 2, dim=-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_uniform_reference_is_entmax_at_temperature(alpha):
    x = logits(n=8, V=300)
    V = x.shape[-1]
    p = f_softargmax(x, f"alpha:{alpha}", "uniform")
    scaled = x / V ** (alpha - 1)
    if alpha == 1.5:
        ref = entmax.entmax15(scaled, dim=-1)
    elif alpha == 2.0:
        ref = entmax.sparsemax(scaled, dim=-1)
    else:
        ref = entmax.entmax_bisect(scaled, alpha=alpha, dim=-1, n_iter=200)
    torch.testing.assert_close(p, ref, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------- generic f


GENERIC = ["alpha:0.5", "alpha:1.25", "alpha:3", "js", "squared_hellinger", "reverse_kl"]


@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("ref_kind", ["unit", "tensor"])
def test_generic_equals_reference_bisection_and_kkt(name, ref_kind):
    x = logits(n=12, V=200, scale=2.0)
    q = None
    if ref_kind == "tensor":
        q = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.05
    p = f_softargmax(x, name, "unit" if q is None else q)
    ref = reference_bisection(x, name, q)
    torch.testing.assert_close(p, ref, atol=1e-10, rtol=0)
    assert kkt_residual(p, x, name, q) < 1e-8


@pytest.mark.parametrize("name", GENERIC + ["kl", "chi2", "alpha:1.5", "alpha:2"])
def test_fp32_accuracy_against_fp64(name):
    x = logits(n=32, V=4096, scale=3.0)
    p32 = f_softargmax(x.float(), name)
    p64 = f_softargmax(x, name)
    assert float((p32.double() - p64).abs().max()) <= 1e-6
    assert float((p32.sum(-1) - 1).abs().max()) <= 1e-6
    assert bool((p32 >= 0).all())


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js", "chi2", "reverse_kl", "alpha:0.5", "alpha:3"])
def test_shift_invariance(name):
    # logits on a 2^-10 grid so that x + 37.5 is exact in fp32 (else the inputs themselves differ)
    x = torch.round(logits(dtype=torch.float32) * 1024) / 1024
    torch.testing.assert_close(f_softargmax(x + 37.5, name), f_softargmax(x, name), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js", "alpha:3", "squared_hellinger"])
def test_value_matches_dual_form_and_gradient_is_p(name):
    x = logits(n=6, V=50).requires_grad_()
    div = get_divergence(name)
    v = f_softmax(x, name)
    p = f_softargmax(x.detach(), name)
    # Dual: tau + sum_j f*(theta_j - tau) with tau from the oracle p (any support index).
    ref_p = reference_bisection(x.detach(), name)
    j = ref_p.argmax(-1, keepdim=True)
    tau = x.detach().gather(-1, j) - div.f_prime(ref_p.gather(-1, j))
    dual = tau.squeeze(-1) + div.conj(x.detach() - tau).sum(-1)
    torch.testing.assert_close(v.detach(), dual, atol=1e-9, rtol=1e-12)
    v.sum().backward()
    torch.testing.assert_close(x.grad, p, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "name,reference",
    [
        ("kl", "unit"),
        ("alpha:1.5", "unit"),
        ("alpha:1.5", "uniform"),
        ("alpha:2", "unit"),
        ("alpha:1.25", "tensor"),
        ("js", "tensor"),
        ("squared_hellinger", "unit"),
        ("reverse_kl", "uniform"),
        ("alpha:0.5", "unit"),
        ("alpha:3", "unit"),
        ("chi2", "tensor"),
    ],
)
def test_gradcheck(name, reference):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    ref = torch.rand(7, generator=g, dtype=torch.float64) + 0.2 if reference == "tensor" else reference
    assert torch.autograd.gradcheck(lambda t: f_softargmax(t, name, ref), (x,), eps=1e-6, atol=1e-7)


def test_gradient_through_dim_and_3d():
    x = logits(n=24, V=9).reshape(2, 12, 9).transpose(1, 2).contiguous().requires_grad_()  # [2, 9, 12], dim=1
    assert torch.autograd.gradcheck(lambda t: f_softargmax(t, "alpha:1.5", dim=1), (x,), eps=1e-6, atol=1e-7)
    p = f_softargmax(x, "alpha:1.5", dim=1)
    torch.testing.assert_close(p, entmax.entmax15(x, dim=1), atol=1e-12, rtol=0)


def test_sparse_backward_compact_equals_dense_formula():
    # Compact (support-only) backward vs the dense closed-form VJP on the same p.
    x = logits(n=40, V=3000, scale=4.0).requires_grad_()
    gout = torch.randn_like(x)
    p = f_softargmax(x, "alpha:1.5")
    p.backward(gout)
    s = p.detach() ** 0.5
    ref = s * (gout - (s * gout).sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
    torch.testing.assert_close(x.grad, ref, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["alpha:1.5", "alpha:2", "kl", "js", "alpha:1.25"])
def test_low_precision_rows_near_minus_1000(dtype, name):
    # entmax#30: bf16 bisection gives NaN for rows around -1000. We solve in fp32.
    g = torch.Generator().manual_seed(0)
    x = (-1000 + torch.randn(8, 128, generator=g)).to(dtype)
    p = f_softargmax(x, name)
    assert p.dtype == dtype
    assert not bool(torch.isnan(p).any())
    p32 = f_softargmax(x.float(), name)
    # same rounded logits, fp32 solve: equal up to the output rounding of p itself
    torch.testing.assert_close(p.float(), p32.to(dtype).float(), atol=1e-6, rtol=0)
    loss = hf_fdiv.fdiv_loss(x.float(), torch.zeros(8, dtype=torch.long), name)
    loss_lp = hf_fdiv.fdiv_loss(x, torch.zeros(8, dtype=torch.long), name)
    assert abs(float(loss_lp) - float(loss)) <= 1e-6 * max(1.0, abs(float(loss)))


# --------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "alpha:2", "js", "reverse_kl", "alpha:0.5", "squared_hellinger"])
def test_minus_inf_entries_are_excluded(name):
    x = logits(n=4, V=20)
    x[:, :5] = -math.inf
    p = f_softargmax(x, name)
    assert bool((p[:, :5] == 0).all())
    torch.testing.assert_close(p[:, 5:], f_softargmax(x[:, 5:], name), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js", "chi2", "reverse_kl"])
def test_zero_reference_excludes_class(name):
    x = logits(n=4, V=20)
    q = torch.ones(20, dtype=torch.float64)
    q[3] = 0
    p = f_softargmax(x, name, q)
    assert bool((p[:, 3] == 0).all())
    keep = torch.arange(20) != 3
    torch.testing.assert_close(p[:, keep], f_softargmax(x[:, keep], name), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js", "chi2", "alpha:3"])
def test_single_class(name):
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    p = f_softargmax(x, name)
    assert bool((p == 1).all())
    p.sum().backward()
    assert bool((x.grad == 0).all())


def test_ties_at_the_threshold():
    # sparsemax of (1, 0, 0, ...) puts the runners-up exactly at the threshold (p = 0).
    x = torch.zeros(3, 10, dtype=torch.float64)
    x[:, 0] = 1.0
    x[1, 1] = 1.0  # a tie at the top
    for name, oracle in [("alpha:2", entmax.sparsemax), ("alpha:1.5", entmax.entmax15)]:
        p = f_softargmax(x, name)
        torch.testing.assert_close(p, oracle(x, dim=-1), atol=1e-12, rtol=0)
    # all-equal rows: uniform
    u = f_softargmax(torch.zeros(2, 7), "alpha:1.5")
    torch.testing.assert_close(u, torch.full((2, 7), 1 / 7), atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", ["alpha:1.5", "alpha:2", "alpha:3", "js", "kl", "alpha:1.25"])
def test_peaked_rows(name):
    # entmax PR #32: peaked rows (1000 randn), large alpha.
    x = logits(n=16, V=500, scale=1000.0, dtype=torch.float32)
    p = f_softargmax(x, name)
    assert not bool(torch.isnan(p).any())
    assert float((p.sum(-1) - 1).abs().max()) <= 1e-6
    top = x.argmax(-1)
    assert bool((p.gather(-1, top[:, None]) > 0.999).all())


@pytest.mark.parametrize("alpha", [1.001, 0.999, 1.01])
def test_alpha_close_to_one(alpha):
    x = logits(n=8, V=100, scale=2.0)
    p = f_softargmax(x, f"alpha:{alpha}")
    ref = reference_bisection(x, f"alpha:{alpha}")
    torch.testing.assert_close(p, ref, atol=1e-9, rtol=0)
    # and it is close to softmax
    assert float((p - torch.softmax(x, -1)).abs().max()) < 0.05


def test_chunking_does_not_change_results():
    from hf_fdiv.solver.chunked import solve_rows_chunked

    x = logits(n=37, V=301, scale=2.0, dtype=torch.float32)
    for name in ["alpha:1.5", "js", "kl"]:
        div = get_divergence(name)
        full = f_softargmax(x, name)
        out = torch.empty_like(x)
        sizes = [sol.x_rows.shape[0] for sol in solve_rows_chunked(x, 1.0, div, out=out, chunk_elements=301 * 4)]
        assert sizes == [4] * 9 + [1]  # the chunk size was honoured: ten chunks ran
        # equal up to the fp32 budget: a chunk stops iterating when all its rows have converged
        torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
        for i in range(0, 37, 9):  # row order / batch composition does not matter either
            torch.testing.assert_close(f_softargmax(x[i : i + 1], name)[0], full[i], atol=1e-6, rtol=0)


def test_sparse_fallback_paths_exact():
    # flat rows defeat the top-K guess (support > 32): the widened and the dense paths kick in.
    x = logits(n=6, V=4000, scale=0.05)
    for name in ["alpha:1.5", "alpha:2", "alpha:1.25"]:
        p = f_softargmax(x, name)
        ref = reference_bisection(x, name)
        torch.testing.assert_close(p, ref, atol=1e-10, rtol=0)
        assert int((p > 0).sum(-1).min()) > 32


def test_uniform_reference_large_vocab_fp32():
    x = logits(n=4, V=32768, scale=3.0, dtype=torch.float32)
    p = f_softargmax(x, "alpha:1.5", "uniform")
    ref = entmax.entmax15(x.double() / 32768 ** 0.5, dim=-1)
    assert float((p.double() - ref).abs().max()) <= 1e-6
