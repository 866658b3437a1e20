"""Triton kernels (hf_fdiv.triton_kernels) against the PyTorch path and independent oracles.

On a machine without a GPU the kernels run under Triton's CPU interpreter: TRITON_INTERPRET=1 must be
set before triton / the kernels module is imported (kernels are decorated at import), hence the
``setdefault`` below. Shapes are tiny (the interpreter runs every tile op in numpy): V = 300 with
BLOCK_V = 64 (five tiles, the last one partial) and the one-tile path (BLOCK_V = next_pow2(V) > V).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_fdiv import f_softargmax, fdiv_loss  # noqa: E402
from hf_fdiv.divergences import KL, AlphaDivergence, ChiSquare, JensenShannon, ReverseKL, get_divergence  # noqa: E402,E501
from hf_fdiv.solver import triton_kernels as tk  # noqa: E402

_INTERPRETED = type(tk._fdiv_newton_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if _INTERPRETED else "cuda"

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not _INTERPRETED and not torch.cuda.is_available(),
        reason="needs CUDA, or TRITON_INTERPRET=1 set before hf_fdiv.triton_kernels is first imported",
    ),
]

V = 300
IGNORE = -100

DIVS = {
    "kl": KL(),
    "alpha1.5": AlphaDivergence(1.5),
    "alpha2": AlphaDivergence(2.0),
    "alpha1.25": AlphaDivergence(1.25),
    "js": JensenShannon(),
}


def _q(qname, V=V):
    return 1.0 if qname == "unit" else 1.0 / V


def _batch(V=V, seed=0):
    """7 rows: random (two scales), very peaked (support 1 for sparse f), flat (support V), an ignored
    row, a nearly flat row and a row with masked (-inf) classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, V, generator=g)
    x[0] *= 2.0
    x[1] *= 0.5
    x[2] = torch.randn(V, generator=g)
    x[2, 17] += 40.0
    x[3] = 0.0
    x[4] *= 3.0
    x[5] = 0.01 * torch.randn(V, generator=g)
    x[6] *= 4.0
    x[6, 100:140] = -math.inf
    t = torch.tensor([5, V - 1, 17, 123, IGNORE, 0, 7])
    return x, t


def _ref_loss_and_grad(x, t, div, q):
    """The PyTorch path in fp64 (exact to ~1e-15 against entmax, see tests/test_solver.py)."""
    xr = x.detach().double().requires_grad_(True)
    loss = fdiv_loss(xr, t, div, q, ignore_index=IGNORE, reduction="none")
    loss.sum().backward()
    return loss.detach(), xr.grad


def _p_from_tau(x, tau, div, q):
    """p_j = q (f*)'(x_j - max x - tau) in fp64, from the kernel's tau (checks its convention)."""
    z = x.double() - x.double().amax(1, keepdim=True)
    return q * div.conj_grad(z - tau.double()[:, None])


# ---------------------------------------------------------------------------------------------
# loss + gradient against the fp64 PyTorch path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_v", [64, None], ids=["tiles64", "onetile"])
@pytest.mark.parametrize("qname", ["unit", "uniform"])
@pytest.mark.parametrize("name", list(DIVS))
def test_loss_grad_tau_support_match_reference(name, qname, block_v):
    div, q = DIVS[name], _q(qname)
    x, t = _batch()
    grad = torch.full(x.shape, float("nan"), device=DEVICE)
    loss, tau, supp, conv = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), div, q, IGNORE, grad=grad, block_v=block_v)
    loss, tau, supp, conv, grad = (a.cpu() for a in (loss, tau, supp, conv, grad))
    ref_loss, ref_grad = _ref_loss_and_grad(x, t, div, q)
    assert loss.dtype == torch.float32 and tau.dtype == torch.float32
    assert supp.dtype == torch.int32 and conv.dtype == torch.bool
    assert conv.all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)
    live = t != IGNORE
    assert (grad[~live] == 0).all() and (loss[~live] == 0).all()
    # support = number of p_j > 0, p = grad + e_c
    p_ref = ref_grad[live] + F.one_hot(t[live], V).double()
    assert supp[live].tolist() == (p_ref > 0).sum(1).tolist()
    if div.sparse and qname == "unit":
        assert supp[2] == 1  # peaked row
    assert supp[3] == V  # flat row
    assert supp[6] <= V - 40  # masked classes get p = 0
    # tau is the normaliser in max-shifted coordinates: it reproduces p
    p_tau = _p_from_tau(x[live], tau[live], div, q)
    torch.testing.assert_close(p_tau, p_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["kl", "alpha1.5", "js"])
