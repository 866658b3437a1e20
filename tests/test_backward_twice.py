"""Backward more than once through the losses' graph (retain_graph=True, torch.autograd.gradcheck).

The losses compute p - y in the forward pass; the backward scales that buffer in place when the graph
is freed and returns a scaled copy when it is retained (hf_fdiv.solver.grad_buffer). These tests check
both halves: any number of retained backward calls are exact (and gradcheck passes in fp64), and the
common single backward still returns the buffer itself (no [N, V] allocation in the backward).
"""

import os

import pytest
import torch

from hf_fdiv import fdiv_loss
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.losses import fdiv_loss_rows
from hf_fdiv.solver import flatten_reference, prepare_reference

DIVS = ["kl", "alpha:1.5", "alpha:2", "alpha:1.25", "alpha:0.5", "js", "reverse_kl", "chi2", "squared_hellinger"]


def _data(n=6, V=9, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, V, generator=g)).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    y = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64), -1).to(dtype)
    return x, t, y


@pytest.fixture(params=["chunked", "batched"])
def backend(request, monkeypatch):
    monkeypatch.setenv("HF_FDIV_SOLVER", request.param)
    return request.param


# --------------------------------------------------------------------------------- retain_graph


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js"])
@pytest.mark.parametrize("targets", ["ids", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_retain_graph_twice_gives_twice_the_gradient(backend, name, targets, dtype):
    x, t, y = _data(dtype=dtype)
    t[1] = -100
    target = t if targets == "ids" else y
    a = x.clone().requires_grad_()
    loss = fdiv_loss(a, target, name)
    loss.backward(retain_graph=True)
    once = a.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(a.grad.float(), 2 * once.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    loss.backward()  # the last one may free the graph
    torch.testing.assert_close(a.grad.float(), 3 * once.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    # each retained backward scales its own g: autograd.grad with g = 2 on the same graph, graph kept
    a2 = x.clone().requires_grad_()
    rows = fdiv_loss(a2, target, name, reduction="none")
    g_a = torch.autograd.grad(rows, a2, torch.ones_like(rows), retain_graph=True)[0]
    g_b = torch.autograd.grad(rows, a2, 2 * torch.ones_like(rows), retain_graph=True)[0]
    g_c = torch.autograd.grad(rows, a2, torch.ones_like(rows))[0]
    assert torch.equal(g_a, g_c), "a retained backward changed the buffer"
    torch.testing.assert_close(g_b.float(), 2 * g_a.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_single_backward_reuses_the_buffer_and_retained_backward_copies_it():
    """Memory: a backward that frees the graph hands out the forward's buffer itself (scaled in place),
    a retained one a copy and leaves the buffer unscaled."""
    x, t, _ = _data(dtype=torch.float32)
    q = flatten_reference(prepare_reference("unit", x, -1), tuple(x.shape))
    from hf_fdiv.divergences import get_divergence

    div = get_divergence("alpha:1.5")
    a = x.clone().requires_grad_()
    rows, _ = fdiv_loss_rows(a, t, q, div)
    buffer = rows.grad_fn.grad_buffer
    before = buffer.clone()
    g = torch.arange(1.0, 7.0)
    (first,) = torch.autograd.grad(rows, a, g, retain_graph=True)
    assert first.data_ptr() != buffer.data_ptr() and torch.equal(buffer, before)
    (last,) = torch.autograd.grad(rows, a, g)
    assert last.data_ptr() == buffer.data_ptr(), "the common single backward must not allocate a new [N, V]"
    assert rows.grad_fn.grad_buffer is None  # released with the graph
    torch.testing.assert_close(last, first)
    torch.testing.assert_close(first, before * g[:, None])


def test_double_backward_is_refused_clearly():
    x, t, _ = _data()
    a = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(fdiv_loss(a, t), a, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.gradgradcheck(lambda z: fdiv_loss(z, t), (a,))
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(fused_linear_fdiv_loss(h, W, t), h, create_graph=True)


# --------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("targets", ["ids", "soft", "smoothed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fdiv_loss(backend, name, targets, reduction):
    x, t, y = _data()
    t[2] = -100
    if targets == "soft":
        kwargs, target = {}, y
    else:
        kwargs, target = ({"label_smoothing": 0.1} if targets == "smoothed" else {}), t
    a = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: fdiv_loss(z, target, name, reduction=reduction, **kwargs), (a,))


@pytest.mark.parametrize("reference", ["uniform", "prior"])
def test_gradcheck_fdiv_loss_with_a_reference(backend, reference):
    x, t, _ = _data()
    q = torch.rand(x.shape[1], dtype=torch.float64) + 0.1 if reference == "prior" else reference
    a = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: fdiv_loss(z, t, "alpha:1.5", reference=q), (a,))


@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "alpha:2", "js", "alpha:0.5"])
@pytest.mark.parametrize("targets", ["ids", "soft"])
def test_gradcheck_fused_linear_fdiv_loss(backend, name, targets):
    g = torch.Generator().manual_seed(1)
    N, H, V = 6, 4, 11
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    if targets == "ids":
        t = torch.randint(0, V, (N,), generator=g)
        t[3] = -100
        rows = None
    else:
        from hf_fdiv.solver import RowProvider

        y = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64), -1)
        t = RowProvider(lambda r: y[r])
        rows = torch.arange(N)
    f = lambda h_, W_, b_: fused_linear_fdiv_loss(h_, W_, t, name, bias=b_, rows=rows, chunk_elements=4 * V)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, W, b))
    # retained twice: twice the gradients, for every input
    loss = f(h, W, b)
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in (h, W, b)]
    loss.backward()
    for p, o in zip((h, W, b), once):
        torch.testing.assert_close(p.grad, 2 * o)


