"""The sync-free backend (HF_FDIV_SOLVER=batched, the GPU path) run on CPU tensors: the same results as
the CPU path and the oracles, and a constant number of host synchronisations per call."""

import math
import types

import entmax
import pytest
import torch
import torch.nn.functional as F

from hf_fdiv import f_softargmax, f_softmax, fdiv_loss
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.solver import NonFiniteLogitsError, batched, solver_backend

from oracles import reference_bisection

DIVERGENCES = ["kl", "alpha:1.5", "alpha:2", "alpha:1.25", "alpha:0.5", "alpha:3", "chi2", "js", "reverse_kl",
               "squared_hellinger"]


def logits(n=12, V=301, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, V, generator=g)).to(dtype)


@pytest.fixture
def use_backend(monkeypatch):
    def use(name):
        monkeypatch.setenv("HF_FDIV_SOLVER", name)

    return use


def both_backends(use, fn):
    """fn() under the CPU path and under the sync-free path."""
    use("chunked")
    a = fn()
    use("batched")
    return a, fn()


# --------------------------------------------------------------------------------- selection


def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("HF_FDIV_SOLVER", raising=False)
    assert solver_backend(x) == "chunked"  # auto on a CPU tensor
    monkeypatch.setenv("HF_FDIV_SOLVER", "batched")
    assert solver_backend(x) == "batched"
    monkeypatch.setenv("HF_FDIV_SOLVER", "fast")
    with pytest.raises(ValueError, match="HF_FDIV_SOLVER='fast' is not a solver backend.*chunked, batched"):
        f_softargmax(x)


def test_auto_picks_the_triton_kernels_on_cuda_when_triton_imports(monkeypatch):
    """Only the device type is read, so a CUDA device is enough to check the choice without a GPU."""
    import hf_fdiv.solver as solver

    monkeypatch.delenv("HF_FDIV_SOLVER", raising=False)
    on = lambda kind: types.SimpleNamespace(device=torch.device(kind))  # noqa: E731
    monkeypatch.setattr(solver, "triton_available", lambda: True)
    assert solver_backend(on("cuda")) == "triton"
    assert solver_backend(on("xpu")) == "batched"  # the kernels are CUDA kernels
    assert solver_backend(on("cpu")) == "chunked"
    monkeypatch.setattr(solver, "triton_available", lambda: False)
    assert solver_backend(on("cuda")) == "batched"


# --------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reference", ["unit", "uniform", "prior", "rows"])
def test_operator_and_loss_match_cpu_path(use_backend, name, reference):
    x = logits(scale=2.0)
    n, V = x.shape
    g = torch.Generator().manual_seed(1)
    if reference == "prior":
        reference = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
        reference[5] = 0.0  # excluded class
    elif reference == "rows":
        reference = torch.rand(n, V, generator=g, dtype=torch.float64) * 2 + 0.05
    t = torch.randint(0, V, (n,), generator=g)
    t[t == 5] = 6
    t[::4] = -100

    def run():
        a = x.clone().requires_grad_()
        p = f_softargmax(a, name, reference)
        (p * torch.linspace(-1, 1, V, dtype=x.dtype)).sum().backward()
        b = x.clone().requires_grad_()
        loss = fdiv_loss(b, t, name, reference, reduction="sum")
        loss.backward()
        return p.detach(), a.grad, loss.detach(), b.grad, f_softmax(x, name, reference)

    for cpu, gpu_path in zip(*both_backends(use_backend, run)):
        torch.testing.assert_close(gpu_path, cpu, atol=1e-9, rtol=1e-9)


def test_operator_matches_entmax_in_fp32_and_bf16(use_backend):
    use_backend("batched")
    x = logits(n=9, V=1000, dtype=torch.float32)
    torch.testing.assert_close(f_softargmax(x, "alpha:1.5"), entmax.entmax15(x.double(), dim=-1).float(), atol=1e-6, rtol=0)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(f_softargmax(xb, "alpha:2").float(), entmax.sparsemax(xb.double(), dim=-1).float(),
                               atol=1e-2, rtol=0)
    t = torch.randint(0, 1000, (9,))
    torch.testing.assert_close(fdiv_loss(x, t, "kl"), F.cross_entropy(x, t), atol=1e-6, rtol=1e-6)


def test_soft_targets_label_smoothing_and_skip_match_cpu_path(use_backend):
    x = logits(scale=2.0)
    n, V = x.shape
    x[3, 7] = math.nan
    y = torch.softmax(logits(seed=4), -1)
    t = torch.randint(0, V, (n,))

    def run():
        out = []
        for name in ["alpha:1.5", "js", "kl"]:
            a = x.clone().requires_grad_()
            loss, stats = fdiv_loss(a, y, name, skip_nonfinite=True, return_stats=True)
            loss.backward()
            smooth = fdiv_loss(x, t, name, label_smoothing=0.1, skip_nonfinite=True)
            out += [loss.detach(), a.grad, smooth, stats.support, stats.entropy, stats.pred, stats.skipped]
        return out

    cpu, gpu_path = both_backends(use_backend, run)
    assert bool(gpu_path[6][3]) and int(gpu_path[6].sum()) == 1  # the NaN row was skipped and flagged
    for a, b in zip(cpu, gpu_path):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)