def test_grad_in_place_into_logits(name):
    div, q = DIVS[name], 1.0
    x, t = _batch(seed=1)
    x = x.to(DEVICE)
    t = t.to(DEVICE)
    g_sep = torch.empty_like(x)
    loss_a, tau_a, supp_a, _ = tk.fy_loss_rows(x, t, div, q, IGNORE, grad=g_sep, block_v=64)
    xi = x.clone()
    loss_b, tau_b, supp_b, _ = tk.fy_loss_rows(xi, t, div, q, IGNORE, grad=xi, block_v=64)
    assert torch.equal(xi, g_sep)  # bit-identical: every tile is read before it is overwritten
    assert torch.equal(loss_a, loss_b) and torch.equal(tau_a, tau_b) and torch.equal(supp_a, supp_b)
    # one-tile path too
    xj = x.clone()
    tk.fy_loss_rows(xj, t, div, q, IGNORE, grad=xj)
    torch.testing.assert_close(xj, g_sep, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["kl", "alpha1.5", "alpha1.25", "js"])
def test_bf16_logits_and_gradient(name):
    div = DIVS[name]
    x, t = _batch(seed=2)
    xb = (2 * x).to(torch.bfloat16)
    x32 = xb.float()  # the oracle sees the bf16-rounded logits
    ref_loss, ref_grad = _ref_loss_and_grad(x32, t, div, 1.0)
    g32 = torch.empty(xb.shape, dtype=torch.float32, device=DEVICE)
    loss, _, _, conv = tk.fy_loss_rows(xb.to(DEVICE), t.to(DEVICE), div, 1.0, IGNORE, grad=g32, block_v=128)
    assert conv.all()
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(g32.cpu().double(), ref_grad, rtol=0, atol=2e-6)
    # bf16 gradient written in place into the bf16 logits: the fp32 gradient rounded once (to nearest on
    # GPU; Triton's interpreter truncates fp32 -> bf16), so within one bf16 ulp of it
    xi = xb.clone().to(DEVICE)
    tk.fy_loss_rows(xi, t.to(DEVICE), div, 1.0, IGNORE, grad=xi, block_v=128)
    diff = (xi.cpu().double() - g32.cpu().double()).abs()
    assert (diff <= 2.0**-7 * g32.cpu().double().abs()).all()


@pytest.mark.parametrize("spec,delta", [("kl", None), ("alpha:1.5", 1.935), ("alpha:2", 0.998),
                                        ("alpha:1.25", 3.288), ("js", None)])