# --------------------------------------------------------------------------------- Triton path


@pytest.mark.triton
@pytest.mark.parametrize("name", ["kl", "alpha:1.5", "js"])
def test_triton_loss_backward_twice(monkeypatch, name):
    """The Triton loss kernel's Function (fp32 and bf16; the kernels do not take fp64, so no gradcheck):
    retained backward calls are exact, and the kernel really ran (HF_FDIV_SOLVER=triton)."""
    pytest.importorskip("triton")
    from hf_fdiv.solver import triton_available

    if not triton_available():
        pytest.skip("Triton kernels unavailable (no CUDA and TRITON_INTERPRET unset at import)")
    from hf_fdiv.solver import triton_kernels as tk

    if type(tk._fdiv_newton_kernel).__name__ != "InterpretedFunction" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    x, t, _ = _data(n=5, V=70, dtype=torch.float32)
    x, t = x.to(device), t.to(device)
    t[0] = -100
    for dtype in (torch.float32, torch.bfloat16):
        a = x.clone().to(dtype).requires_grad_()
        rows = fdiv_loss(a, t, name, reduction="none")
        loss = rows.sum()
        loss.backward(retain_graph=True)
        once = a.grad.clone()
        loss.backward()
        torch.testing.assert_close(a.grad.float(), 2 * once.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
        # the retained gradient equals the one of a fresh graph (PyTorch path as the oracle)
        monkeypatch.setenv("HF_FDIV_SOLVER", "chunked")
        b = x.clone().to(dtype).requires_grad_()
        fdiv_loss(b, t, name, reduction="sum").backward()
        monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
        torch.testing.assert_close(once.float(), b.grad.float(), rtol=2e-2, atol=1e-5)


def test_triton_function_is_what_the_triton_backend_runs(monkeypatch):
    pytest.importorskip("triton")
    from hf_fdiv.solver import triton_available

    if not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("HF_FDIV_SOLVER", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, t, _ = _data(n=3, V=70, dtype=torch.float32)
    a = x.to(device).requires_grad_()
    rows = fdiv_loss(a, t.to(device), "alpha:1.5", reduction="none")
    names = []
    node = rows.grad_fn
    while node is not None and len(names) < 5:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("TritonFYLoss" in n for n in names), names
