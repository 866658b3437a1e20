"""A learnable alpha (divergence=alpha_tensor): values, closed-form alpha gradients, errors.

Oracles: the fixed-alpha path (``"alpha:a"`` specs), ``entmax.entmax_bisect`` with a tensor alpha (values
and alpha gradients), finite differences (``torch.autograd.gradcheck`` in fp64) and the alpha -> 1 limit
of d p / d alpha computed by hand (softmax: d p_j / d alpha = -p_j L_j^2 / 2 + p_j sum_k p_k L_k^2 / 2).
"""

import pytest
import torch

from hf_fdiv import f_softargmax, fdiv_loss
from hf_fdiv.losses import FDivLoss

entmax = pytest.importorskip("entmax")

ALPHAS = [1.5, 1.001, 1.01, 1.99, 2.0, 1.25, 2.5, 0.5, 0.95, 0.2]


@pytest.fixture(params=["chunked", "batched"])
def backend(request, monkeypatch):
    monkeypatch.setenv("HF_FDIV_SOLVER", request.param)
    return request.param


def _x(n=5, V=9, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, V, generator=g)).to(dtype)


def _row_alpha(a0, n=5, dtype=torch.float64):
    """One alpha per row around a0 (on the same side of 1)."""
    step = 0.004 if abs(a0 - 1) < 0.05 else 0.03
    sign = 1 if a0 > 1 else -1
    return (a0 + sign * step * torch.arange(n, dtype=dtype) / n).requires_grad_()


# --------------------------------------------------------------------------------- values