def test_bf16_target_gradient_formed_in_fp32(spec, delta):
    """p_c close to 1: p_c - 1 must be formed in fp32 before the cast (Liger-Kernel PR #1329)."""
    x = torch.zeros(2, V)
    if delta is None:  # dense f: one large logit
        x[0, 3] = math.log(0.999 * (V - 1) / 0.001) if spec == "kl" else 12.0
        x[1, 3] = x[0, 3] + 0.5
    else:  # sparse f: a two-class support {3, 4} with p_3 ~ 0.999
        x[:] = -50.0
        x[:, 3] = 0.0
        x[0, 4] = -delta
        x[1, 4] = -0.999 * delta
    t = torch.tensor([3, 3])
    xb = x.to(torch.bfloat16)
    ref = f_softargmax(xb.double(), spec)[:, 3] - 1
    assert ((ref < -1e-4) & (ref > -1e-2)).all()  # the regime where bf16(p_c) - 1 is wrong
    g = torch.empty_like(xb, device=DEVICE)
    tk.fy_loss_rows(xb.to(DEVICE), t.to(DEVICE), spec, 1.0, grad=g, block_v=64)
    torch.testing.assert_close(g[:, 3].cpu().double(), ref, rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------------------------
# independent oracles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qname", ["unit", "uniform"])
def test_kl_is_cross_entropy(qname):
    x, t = _batch(seed=3)
    loss, tau, _, _ = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), "kl", _q(qname), IGNORE, block_v=64)
    ref = F.cross_entropy(x.double(), t, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-6, atol=1e-6)
    lse = torch.logsumexp(x.double() - x.double().amax(1, keepdim=True), 1) + math.log(_q(qname))
    live = t != IGNORE
    torch.testing.assert_close(tau.cpu().double()[live], lse[live], rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_entmax_losses(alpha):
    entmax = pytest.importorskip("entmax")
    x, t = _batch(seed=4)
    keep = (t != IGNORE) & torch.isfinite(x).all(1)
    x, t = x[keep], t[keep]
    loss, _, _, _ = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), AlphaDivergence(alpha), 1.0, block_v=64)
    oracle = entmax.entmax15_loss if alpha == 1.5 else entmax.sparsemax_loss
    ref = oracle(x.double(), t)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("block_v", [64, None], ids=["tiles64", "onetile"])
def test_softargmax_oracles(block_v):
    entmax = pytest.importorskip("entmax")
    x, _ = _batch(seed=5)
    x = x[torch.isfinite(x).all(1)]
    xd = x.to(DEVICE)
    cases = [
        ("kl", 1.0, torch.softmax(x.double(), 1)),
        ("kl", 1.0 / V, torch.softmax(x.double(), 1)),
        ("alpha:1.5", 1.0, entmax.entmax15(x.double(), dim=1)),
        # uniform q is a temperature of V^(alpha - 1) (docs: unit vs uniform reference)
        ("alpha:1.5", 1.0 / V, entmax.entmax15(x.double() / math.sqrt(V), dim=1)),
        ("alpha:2", 1.0, entmax.sparsemax(x.double(), dim=1)),
        ("alpha:2", 1.0 / V, entmax.sparsemax(x.double() / V, dim=1)),
        ("alpha:1.25", 1.0, f_softargmax(x.double(), "alpha:1.25")),
        ("js", 1.0, f_softargmax(x.double(), "js")),
        ("js", 1.0 / V, f_softargmax(x.double(), "js", 1.0 / V)),
    ]
    for spec, q, ref in cases:
        p, tau, conv = tk.softargmax_rows(xd, spec, q, block_v=block_v)
        assert p.dtype == x.dtype and conv.all(), spec
        torch.testing.assert_close(p.cpu().double(), ref, rtol=0, atol=1e-6, msg=f"{spec} q={q}")
        torch.testing.assert_close(p.sum(1).cpu().double(), torch.ones(len(x), dtype=torch.float64),
                                   rtol=0, atol=1e-6)
    # out= in place and in another dtype
    xi = xd.clone()
    p, _, _ = tk.softargmax_rows(xi, "alpha:1.5", 1.0, out=xi, block_v=block_v)
    assert p is xi
    torch.testing.assert_close(xi.cpu().double(), entmax.entmax15(x.double(), dim=1), rtol=0, atol=1e-6)
    ob = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    tk.softargmax_rows(xd, "js", 1.0, out=ob, block_v=block_v)
    torch.testing.assert_close(ob.cpu().double(), f_softargmax(x.double(), "js").bfloat16().double(),
                               rtol=0, atol=4e-3)