def test_nonfinite_rows_raise_as_on_cpu(use_backend):
    use_backend("batched")
    x = logits()
    x[2, 0] = math.inf
    with pytest.raises(NonFiniteLogitsError, match="1 row"):
        fdiv_loss(x, torch.zeros(12, dtype=torch.long))
    q = torch.ones(301, dtype=torch.float64)
    x = logits()
    with pytest.raises(ValueError, match="target class has logit -inf or reference q = 0"):
        fdiv_loss(x, torch.full((12,), 3), "alpha:1.5", q.index_fill(0, torch.tensor([3]), 0.0))


# --------------------------------------------------------------------------------- fallbacks


def test_large_supports_certified_by_the_dense_retry(use_backend, monkeypatch):
    # flat rows: alpha = 1.5 supports of hundreds of classes defeat the top-K guess (K = 64)
    use_backend("batched")
    exact_calls = []
    original = batched.solve_rows_chunked
    monkeypatch.setattr(batched, "solve_rows_chunked", lambda *a, **k: exact_calls.append(1) or original(*a, **k))
    x = logits(n=6, V=4000, scale=0.01)
    for name in ["alpha:1.5", "alpha:2", "alpha:1.25"]:
        p = f_softargmax(x, name)
        assert int((p > 0).sum(-1).min()) > batched.BATCHED_TOPK
        torch.testing.assert_close(p, reference_bisection(x, name), atol=1e-10, rtol=0)
    assert exact_calls == []  # the dense batched retry certified every row
    p = f_softargmax(x, "alpha:3")  # not monotone: the exact path finishes what the fixed passes did not
    torch.testing.assert_close(p, reference_bisection(x, "alpha:3"), atol=1e-9, rtol=0)


def test_common_rows_need_no_fallback(use_backend, monkeypatch):
    use_backend("batched")
    monkeypatch.setattr(batched, "solve_rows_chunked", lambda *a, **k: pytest.fail("fell back to the exact path"))
    x = logits(n=64, V=5000, scale=3.0, dtype=torch.float32)
    for name in ["alpha:1.5", "alpha:2", "kl", "js", "chi2"]:
        f_softargmax(x, name)
        fdiv_loss(x, torch.randint(0, 5000, (64,)), name)


# --------------------------------------------------------------------------------- synchronisations


class SyncCounter:
    """Counts the host synchronisations a call makes (every way a tensor's value reaches Python)."""

    METHODS = ("__bool__", "item", "__int__", "__index__", "__float__", "tolist", "nonzero")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return counted


def _calls(n, V=301, H=16):
    g = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(n, V, generator=g)).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g)
    t[::3] = -100
    h = torch.randn(n, H, generator=g).requires_grad_()
    W = torch.randn(V, H, generator=g).requires_grad_()
    return {
        "fdiv_loss alpha:1.5": lambda: fdiv_loss(x, t, "alpha:1.5").backward(),
        "fdiv_loss kl": lambda: fdiv_loss(x, t, "kl").backward(),
        "fdiv_loss js": lambda: fdiv_loss(x, t, "js").backward(),
        "f_softargmax alpha:1.5": lambda: f_softargmax(x, "alpha:1.5").sum().backward(),
        "f_softargmax js": lambda: (f_softargmax(x, "js") ** 2).sum().backward(),
        "fused alpha:1.5": lambda: fused_linear_fdiv_loss(h, W * 3, t, "alpha:1.5").backward(),
        "fused kl": lambda: fused_linear_fdiv_loss(h, W, t, "kl").backward(),
    }


def test_host_synchronisations_do_not_grow_with_rows(use_backend, monkeypatch):
    use_backend("batched")
    # small chunks so that the larger call runs many of them (the budget is read at call time)
    monkeypatch.setattr(batched, "BATCHED_CHUNK_ELEMENTS", 301 * 8)
    import hf_fdiv.fused as fused_mod

    monkeypatch.setattr(fused_mod, "FUSED_DEVICE_CHUNK_ELEMENTS", 301 * 8)
    small, large = _calls(8), _calls(200)
    for case in small:
        counts = []
        small[case]()  # warm-up: per-generator constants are computed once, then memoised
        for calls in (small, large):
            with monkeypatch.context() as m:
                counter = SyncCounter(m)
                calls[case]()
            counts.append(counter.count)
        assert counts[0] == counts[1], f"{case}: {counts[0]} synchronisations for 8 rows, {counts[1]} for 200"
        assert counts[1] <= 4, f"{case}: {counts[1]} host synchronisations per call"