@pytest.mark.parametrize("a0", [1.5, 1.01, 2.0, 2.5, 0.5])
@pytest.mark.parametrize("reference", ["unit", "uniform", "prior"])
def test_equals_the_fixed_alpha_path(backend, a0, reference):
    x = _x()
    V = x.shape[1]
    q = torch.linspace(0.2, 2.0, V, dtype=torch.float64) if reference == "prior" else reference
    alpha = torch.tensor(a0, dtype=torch.float64)
    spec = f"alpha:{a0}"
    torch.testing.assert_close(f_softargmax(x, alpha, q), f_softargmax(x, spec, q), rtol=0, atol=1e-12)
    t = torch.randint(0, V, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    t[0] = -100
    y = torch.softmax(_x(seed=2), -1)
    for target, kw in ((t, {}), (y, {}), (t, {"label_smoothing": 0.1})):
        ours = fdiv_loss(x, target, alpha, q, reduction="none", **kw)
        ref = fdiv_loss(x, target, spec, q, reduction="none", **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("a0", [1.5, 1.01, 1.99, 2.0, 1.25, 2.5])
def test_matches_entmax_bisect_values_and_alpha_gradients(backend, a0):
    x = _x(n=6, V=12)
    alpha = _row_alpha(a0, n=6)
    g = torch.randn(6, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xa = x.clone().requires_grad_()
    p = f_softargmax(xa, alpha)
    da, dx = torch.autograd.grad((p * g).sum(), (alpha, xa))
    alpha_e = alpha.detach().clone()[:, None].requires_grad_()
    xe = x.clone().requires_grad_()
    pe = entmax.entmax_bisect(xe, alpha_e, n_iter=200)
    da_e, dx_e = torch.autograd.grad((pe * g).sum(), (alpha_e, xe))
    torch.testing.assert_close(p, pe, rtol=0, atol=1e-12)
    torch.testing.assert_close(da, da_e.squeeze(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dx, dx_e, rtol=1e-8, atol=1e-10)


def test_per_head_alpha_matches_entmax_bisect():
    """[B, H, T, V] attention-like logits with alpha [H, 1] (one alpha per head), fp32."""
    B, H, T, V = 2, 3, 4, 10
    x = torch.randn(B, H, T, V, generator=torch.Generator().manual_seed(4))
    alpha = torch.tensor([[1.2], [1.5], [1.9]], requires_grad=True)
    p = f_softargmax(x, alpha)
    p.pow(2).sum().backward()
    alpha_e = alpha.detach().clone().view(1, H, 1, 1).requires_grad_()
    pe = entmax.entmax_bisect(x, alpha_e, n_iter=100)
    pe.pow(2).sum().backward()
    torch.testing.assert_close(p, pe, rtol=0, atol=2e-6)
    torch.testing.assert_close(alpha.grad, alpha_e.grad.view(H, 1), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("a0", ALPHAS)
@pytest.mark.parametrize("reference", ["unit", "uniform", "prior"])
def test_gradcheck_operator(backend, a0, reference):
    x = _x().requires_grad_()
    V = x.shape[1]
    q = torch.linspace(0.2, 2.0, V, dtype=torch.float64) if reference == "prior" else reference
    alpha = _row_alpha(a0)
    assert torch.autograd.gradcheck(lambda x_, a_: f_softargmax(x_, a_, q), (x, alpha))


@pytest.mark.parametrize("a0", ALPHAS)
@pytest.mark.parametrize("targets", ["ids", "soft", "smoothed"])
def test_gradcheck_loss(backend, a0, targets):
    x = _x().requires_grad_()
    n, V = x.shape
    alpha = _row_alpha(a0)
    t = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    t[3] = -100
    y = torch.softmax(_x(seed=2), -1)
    target, kw = {"ids": (t, {}), "soft": (y, {}), "smoothed": (t, {"label_smoothing": 0.2})}[targets]
    assert torch.autograd.gradcheck(lambda x_, a_: fdiv_loss(x_, target, a_, reduction="none", **kw), (x, alpha))


@pytest.mark.parametrize("shape", [(), (1,), (2, 1)])
def test_gradcheck_scalar_and_per_head_alpha(shape):
    x = torch.randn(3, 2, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    alpha = torch.full(shape, 1.4, dtype=torch.float64)
    if shape == (2, 1):
        alpha = torch.tensor([[1.3], [1.8]], dtype=torch.float64)
    alpha.requires_grad_()
    t = torch.randint(0, 7, (3, 2, 4), generator=torch.Generator().manual_seed(6))
    assert torch.autograd.gradcheck(lambda x_, a_: f_softargmax(x_, a_), (x, alpha))
    assert torch.autograd.gradcheck(lambda x_, a_: fdiv_loss(x_, t, a_), (x, alpha))


def test_the_loss_alpha_gradient_is_the_envelope_formula():
    """d loss / d alpha = d/d alpha D_alpha(y) - d/d alpha D_alpha(p) at fixed p: compared with autograd
    through the explicit D_alpha of the fixed p, y (no solver)."""
    x = _x()
    a0 = 1.37
    alpha = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(_x(seed=7), -1)
    (g,) = torch.autograd.grad(fdiv_loss(x, y, alpha, reduction="sum"), alpha)
    p = f_softargmax(x, f"alpha:{a0}").detach()
    a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    D = lambda u: ((u**a - 1 - a * (u - 1)) / (a * (a - 1))).sum()  # noqa: E731  (unit q)
    (expected,) = torch.autograd.grad(D(y) - D(p), a)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------- near alpha = 1


@pytest.mark.parametrize("side", [1, -1])
def test_alpha_gradient_tends_to_the_softmax_limit(side):
    x = _x()
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    alpha = torch.tensor(1.0 + side * 1e-7, dtype=torch.float64, requires_grad=True)
    (da,) = torch.autograd.grad((f_softargmax(x, alpha) * g).sum(), alpha)
    p = torch.softmax(x, -1)
    L2 = torch.log(p) ** 2
    dp = -p * L2 / 2 + p * (p * L2).sum(1, keepdim=True) / 2
    torch.testing.assert_close(da, (dp * g).sum(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("a0", [1 + 2e-5, 1 - 2e-5, 1.001, 0.999, 1.02])
def test_fp32_alpha_gradient_near_one_is_accurate(a0):
    """The closed forms divide by (alpha - 1)^2 (or by -b log u for expm1-based ones); the
    series-evaluated ones keep fp32 accurate as alpha -> 1."""
    a0 = float(torch.tensor(a0, dtype=torch.float32))  # the same alpha in both dtypes
    x = _x(n=8, V=50, scale=1.0)
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.softmax(_x(n=8, V=50, seed=3), -1)
    grads = []
    for dtype in (torch.float32, torch.float64):
        alpha = torch.tensor(a0, dtype=dtype, requires_grad=True)
        (d_op,) = torch.autograd.grad((f_softargmax(x.to(dtype), alpha) * g.to(dtype)).sum(), alpha)
        (d_loss,) = torch.autograd.grad(fdiv_loss(x.to(dtype), y.to(dtype), alpha, reduction="sum"), alpha)
        grads.append(torch.stack([d_op, d_loss]).double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- training use


def test_retain_graph_and_module_with_a_parameter():
    x = _x().requires_grad_()
    t = torch.randint(0, x.shape[1], (x.shape[0],))
    raw = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    alpha = 1 + torch.nn.functional.softplus(raw) + 1e-3
    loss = fdiv_loss(x, t, alpha)
    loss.backward(retain_graph=True)
    once = (x.grad.clone(), raw.grad.clone())
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once[0])
    torch.testing.assert_close(raw.grad, 2 * once[1])
    # the module holds a learnable alpha as its parameter and forwards it
    param = torch.nn.Parameter(torch.tensor(1.6, dtype=torch.float64))
    module = FDivLoss(divergence=param)
    assert any(p is param for p in module.parameters()) and "learnable alpha" in repr(module)
    torch.testing.assert_close(module(x, t), fdiv_loss(x, t, param))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(fdiv_loss(x, t, alpha), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(f_softargmax(x, alpha).pow(2).sum(), alpha, create_graph=True)


def test_learning_alpha_moves_it_towards_the_data():
    """Targets drawn from a sparse alpha = 1.8 model: gradient steps on alpha from 1.3 move it up."""
    torch.manual_seed(0)
    x = 2 * torch.randn(256, 20, dtype=torch.float64)
    y = f_softargmax(x, "alpha:1.8")
    raw = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        fdiv_loss(x, y, raw).backward()
        opt.step()
    assert 1.6 < raw.item() < 2.0


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "alpha,match",
    [
        (torch.tensor(0.0), "alpha must be > 0"),
        (torch.tensor([1.5, -0.5, 1.2]), "alpha must be > 0"),
        (torch.tensor(1.0), "divergence='kl'"),
        (torch.tensor([1.5, 1.0, 2.0]), "alpha = 1 exactly"),
        (torch.tensor(float("nan")), "NaN or inf"),
        (torch.tensor([1.5, float("inf"), 1.2]), "NaN or inf"),
        (torch.tensor([1, 2, 3]), "floating-point"),
        (torch.tensor([1.5, 1.2]), "does not broadcast"),
    ],
)
def test_invalid_alpha_errors_say_what_to_do(alpha, match):
    x = torch.randn(3, 6)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=match):
        f_softargmax(x, alpha)
    with pytest.raises(ValueError, match=match):
        fdiv_loss(x, t, alpha)


def test_nonfinite_logits_and_masked_targets_raise(backend):
    from hf_fdiv.solver import NonFiniteLogitsError

    x = torch.randn(3, 6)
    x[1, 2] = float("nan")
    alpha = torch.tensor(1.5)
    with pytest.raises(NonFiniteLogitsError):
        f_softargmax(x, alpha)
    x = torch.randn(3, 6)
    x[0, 4] = float("-inf")
    with pytest.raises(ValueError, match="excluded"):
        fdiv_loss(x, torch.tensor([4, 0, 1]), alpha)
    assert torch.isfinite(fdiv_loss(x, torch.tensor([3, 0, 1]), alpha))
    assert f_softargmax(x, alpha)[0, 4] == 0