def test_js_kkt_certificate():
    """JS: p_j = q (f*)'(z_j - tau) with sum p = 1 from the returned tau, and f'(p_j / q) = z_j - tau."""
    x, _ = _batch(seed=6)
    x = x[torch.isfinite(x).all(1)]
    for q in (1.0, 1.0 / V):
        p, tau, conv = tk.softargmax_rows(x.to(DEVICE), JensenShannon(), q, block_v=64)
        p, tau = p.cpu().double(), tau.cpu().double()
        z = x.double() - x.double().amax(1, keepdim=True)
        lhs = JensenShannon().f_prime(p / q)
        torch.testing.assert_close(lhs, z - tau[:, None], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_p_from_tau(x, tau.float(), JensenShannon(), q).sum(1),
                                   torch.ones(len(x), dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_v", [64, None], ids=["tiles64", "onetile"])
@pytest.mark.parametrize("qname", ["unit", "uniform"])
@pytest.mark.parametrize("name", list(DIVS))
def test_softargmax_backward_is_vjp(name, qname, block_v):
    div, q = DIVS[name], _q(qname)
    x, _ = _batch(seed=7)
    x = x[torch.isfinite(x).all(1)]
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    xr = x.double().requires_grad_(True)
    p_ref = f_softargmax(xr, div, q)
    (dx_ref,) = torch.autograd.grad(p_ref, xr, go.double())
    p, _, _ = tk.softargmax_rows(x.to(DEVICE), div, q, block_v=block_v)
    dx = tk.softargmax_backward_rows(p, go.to(DEVICE), div, q, block_v=block_v)
    assert dx.dtype == go.dtype
    # the formula on the same fp32 p, in fp64 (tight), and the exact VJP (fp32 p limits the accuracy)
    p64, g64 = p.cpu().double(), go.double()
    s = div.jacobian_weight(p64, q)
    dx_formula = s * (g64 - (s * g64).sum(1, keepdim=True) / s.sum(1, keepdim=True))
    # fp32 rounding of <s, g> / sum(s) is amplified by s_j: JS with uniform q has s_argmax ~ 1 / q
    scale = float(s.abs().amax() * g64.abs().amax())
    torch.testing.assert_close(dx.cpu().double(), dx_formula, rtol=1e-5, atol=1e-6 * max(1.0, scale))
    torch.testing.assert_close(dx.cpu().double(), dx_ref, rtol=1e-3, atol=5e-5)



@pytest.mark.parametrize("candidates", [None, 16, 0], ids=["default", "16slots", "off"])
@pytest.mark.parametrize("spec", ["alpha:1.5", "alpha:2", "alpha:1.25"])
def test_candidate_pass_matches_reference_with_and_without_overflow(spec, candidates):
    """Sparse f on tiled rows: the Newton passes on the compacted candidates give the fp64 PyTorch results.
    With 16 slots the flat and nearly flat rows (support 300) overflow and take the row passes; the peaked
    and random rows fit."""
    div = DIVS[{"alpha:1.5": "alpha1.5", "alpha:2": "alpha2", "alpha:1.25": "alpha1.25"}[spec]]
    x, t = _batch(seed=11)
    for q in (1.0, 1.0 / V):
        grad = torch.full(x.shape, float("nan"), device=DEVICE)
        loss, tau, supp, conv = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), div, q, IGNORE, grad=grad, block_v=64,
                                                candidates=candidates)
        ref_loss, ref_grad = _ref_loss_and_grad(x, t, div, q)
        assert conv.all()
        torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=0, atol=2e-6)
        p, _, conv = tk.softargmax_rows(x.to(DEVICE), div, q, block_v=64, candidates=candidates)
        assert conv.all()
        torch.testing.assert_close(p.cpu().double(), f_softargmax(x.double(), div, q), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), div, 1.0, IGNORE, block_v=64, candidates=100)


# ---------------------------------------------------------------------------------------------
# flags, shapes, API
# ---------------------------------------------------------------------------------------------


