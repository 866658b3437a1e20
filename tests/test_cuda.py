"""The oracle checks on a CUDA device, for every GPU backend (``auto`` picks Triton where installed).

Skipped without a GPU (CI has none); run with ``make test-cuda`` on a machine that has one."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_fdiv import f_softargmax, fdiv_loss
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.solver import triton_available

from oracles import reference_bisection

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)"),
]

BACKENDS = ["batched", "triton"]
DIVERGENCES = ["kl", "alpha:1.5", "alpha:2", "alpha:1.25", "alpha:3", "js", "chi2", "reverse_kl"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("HF_FDIV_SOLVER", request.param)
    return request.param


def logits(n, V, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, V, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reference", ["unit", "uniform"])
def test_operator_and_loss_match_fp64_oracle(backend, name, reference):
    x = logits(37, 3001, scale=2.0)
    x[0] = 0.01 * x[0]  # a flat row: large supports take the fallback
    V = x.shape[1]
    q = 1.0 if reference == "unit" else 1.0 / V
    ref = reference_bisection(x, name, torch.full_like(x, q))
    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 2e-6)]:
        xc = x.to("cuda", dtype)
        p = f_softargmax(xc, name, reference)
        torch.testing.assert_close(p.double().cpu(), ref, atol=tol, rtol=0)
        t = torch.randint(0, V, (37,))
        t[::5] = -100
        a = xc.clone().requires_grad_()
        loss = fdiv_loss(a, t.cuda(), name, reference, reduction="sum")
        loss.backward()
        cpu = x.to(dtype).requires_grad_()
        want = fdiv_loss(cpu, t, name, reference, reduction="sum")
        want.backward()
        assert math.isclose(float(loss), float(want), rel_tol=10 * tol, abs_tol=10 * tol)
        torch.testing.assert_close(a.grad.cpu(), cpu.grad, atol=tol, rtol=0)


def test_bf16_large_vocabulary_loss(backend):
    x = logits(64, 128256, seed=1).to(torch.bfloat16)
    t = torch.randint(0, 128256, (64,))
    xc = x.cuda().requires_grad_()
    loss = fdiv_loss(xc, t.cuda(), "alpha:1.5")
    loss.backward()
    cpu = x.clone().requires_grad_()
    want = fdiv_loss(cpu, t, "alpha:1.5")
    want.backward()
    assert math.isclose(float(loss), float(want), rel_tol=1e-5)
    torch.testing.assert_close(xc.grad.float().cpu(), cpu.grad.float(), atol=1e-2, rtol=0)
    kl = fdiv_loss(x.cuda(), t.cuda(), "kl")
    assert math.isclose(float(kl), float(F.cross_entropy(x.float(), t)), rel_tol=1e-5)


@pytest.mark.parametrize("name", ["alpha:1.5", "kl", "js"])
def test_fused_head_matches_cpu(backend, name):
    g = torch.Generator().manual_seed(3)
    N, H, V = 300, 64, 5003
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / 4
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    want = [x.clone().requires_grad_() for x in (h, W)]
    total = fused_linear_fdiv_loss(want[0], want[1], t, name)
    total.backward()
    got = [x.cuda().requires_grad_() for x in (h, W)]
    total_c = fused_linear_fdiv_loss(got[0], got[1], t.cuda(), name)
    total_c.backward()
    assert math.isclose(float(total_c), float(total), rel_tol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-9, rtol=1e-9)


def test_fused_bf16_head_uses_fp32_logits(backend):
    # bf16 weights on CUDA take the low-precision GEMM with fp32 output: compare with the fp32 solve of
    # the same bf16-rounded operands on CPU (the logits are not rounded to bf16 before the solve)
    g = torch.Generator().manual_seed(5)
    N, H, V = 256, 128, 20011
    h = torch.randn(N, H, generator=g).to(torch.bfloat16)
    W = (torch.randn(V, H, generator=g) / 4).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g)
    for name in ["alpha:1.5", "kl"]:
        want = fused_linear_fdiv_loss(h.float(), W.float(), t, name)
        got = [x.cuda().requires_grad_() for x in (h, W)]
        total = fused_linear_fdiv_loss(got[0], got[1], t.cuda(), name)
        total.backward()
        assert math.isclose(float(total), float(want), rel_tol=1e-4)
        assert got[0].grad.dtype == torch.bfloat16 and bool(torch.isfinite(got[1].grad.float()).all())