def test_converged_flag_and_pass_cap():
    x, t = _batch(seed=9)
    x, t = x[[1, 2, 5]], t[[1, 2, 5]]
    loss, _, _, conv = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), "alpha:1.5", 1.0, n_iter=1, block_v=64)
    # the peaked row (support 1) is exact at tau_lo; the wide-support rows need more than one pass
    assert conv.cpu().tolist() == [False, True, False]
    p, _, conv = tk.softargmax_rows(x.to(DEVICE), "alpha:1.5", 1.0, n_iter=1, block_v=64)
    torch.testing.assert_close(p.sum(1).cpu().double(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    _, _, _, conv = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), "alpha:1.5", 1.0, block_v=64)
    assert conv.all()


def test_shapes_strides_and_small_vocab():
    # V < BLOCK_V, odd V; row stride != V (a column slice); a transposed (non-contiguous) input
    for Vs in (1, 3, 37):
        x = torch.randn(3, Vs)
        t = torch.randint(0, Vs, (3,))
        for spec in ("kl", "alpha:1.5", "js"):
            loss, _, _, conv = tk.fy_loss_rows(x.to(DEVICE), t.to(DEVICE), spec, 1.0)
            ref, _ = _ref_loss_and_grad(x, t, spec, 1.0)
            torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=2e-6)
            assert conv.all()
    big = torch.randn(4, V + 20)
    xs = big[:, :V]
    t = torch.tensor([0, 1, 2, V - 1])
    g = torch.empty(4, V, device=DEVICE)
    loss, _, _, _ = tk.fy_loss_rows(big.to(DEVICE)[:, :V], t.to(DEVICE), "alpha:1.25", 1.0, grad=g, block_v=64)
    ref, ref_g = _ref_loss_and_grad(xs, t, "alpha:1.25", 1.0)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(g.cpu().double(), ref_g, rtol=0, atol=2e-6)
    xt = torch.randn(V, 4).t()
    p, _, _ = tk.softargmax_rows(torch.randn(V, 4).to(DEVICE).t().copy_(xt), "kl", 1.0, block_v=64)
    torch.testing.assert_close(p.cpu(), torch.softmax(xt, 1), rtol=0, atol=1e-6)
    # empty batch, out-of-range class
    loss, tau, supp, conv = tk.fy_loss_rows(torch.empty(0, V, device=DEVICE),
                                            torch.empty(0, dtype=torch.long, device=DEVICE), "js")
    assert loss.shape == (0,) and conv.shape == (0,)
    loss, _, _, _ = tk.fy_loss_rows(torch.randn(2, 5, device=DEVICE), torch.tensor([1, 9], device=DEVICE), "js")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def test_supports_and_errors():
    assert tk.supports(KL(), 1.0) and tk.supports("kl", "uniform") and tk.supports(JensenShannon(), 0.5)
    assert tk.supports(AlphaDivergence(1.5), 1.0) and tk.supports("alpha:2", 1.0 / V)
    assert tk.supports(AlphaDivergence(1.01), 1.0) and tk.supports("entmax15") and tk.supports("sparsemax")
    assert not tk.supports(AlphaDivergence(2.5), 1.0)  # alpha > 2 needs fp64
    assert not tk.supports(AlphaDivergence(0.5), 1.0)
    assert not tk.supports(ChiSquare(), 1.0) and not tk.supports(ReverseKL(), 1.0)
    assert not tk.supports("squared_hellinger") and not tk.supports("not-a-divergence")
    assert not tk.supports(KL(), torch.ones(V)) and not tk.supports(KL(), 0.0) and not tk.supports(KL(), True)
    assert not tk.supports(KL(), float("inf")) and not tk.supports(KL(), "prior")
    assert tk.supports(KL(), 1.0, torch.zeros(2, 3, device=DEVICE))
    assert not tk.supports(KL(), 1.0, torch.zeros(2, 3, dtype=torch.float64, device=DEVICE))
    assert not tk.supports(KL(), 1.0, torch.zeros(3, device=DEVICE))
    x = torch.randn(2, 5, device=DEVICE)
    t = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError):
        tk.fy_loss_rows(x, t, AlphaDivergence(3.0))
    with pytest.raises(ValueError):
        tk.fy_loss_rows(x, t, "kl", torch.ones(5))
    with pytest.raises(ValueError):
        tk.fy_loss_rows(x, t[:1], "kl")
    with pytest.raises(ValueError):
        tk.fy_loss_rows(x, t, "kl", grad=torch.empty(2, 4, device=DEVICE))
    with pytest.raises(ValueError):
        tk.fy_loss_rows(x, t, "kl", block_v=48)
    with pytest.raises(ValueError):
        xt = torch.randn(5, 2, device=DEVICE).t()
        tk.fy_loss_rows(xt, t, "kl", grad=xt)


# --------------------------------------------------------------------------------- through the public API


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "alpha:1.25", "js"])
def test_public_api_on_the_triton_backend_matches_cpu_path(monkeypatch, name):
    g = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(7, 301, generator=g)).to(DEVICE)
    x[0] *= 0.01  # a flat row
    t = torch.randint(0, 301, (7,), generator=g).to(DEVICE)
    t[2] = IGNORE

    def run(dtype):
        a = x.to(dtype).clone().requires_grad_()
        loss = fdiv_loss(a, t, name, reduction="sum")
        loss.backward()
        b = x.to(dtype).clone().requires_grad_()
        p = f_softargmax(b, name, "uniform")
        (p * torch.linspace(-1, 1, 301, device=DEVICE, dtype=dtype)).sum().backward()
        return [v.double() for v in (loss.detach(), a.grad, p.detach(), b.grad)]

    monkeypatch.setenv("HF_FDIV_SOLVER", "chunked")
    want = run(torch.float64)  # the fp64 solve (the kernels are fp32-only: fp64 is never routed to them)
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    got = run(torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=2e-5)



@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js"])
def test_trainers_loss_rows_with_stats_rows_and_skipping_match_cpu_path(monkeypatch, name):
    """What the trainers call (fdiv_loss_rows with rows, return_stats, skip_nonfinite) runs the kernel on the
    triton backend and gives the CPU path's losses, gradients and metrics, including a skipped NaN row, a
    row left out of ``rows`` and one the kernel does not certify (one Newton pass)."""
    from hf_fdiv.losses import fdiv_loss_rows

    g = torch.Generator().manual_seed(13)
    x = (3 * torch.randn(6, 301, generator=g)).to(DEVICE)
    x[1, 5] = math.nan  # skipped
    x[4, :] = 0.0
    x[4, 9] = 0.5  # argmax 9; a wide support that one Newton pass does not certify
    x[5, 200] = x[5].max() + 1.0  # argmax 200 after a tie-free max
    t = torch.randint(0, 301, (6,), generator=g).to(DEVICE)
    rows = torch.tensor([0, 1, 3, 4, 5], device=DEVICE)  # row 2 left out

    def run(n_iter_alpha):
        monkeypatch.setattr(tk, "DEFAULT_N_ITER_ALPHA", n_iter_alpha)
        a = x.clone().requires_grad_()
        losses, stats = fdiv_loss_rows(a, t, 1.0, get_divergence(name), rows=rows, skip_nonfinite=True,
                                       return_stats=True)
        losses.sum().backward()
        return losses.detach(), a.grad, stats

    monkeypatch.setenv("HF_FDIV_SOLVER", "chunked")
    want = run(16)
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    calls = []
    kernel = tk.fy_loss_rows
    monkeypatch.setattr(tk, "fy_loss_rows", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    for n_iter in (16, 1):
        got = run(n_iter)
        assert calls.pop()["with_stats"] and not calls  # the kernel ran, once, for the metrics too
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=0)
        g_stats, w_stats = got[2], want[2]
        for field in ("support", "pred", "solved", "skipped"):
            assert torch.equal(getattr(g_stats, field), getattr(w_stats, field)), field
        torch.testing.assert_close(g_stats.entropy, w_stats.entropy, atol=2e-5, rtol=1e-5)
    assert want[2].pred.tolist()[4:] == [9, 200] and want[2].skipped.tolist()[1] and not want[2].solved[2]



@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js", "alpha:2"])
def test_fused_head_on_the_kernel_equals_the_fp64_materialised_loss(monkeypatch, name):
    """fused_linear_fdiv_loss on the triton backend: the kernel solves each token chunk (ignored tokens,
    a soft-capped head, chunks of 16 tokens), gives the materialised fp64 loss, gradients and metrics, also
    when a chunk has rows the kernel does not certify (one Newton pass: the exact re-solve)."""
    from hf_fdiv.fused import LogitTransform, fused_linear_fdiv_loss

    g = torch.Generator().manual_seed(14)
    N, H, V_ = 40, 8, 301
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V_, H, generator=g, dtype=torch.float64)
    t = torch.randint(0, V_, (N,), generator=g)
    t[::5] = IGNORE
    transform = LogitTransform(scale=0.5, softcap=6.0)
    a = [v.clone().requires_grad_() for v in (h, W)]
    z = torch.tanh(0.5 * (a[0] @ a[1].T) / 6.0) * 6.0
    want, want_stats = fdiv_loss(z, t, name, reduction="sum", return_stats=True)
    want.backward()
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    calls = []
    kernel = tk.fy_loss_rows
    monkeypatch.setattr(tk, "fy_loss_rows", lambda *args, **k: calls.append(1) or kernel(*args, **k))
    for n_iter_alpha in (16, 1):
        monkeypatch.setattr(tk, "DEFAULT_N_ITER_ALPHA", n_iter_alpha)
        c = [v.float().clone().requires_grad_() for v in (h, W)]
        got, stats = fused_linear_fdiv_loss(c[0], c[1], t, name, transform=transform, chunk_elements=16 * V_,
                                            return_stats=True)
        got.backward()
        assert len(calls) == 2 and calls.clear() is None  # 32 tokens in chunks of 16: the kernel ran twice
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-4, rtol=1e-5)
        for x_got, x_want in zip(c, a):
            torch.testing.assert_close(x_got.grad.double(), x_want.grad, atol=2e-5, rtol=1e-4)
        live = t != IGNORE
        assert torch.equal(stats.support[live], want_stats.support[live])
        assert torch.equal(stats.pred[live], want_stats.pred[live]) and torch.equal(stats.solved, live)
        torch.testing.assert_close(stats.entropy[live], want_stats.entropy[live].float(), atol=2e-5, rtol=1e-5)


def test_unconverged_and_nonfinite_rows_take_the_exact_path(monkeypatch):
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    g = torch.Generator().manual_seed(12)
    x = (2 * torch.randn(5, 301, generator=g)).to(DEVICE)
    t = torch.randint(0, 301, (5,), generator=g).to(DEVICE)
    want = fdiv_loss(x.double(), t, "alpha:1.5", reduction="none").float()
    # one Newton pass certifies no row: every row is recomputed exactly by the PyTorch path
    monkeypatch.setattr(tk, "DEFAULT_N_ITER_ALPHA", 1)
    got = fdiv_loss(x, t, "alpha:1.5", reduction="none")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x[3, 7] = math.nan
    with pytest.raises(ValueError, match="1 row"):
        fdiv_loss(x, t, "alpha:1.5")


@pytest.mark.parametrize("name", ["alpha:1.5", "alpha:2", "js"])
def test_rows_with_a_nan_or_inf_logit_are_not_certified(name):
    """The kernel's converged flag is False for a row with a NaN or +inf logit or with every logit at -inf
    (the operator's caller redoes exactly those rows with PyTorch, which raises; it does not scan p)."""
    x, _ = _batch(seed=13)
    x[1, 5], x[2, 9], x[6] = math.nan, math.inf, -math.inf
    _, _, conv = tk.softargmax_rows(x.to(DEVICE), name, 1.0, block_v=64)
    assert conv.cpu().tolist() == [True, False, False, True, True, True, False]
    _, _, conv = tk.softargmax_rows(x.to(DEVICE), name, 1.0)
    assert conv.cpu().tolist() == [True, False, False, True, True, True, False]
