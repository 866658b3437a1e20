"""What every CUDA loss path of hf_fdiv costs a GPU, counted on a CPU (issue 23, deliverable 1: the cost meter).

    python benchmarks/gpu_cost.py                                    # both GPU-benchmark shapes, 4-row measurements
    python benchmarks/gpu_cost.py --shape 8192x32768 --dtype float32 --rows 8
    python benchmarks/gpu_cost.py --top 10                           # + each case's top-10 ops by bytes and launches
    python benchmarks/gpu_cost.py --only alpha:1.5 --json /tmp/gpu_cost.json
    python benchmarks/gpu_cost.py --no-triton                        # skip the Triton kernels (interpreted on CPU)

At the GPU benchmark's sizes a loss is bound by memory traffic and kernel launches, and both can be counted
without a GPU: every ATen op dispatched is one kernel launch on CUDA, every tensor an op writes or reads is
a trip through HBM. :class:`CostMeter` (a ``TorchDispatchMode``, independent of hf_fdiv) counts, around
forward + backward of one call:

* launches: ATen ops dispatched, minus pure metadata / view / allocation ops (``METADATA_OPS``);
* bytes written: every fresh output tensor, plus every mutated argument of in-place / ``out=`` ops
  (scatter-like ops: only the elements they write, ``SPARSE_WRITES``);
* bytes read: every tensor argument, each storage once per op (gather-like ops: only the elements they
  read, ``SPARSE_READS``; a broadcast, stride-0 dimension is read once);
* host synchronisations: ``.item()`` / ``bool()`` / ``int()`` (``aten._local_scalar_dense``) and every op
  whose output shape depends on data (``SYNC_OPS``), plus device-to-host copies;
* peak extra memory: the live bytes of storages created inside the meter (freed when the storage dies).

For the Triton kernels (``HF_FDIV_SOLVER=triton``), which the interpreter (``TRITON_INTERPRET=1``) runs on
CPU, :class:`TritonCounter` adds one launch per kernel launch and the elements its ``tl.load`` / ``tl.store``
touch; "passes per row" = elements loaded / (rows x V).

Extrapolation. hf_fdiv solves rows in chunks of ``step = BATCHED_CHUNK_ELEMENTS // V`` rows (the fused
LM head: ``FUSED_DEVICE_CHUNK_ELEMENTS // V``; both read at call time); the chunk loop repeats the same
ops per chunk. Every count is therefore ``a + b * chunks + c * rows + d * step`` (d: per-call buffers of
one chunk's size) and the peak ``a + c * rows + d * step``. Each case is measured (after one warm-up call)
with the chunk budget shrunk to ``s * V`` (``s = --rows``) at (rows, step) = (s, s), (2s, s), (2s, 2s),
(4s, 2s) and (3s, s) (``PLAN``), which solves the coefficients exactly, and the full shape's figures
follow (chunks = ceil(N / step)); the fifth measurement checks the count model (``model_ok``, a "?" after
the launches in the table when it fails, e.g. when some rows took a data-dependent re-solve). The Triton
cases are measured at 4 rows of the full V (``--triton-shape`` to change; the interpreter is slow, and the
kernels' tiling depends on V: one tile up to V = 32768, 4096-wide tiles above): their ATen ops are fitted
the same way (per-row bytes scaled by V / V_measured) and their kernels' traffic is the passes per row,
averaged over every measured row (Newton stops early per row: data-dependent), times N x V. ``tests/test_gpu_cost.py`` checks the extrapolation against a direct measurement.

The roofline is an ESTIMATE for one H100, not a measurement: bytes (read + written) / 3.35 TB/s + 5 us
per launch, next to the same for F.cross_entropy (losses) or torch.softmax (operators).

Output: a markdown table per shape (bytes in units of one [N, V] fp32 buffer, N * V * 4 bytes), the
issue's budgets with pass / FAIL, ``--top K`` lists, and ``--json PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import weakref
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

H100_BYTES_PER_S = 3.35e12
H100_LAUNCH_S = 5e-6

# No kernel on CUDA: views and metadata only change a tensor's header, empty* only allocates.
METADATA_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.as_strided", "aten.t", "aten.expand", "aten.slice", "aten.select",
    "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias", "aten.permute", "aten.transpose",
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.lift_fresh", "aten._reshape_alias", "aten.set_", "aten.resize_", "aten.split", "aten.unbind",
    "aten.narrow", "aten.diagonal", "aten.split_with_sizes", "aten.unfold", "aten.view_as_real",
    "aten.view_as_complex", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.is_same_size",
})
# The host waits for the device: a value read on the host, or an output whose shape depends on data.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.allclose",
    "aten.masked_select", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.unique_dim_consecutive", "aten.item",
})
# In-place ops that overwrite their destination without reading it.
OVERWRITE_OPS = frozenset({
    "aten.copy_", "aten.zero_", "aten.fill_", "aten.normal_", "aten.uniform_", "aten.random_",
    "aten.bernoulli_", "aten.exponential_",
})
# Scatter-like in-place ops write only where the index points: the argument that says how many elements.
SPARSE_WRITES = {
    "aten.scatter_": "index", "aten.scatter_add_": "index", "aten.scatter_reduce_": "index",
    "aten.index_copy_": "source", "aten.index_add_": "source", "aten.masked_scatter_": "source",
    "aten.put_": "index", "aten.index_put_": "indices", "aten._index_put_impl_": "indices",
    "aten.index_fill_": "index",
}
# Gather-like ops read only the selected elements of ``self`` (as many as they write).
SPARSE_READS = frozenset({"aten.index_select", "aten.gather", "aten.index", "aten.take"})

# Set while a Triton kernel runs under the interpreter: its host copies are not device work.
_paused = [0]


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a stride-0, broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _arg(func, args, kwargs, name: str):
    """The value of a schema argument by name, positional or keyword."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name)
    return None


def _tensors(x) -> list:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _sparse_write_bytes(name: str, func, args, kwargs, self_t: torch.Tensor) -> int:
    """Bytes a scatter-like in-place op writes into ``self_t``: one element per index / source element."""
    ref = _arg(func, args, kwargs, SPARSE_WRITES[name])
    if name in ("aten.index_put_", "aten._index_put_impl_"):
        idx = [i for i in ref if i is not None]
        n = math.prod(torch.broadcast_shapes(*[i.shape for i in idx])) if idx else 1
        n *= math.prod(self_t.shape[len(ref):])
    elif name == "aten.index_fill_":
        dim = _arg(func, args, kwargs, "dim")
        n = ref.numel() * self_t.numel() // max(self_t.shape[dim], 1) if self_t.dim() else 1
    else:
        n = ref.numel()
    return n * self_t.element_size()


def _is_sync(name: str, func, args, kwargs) -> bool:
    if name in SYNC_OPS:
        return True
    if name in ("aten.index", "aten.index_put_", "aten._index_put_impl_"):  # a bool mask index: nonzero inside
        return any(i is not None and i.dtype == torch.bool for i in _arg(func, args, kwargs, "indices"))
    if name == "aten.repeat_interleave":  # tensor repeats without output_size: data-dependent length
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("aten.copy_", "aten._to_copy"):  # device -> host copies wait for the device
        src = args[1] if name == "aten.copy_" else args[0]
        dst = args[0].device if name == "aten.copy_" else kwargs.get("device", src.device)
        dst_cpu = torch.device(dst).type == "cpu"
        return dst_cpu and src.device.type != "cpu"
    return False


class CostMeter(TorchDispatchMode):
    """Counts, for the ATen ops dispatched inside it: ``launches``, ``bytes_written``, ``bytes_read``,
    ``syncs`` and ``peak_bytes`` (peak live bytes of storages created inside), plus per-op ``op_launches``,
    ``op_bytes`` (read + written) and ``op_syncs``. See the module docstring for the rules."""

    def __init__(self):
        super().__init__()
        self.launches = self.bytes_written = self.bytes_read = self.syncs = 0
        self.live_bytes = self.peak_bytes = 0
        self.op_launches: Counter = Counter()
        self.op_bytes: Counter = Counter()
        self.op_syncs: Counter = Counter()
        self._live: dict = {}

    def _track(self, t: torch.Tensor) -> None:
        """Registers a storage created inside the meter; weakref.finalize drops it when the storage dies."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def _traffic(self, name: str, func, args, kwargs, out) -> tuple[int, int]:
        """(bytes written, bytes read) of one op, argument by argument of its schema."""
        in_keys = {_storage_key(t) for t in _tensors((args, kwargs))}
        written, seen = 0, {}
        sparse_read = name in SPARSE_READS
        for a in func._schema.arguments:
            value = _arg(func, args, kwargs, a.name)
            writes = a.alias_info is not None and a.alias_info.is_write
            # out= arguments, overwrites and scatters are written without being read
            read = not (writes and (a.name == "out" or name in OVERWRITE_OPS or name in SPARSE_WRITES))
            for t in _tensors(value):
                if writes:
                    written += (_sparse_write_bytes(name, func, args, kwargs, t) if name in SPARSE_WRITES
                                else distinct_bytes(t))
                if read:
                    b = distinct_bytes(t)
                    if sparse_read and a.name == "self":  # as many elements as the output has
                        b = _tensors(out)[0].numel() * t.element_size()
                    key = _storage_key(t)
                    seen[key] = max(seen.get(key, 0), b)  # each storage once per op
        for t in _tensors(out):
            if _storage_key(t) not in in_keys:  # fresh output (in-place returns and views alias an input)
                written += distinct_bytes(t)
        return written, sum(seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _paused[0]:
            return out
        name = str(func.overloadpacket)
        if _is_sync(name, func, args, kwargs):
            self.syncs += 1
            self.op_syncs[name] += 1
        in_keys = {_storage_key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if _storage_key(t) not in in_keys:  # a view of a tensor from outside allocates nothing
                self._track(t)
        if name in METADATA_OPS or func.is_view or name == "aten._local_scalar_dense":
            return out
        written, read = self._traffic(name, func, args, kwargs, out)
        self.launches += 1
        self.bytes_written += written
        self.bytes_read += read
        self.op_launches[name] += 1
        self.op_bytes[name] += written + read
        return out


class TritonCounter:
    """Counts Triton kernel launches and the elements their loads / stores touch, under the interpreter
    (``TRITON_INTERPRET=1``): wraps ``InterpreterBuilder.create_masked_load/store`` (every ``tl.load`` /
    ``tl.store`` ends there) and ``GridExecutor.__call__`` (one kernel launch). Block accesses (a tile of a
    row) and scalar accesses (per-row values) are counted apart."""

    def __init__(self):
        self.launches = 0
        self.kernels: Counter = Counter()
        self.block_loaded = self.block_stored = 0  # elements
        self.bytes_loaded = self.bytes_stored = 0
        self.block_bytes_loaded = self.block_bytes_stored = 0
        self._undo: list = []

    def _access(self, kind: str, ptrs, mask) -> None:
        import numpy as np

        n = int(np.count_nonzero(mask.data))
        nbytes = n * ptrs.get_element_ty().primitive_bitwidth // 8
        block = ptrs.data.size > 1
        if kind == "load":
            self.bytes_loaded += nbytes
            if block:
                self.block_loaded += n
                self.block_bytes_loaded += nbytes
        else:
            self.bytes_stored += nbytes
            if block:
                self.block_stored += n
                self.block_bytes_stored += nbytes

    def _patch(self, owner, attr: str, wrapper) -> None:
        orig = getattr(owner, attr)
        setattr(owner, attr, wrapper(orig))
        self._undo.append((owner, attr, orig))

    def __enter__(self) -> "TritonCounter":
        from triton.runtime import interpreter as ti

        counter = self

        def load(orig):
            def f(builder, ptrs, mask, other, *a, **k):
                counter._access("load", ptrs, mask)
                return orig(builder, ptrs, mask, other, *a, **k)
            return f

        def store(orig):
            def f(builder, ptrs, value, mask, *a, **k):
                counter._access("store", ptrs, mask)
                return orig(builder, ptrs, value, mask, *a, **k)
            return f

        def launch(orig):
            def f(executor, *a, **k):
                counter.launches += 1
                counter.kernels[getattr(executor.fn, "__name__", "kernel")] += 1
                _paused[0] += 1  # the interpreter's host copies of the arguments are no device work
                try:
                    return orig(executor, *a, **k)
                finally:
                    _paused[0] -= 1
            return f

        self._patch(ti.InterpreterBuilder, "create_masked_load", load)
        self._patch(ti.InterpreterBuilder, "create_masked_store", store)
        self._patch(ti.GridExecutor, "__call__", launch)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One forward + backward call. ``run(inputs)`` is measured; ``make(rows, V, dtype, hidden)`` builds the
    inputs outside the meter. ``backend``: the HF_FDIV_SOLVER value (None: not hf_fdiv). ``baseline``: the
    case whose roofline it is compared with; ``traffic_budget``: the issue's bound on traffic / baseline's."""

    name: str
    make: Callable
    run: Callable
    baseline: Optional[str] = None
    backend: Optional[str] = None
    fused: bool = False
    traffic_budget: Optional[float] = None
    launch_budget: Optional[int] = None
    #: runs Triton kernels whatever the backend (Liger-Kernel): count them
    kernels: bool = False
    #: rows per chunk at N x V (hidden H) when the case chunks by its own rule (Liger-Kernel)
    step_fn: Optional[Callable[[int, int, int], int]] = None


def _logits(rows, V, dtype, hidden=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, dtype=dtype, generator=gen).mul_(2).requires_grad_()
    t = torch.randint(0, V, (rows,), generator=gen)
    return dict(x=x, t=t)


def _op_inputs(rows, V, dtype, hidden=None):
    d = _logits(rows, V, dtype)
    d["g"] = torch.randn(rows, V, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return d


@functools.lru_cache(maxsize=1)
def _lm_head(V, dtype, hidden):
    """One LM head per shape, shared by the measurements (a 128256 x 2048 randn takes seconds on CPU)."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(V, hidden, dtype=dtype, generator=gen) * (3 * hidden**-0.5)).requires_grad_()


def _fused_inputs(rows, V, dtype, hidden):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(rows, hidden, dtype=dtype, generator=gen).requires_grad_()
    t = torch.randint(0, V, (rows,), generator=gen)  # no ignored tokens: the row count stays exact
    return dict(h=h, W=_lm_head(V, dtype, hidden), t=t)


def _fdiv_loss(spec):
    def run(d):
        from hf_fdiv import fdiv_loss

        fdiv_loss(d["x"], d["t"], spec).backward()
    return run


def _f_softargmax(spec):
    def run(d):
        from hf_fdiv import f_softargmax

        f_softargmax(d["x"], spec).backward(d["g"])
    return run


def _fused(spec):
    def run(d):
        from hf_fdiv.fused import fused_linear_fdiv_loss  # not re-exported at the top level

        fused_linear_fdiv_loss(d["h"], d["W"], d["t"], spec, chunk_elements=d["chunk_elements"]).backward()
    return run


def _ce(d):
    F.cross_entropy(d["x"], d["t"]).backward()


def _softmax(d):
    torch.softmax(d["x"], -1).backward(d["g"])


def _materialised_ce(d):
    F.cross_entropy((d["h"] @ d["W"].T).float(), d["t"], reduction="sum").backward()


def _liger_ce(d):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    LigerCrossEntropyFunction.apply(d["x"], d["t"], None)[0].backward()


def liger_chunk_rows(N: int, V: int, H: int, mem_const: int = 1) -> int:
    """Tokens per chunk of Liger-Kernel's fused linear cross-entropy (0.8.5, ``fused_linear_cross_entropy``):
    the logits of a chunk are bounded by ``mem_const`` x N x H elements, rounded to a power of two."""
    inc = -(-V // (mem_const * H))
    return min(1 << max(0, math.ceil(math.log2(-(-N // inc)))), N)


def liger_mem_const(rows: int, step: int, V: int, H: int) -> int:
    """The ``chunk_mem_const`` that makes Liger chunk ``rows`` tokens by ``step`` (for the measurements)."""
    for c in range(1, V + 1):
        if liger_chunk_rows(rows, V, H, c) == step:
            return c
    raise ValueError(f"Liger-Kernel cannot chunk {rows} tokens by {step} at V={V}, H={H}.")


def _liger_fused(d):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    (rows, H), V = d["h"].shape, d["W"].shape[0]
    c = liger_mem_const(rows, d["chunk_elements"] // V, V, H)
    out = LigerFusedLinearCrossEntropyFunction.apply(
        d["h"], d["W"], d["t"], None, None, -100, 0.0, 0.0, "sum", None, False, None, False, False, False, None, None, c
    )
    (out[0] if isinstance(out, tuple) else out).backward()


def _liger_ready() -> bool:
    """Liger-Kernel is installed and its kernels can run here (CUDA, or Triton's interpreter)."""
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except Exception:  # not installed, or an incompatible torch / triton
        return False
    return True


@contextlib.contextmanager
def cuda_like_gemms():
    """bf16 / fp16 GEMMs with fp32 output (``torch.mm(..., out_dtype=torch.float32)``, cuBLAS on CUDA) made
    available on CPU for the duration, computed as an fp32 product, so that the fused LM head takes its CUDA
    path here and the meter counts what a GPU moves: bf16 operands read, fp32 logits written, no fp32 copy
    of W. The registration is removed on exit: later code in the process sees the CPU build as it is."""
    if torch.cuda.is_available():
        yield
        return
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("mm.dtype", lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)), "CPU")
        yield
    finally:
        lib._destroy()


CE, SOFTMAX, MAT_CE = "F.cross_entropy", "torch.softmax", "materialised F.cross_entropy"
LIGER_CE, LIGER_FUSED = "Liger cross-entropy", "Liger fused linear cross-entropy"
LAUNCH_BUDGET = 50  # per chunk, every loss and the operator (issue 23)


#: the other built-in generators (``--all-divergences``; issue 22 asks for each one's passes on ``batched``)
OTHER_DIVERGENCES = ("reverse_kl", "chi2", "squared_hellinger", "alpha:0.5", "alpha:3")


def cases(triton: bool = True, all_divergences: bool = False, liger: bool = False) -> list[Case]:
    """Baselines first (Liger-Kernel's when ``liger``); then hf_fdiv on the batched backend, the fused LM
    head, and the Triton kernels."""
    out = [
        Case(CE, _logits, _ce),
        Case(SOFTMAX, _op_inputs, _softmax),
        Case(MAT_CE, _fused_inputs, _materialised_ce),
    ]
    if liger:
        out += [
            Case(LIGER_CE, _logits, _liger_ce, CE, kernels=True),
            Case(LIGER_FUSED, _fused_inputs, _liger_fused, MAT_CE, fused=True, kernels=True,
                 step_fn=liger_chunk_rows),
        ]
    budgets = {"kl": 1.5, "alpha:1.5": 1.5, "js": 3.0, "alpha:2": None}
    backends = ["batched"] + (["triton"] if triton else [])
    for backend in backends:
        tag = "" if backend == "batched" else " [triton]"
        for spec, budget in budgets.items():
            out.append(Case(f"fdiv_loss {spec}{tag}", _logits, _fdiv_loss(spec), CE, backend, False, budget,
                            LAUNCH_BUDGET))
        for spec, budget in (("alpha:1.5", 1.5), ("alpha:2", None)):
            out.append(Case(f"f_softargmax {spec}{tag}", _op_inputs, _f_softargmax(spec), SOFTMAX, backend, False,
                            budget, LAUNCH_BUDGET))
    if all_divergences:
        for spec in ("kl", "js") + OTHER_DIVERGENCES:
            if spec not in budgets:
                out.append(Case(f"fdiv_loss {spec}", _logits, _fdiv_loss(spec), CE, "batched", False, None,
                                LAUNCH_BUDGET))
            out.append(Case(f"f_softargmax {spec}", _op_inputs, _f_softargmax(spec), SOFTMAX, "batched", False,
                            None, LAUNCH_BUDGET))
    # the fused head: alpha = 1.5 within 1.5x the traffic of Liger's fused linear cross-entropy (issue 23)
    fused_base, fused_budget = (LIGER_FUSED, {"alpha:1.5": 1.5}) if liger else (MAT_CE, {})
    for backend in backends:
        tag = "" if backend == "batched" else " [triton]"
        for spec in ("alpha:1.5", "kl"):
            out.append(Case(f"fused {spec}{tag}", _fused_inputs, _fused(spec), fused_base, backend, True,
                            fused_budget.get(spec), LAUNCH_BUDGET))
    return out


# ---------------------------------------------------------------------------------------------------
# Measuring and extrapolating
# ---------------------------------------------------------------------------------------------------

METRICS = ("launches", "bytes_written", "bytes_read", "syncs", "peak_bytes")


def full_step(case: Case, V: int, N: int = 1, hidden: int = 2048) -> int:
    """Rows per chunk of the case at its real chunk budget (read now: hf_fdiv reads it at call time)."""
    from hf_fdiv.fused import FUSED_DEVICE_CHUNK_ELEMENTS
    from hf_fdiv.solver.batched import backend_chunk_rows

    if case.step_fn is not None:
        return case.step_fn(N, V, hidden)
    if case.fused:
        return max(1, FUSED_DEVICE_CHUNK_ELEMENTS // V)
    return backend_chunk_rows("batched", V)


@contextlib.contextmanager
def chunk_budget(elements: Optional[int], backend: Optional[str]):
    """The batched chunk budget set to ``elements`` (None: unchanged) and HF_FDIV_SOLVER to ``backend``."""
    import hf_fdiv.solver.batched as batched

    old_budget, old_env = batched.BATCHED_CHUNK_ELEMENTS, os.environ.get("HF_FDIV_SOLVER")
    if elements is not None:
        batched.BATCHED_CHUNK_ELEMENTS = elements
    if backend is not None:
        os.environ["HF_FDIV_SOLVER"] = backend
    try:
        yield
    finally:
        batched.BATCHED_CHUNK_ELEMENTS = old_budget
        if old_env is None:
            os.environ.pop("HF_FDIV_SOLVER", None)
        else:
            os.environ["HF_FDIV_SOLVER"] = old_env


def measure(case: Case, rows: int, step: int, V: int, dtype, hidden: int = 2048) -> dict:
    """One call of the case on ``rows`` x ``V`` with ``step`` rows per chunk: the meters' counts."""
    d = case.make(rows, V, dtype, hidden)
    for t in d.values():  # a shared input must not accumulate into an earlier call's .grad
        t.grad = None
    d["chunk_elements"] = step * V
    triton = case.backend == "triton" or case.kernels
    gemms = cuda_like_gemms() if case.fused else contextlib.nullcontext()
    with gemms, chunk_budget(step * V, case.backend):
        with (TritonCounter() if triton else contextlib.nullcontext()) as tc, CostMeter() as m:
            case.run(d)
    res = {k: getattr(m, k) for k in METRICS}
    res["op_launches"], res["op_bytes"], res["op_syncs"] = dict(m.op_launches), dict(m.op_bytes), dict(m.op_syncs)
    if tc is not None:  # kept apart: the kernels' Newton passes stop early per row, so they depend on the data
        res["kernel"] = dict(
            launches=tc.launches, kernels=dict(tc.kernels), rows=rows, V=V,
            block_loaded=tc.block_loaded, block_stored=tc.block_stored,
            block_bytes_loaded=tc.block_bytes_loaded, block_bytes_stored=tc.block_bytes_stored,
            scalar_bytes_loaded=tc.bytes_loaded - tc.block_bytes_loaded,
            scalar_bytes_stored=tc.bytes_stored - tc.block_bytes_stored,
        )
        for name, n in tc.kernels.items():
            res["op_launches"][f"triton {name}"] = n
        res["op_bytes"]["triton kernels"] = tc.bytes_loaded + tc.bytes_stored
    return res


def kernel_costs(kernel_runs: list[dict], N: int, V: int) -> dict:
    """The Triton kernels' share at N x V: launches per call (fixed), and per-row traffic averaged over every
    measured row (tiles: per element of a row, so x V; per-row scalars: x N); passes = elements / (rows V)."""
    total = {k: sum(r[k] for r in kernel_runs) for k in kernel_runs[0] if k not in ("kernels", "V")}
    elements = total["rows"] * kernel_runs[0]["V"]
    return dict(
        launches=kernel_runs[0]["launches"], kernels=kernel_runs[0]["kernels"],
        passes_read=total["block_loaded"] / elements, passes_written=total["block_stored"] / elements,
        bytes_read=Fraction(total["block_bytes_loaded"], elements) * N * V
        + Fraction(total["scalar_bytes_loaded"], total["rows"]) * N,
        bytes_written=Fraction(total["block_bytes_stored"], elements) * N * V
        + Fraction(total["scalar_bytes_stored"], total["rows"]) * N,
    )


@dataclass
class Fit:
    """metric = a + b * chunks + c * rows + d * step (step: rows per chunk, at most the rows)."""

    a: Fraction
    b: Fraction
    c: Fraction
    d: Fraction

    def at(self, rows: int, chunks: int, step: int) -> Fraction:
        return self.a + self.b * chunks + self.c * rows + self.d * min(step, rows)


# (rows, step) of the measurements, in units of s: A, B, C, D for the counts, B, D, E for the peak
PLAN = {"A": (1, 1), "B": (2, 1), "C": (2, 2), "D": (4, 2), "E": (3, 1)}


def fit_counts(m: dict, s: int) -> Fit:
    """Launches, bytes, syncs: a + b chunks + c rows + d step (d: per-call buffers of one chunk's size)."""
    A, B, C, D = (Fraction(m[k]) for k in "ABCD")
    cs = (D - C) - (B - A)
    b = (B - A) - cs
    ds = (C - A) - cs
    return Fit(A - b - cs - ds, b, cs / s, ds / s)


def fit_peak(m: dict, s: int) -> Fit:
    """The peak is a max over time, not a sum over chunks: a + c rows + d step, fitted on calls of two or
    more chunks (while chunk k is solved, chunk k-1's solution is still referenced: a single-chunk call
    peaks lower)."""
    B, D, E = (Fraction(m[k]) for k in "BDE")
    cs = E - B
    ds = (D - B) - 2 * cs
    return Fit(B - 2 * cs - ds, Fraction(0), cs / s, ds / s)


def extrapolate(case: Case, N: int, V: int, dtype, s: int, hidden: int = 2048, V_meas: Optional[int] = None) -> dict:
    """The case's costs at N x V, from five measurements of s..4s rows at V_meas (default V) classes
    (``PLAN``): per call, per chunk, and the fits. Per-row bytes scale by V / V_meas (Triton cases).
    ``model_ok``: the count fit (from A-D) also predicts measurement E exactly."""
    Vm = V_meas or V
    step = full_step(case, V, N, hidden)
    s = max(1, min(s, step // 2))  # measured chunks stay smaller than the real ones
    measure(case, s, s, Vm, dtype, hidden)  # warm-up: first calls cache constants (extra .item()s), as on a GPU
    runs = {k: measure(case, r * s, st * s, Vm, dtype, hidden) for k, (r, st) in PLAN.items()}
    chunks = math.ceil(N / step)
    scale = Fraction(V, Vm)
    out = {"case": case.name, "N": N, "V": V, "step": step, "chunks": chunks, "rows_measured": s, "V_measured": Vm}
    model_ok = True
    for k in METRICS:  # ATen ops only (deterministic); the Triton kernels are added below
        values = {name: r[k] for name, r in runs.items()}
        f = fit_peak(values, s) if k == "peak_bytes" else fit_counts(values, s)
        if k != "peak_bytes":
            model_ok &= f.at(3 * s, 3, s) == values["E"]
        if k not in ("launches", "syncs"):  # bytes per row grow with V
            f = Fit(f.a, f.b, f.c * scale, f.d * scale)
        out[k] = f.at(N, chunks, step)
        out[k + "_per_chunk"] = f.b + f.c * min(step, N) if k != "peak_bytes" else Fraction(0)
        out[k + "_fit"] = (f.a, f.b, f.c, f.d)
    out["model_ok"] = model_ok
    out["launches_one_chunk"] = runs["A"]["launches"]
    if "kernel" in runs["A"]:
        kc = kernel_costs([r["kernel"] for r in runs.values()], N, V)
        # kernel launches: fixed per call (the loss kernels) or per chunk (the fused heads)
        lf = fit_counts({name: r["kernel"]["launches"] for name, r in runs.items()}, s)
        out["launches"] += lf.at(N, chunks, step)
        out["launches_per_chunk"] += lf.b + lf.c * min(step, N)
        out["launches_one_chunk"] += kc["launches"]
        out["bytes_read"] += kc["bytes_read"]
        out["bytes_written"] += kc["bytes_written"]
        out.update(kernel_launches=kc["launches"], kernels=kc["kernels"], passes_read=kc["passes_read"],
                   passes_written=kc["passes_written"])
    for key in ("op_launches", "op_bytes", "op_syncs"):
        out[key] = runs["A"][key]
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def roofline_s(r: dict) -> float:
    """H100 estimate: traffic at 3.35 TB/s plus 5 us per launch (no overlap, no cache reuse)."""
    return float(r["bytes_read"] + r["bytes_written"]) / H100_BYTES_PER_S + float(r["launches"]) * H100_LAUNCH_S


def budget_verdict(case: Case, r: dict, base: Optional[dict]) -> str:
    """The issue's budgets: traffic <= k x the baseline's, launches <= 50 for a call of one chunk."""
    parts = []
    if case.traffic_budget is not None and base is not None:
        ratio = float(r["bytes_read"] + r["bytes_written"]) / float(base["bytes_read"] + base["bytes_written"])
        verdict = "pass" if ratio <= case.traffic_budget else "FAIL"
        parts.append(f"traffic {ratio:.2f}x<={case.traffic_budget:g}x {verdict}")
    if case.launch_budget is not None:
        n = r["launches_one_chunk"]
        parts.append(f"launches {n}<={case.launch_budget} {'pass' if n <= case.launch_budget else 'FAIL'}")
    return "; ".join(parts) or "-"


def table(results: list[dict], by_name: dict, unit: int) -> str:
    head = ("| case | launches/call | launches/chunk | written x[N,V] | read x[N,V] | syncs | peak extra x[N,V] "
            "| H100 est. ms | x base est. | budget |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        case = by_name[r["case"]]
        base = next((b for b in results if b["case"] == case.baseline), None)
        est = roofline_s(r)
        ratio = f"{est / roofline_s(base):.2f}" if base is not None else "1.00"
        flag = "" if r.get("model_ok", True) else "?"
        lines.append(
            f"| {r['case']} | {float(r['launches']):.0f}{flag} | {float(r['launches_per_chunk']):.0f} "
            f"| {float(r['bytes_written']) / unit:.2f} | {float(r['bytes_read']) / unit:.2f} | {float(r['syncs']):.0f} "
            f"| {float(r['peak_bytes']) / unit:.2f} | {est * 1e3:.3f} | {ratio} | {budget_verdict(case, r, base)} |")
    return "\n".join(lines)


def top_ops(r: dict, k: int, unit_measured: int) -> str:
    """The k ATen ops (and Triton kernels) with most bytes and most launches, in the 1-chunk measurement."""
    by_bytes = sorted(r["op_bytes"].items(), key=lambda kv: -kv[1])[:k]
    by_count = sorted(r["op_launches"].items(), key=lambda kv: -kv[1])[:k]
    b = ", ".join(f"{n} {v / unit_measured:.2f}" for n, v in by_bytes)
    c = ", ".join(f"{n} {v}" for n, v in by_count)
    syncs = ", ".join(f"{n} {v}" for n, v in r["op_syncs"].items()) or "none"
    return (f"- **{r['case']}** (one chunk of {r['rows_measured']} x {r['V_measured']}): by bytes x[rows,V]: {b}; "
            f"by launches: {c}; syncs: {syncs}")


def _jsonable(x):
    if isinstance(x, Fraction):
        return float(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _triton_ready() -> bool:
    """Triton can run here: CUDA, or the interpreter. Without CUDA this sets TRITON_INTERPRET=1, which
    only takes effect if hf_fdiv's kernels module was not imported before (as tests/conftest.py does)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from hf_fdiv.solver import triton_available
    except ImportError:
        return False
    return triton_available()


def parse_shape(s: str) -> tuple[int, int]:
    n, v = s.lower().split("x")
    return int(n), int(v)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", help="NxV (repeatable; default 8192x32768 and 8192x128256)")
    ap.add_argument("--dtype", action="append", help="float32 / bfloat16, one per --shape (default float32, bfloat16)")
    ap.add_argument("--rows", type=int, default=4, help="rows per measured chunk s (measured: s and 2s rows)")
    ap.add_argument("--hidden", type=int, default=2048, help="H of the fused LM head cases")
    ap.add_argument("--triton-shape", default=None,
                    help="rows x V the Triton kernels are measured at (default: 4 rows of the full shape's V, "
                         "so that the kernels take the full shape's tiling: one tile up to V = 32768)")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton cases")
    ap.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel's cases (run when it is installed)")
    ap.add_argument("--all-divergences", action="store_true",
                    help="also every other built-in generator's loss and operator on the batched backend")
    ap.add_argument("--only", action="append", help="keep cases whose name contains this (baselines always kept)")
    ap.add_argument("--top", type=int, default=0, help="also list each case's top-K ops by bytes and by launches")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in (args.shape or ["8192x32768", "8192x128256"])]
    dtypes = args.dtype or (["float32", "bfloat16"] if not args.shape else ["float32"] * len(shapes))
    if len(dtypes) == 1 and len(shapes) > 1:
        dtypes = dtypes * len(shapes)
    triton = not args.no_triton and _triton_ready()
    liger = triton and not args.no_liger and _liger_ready()
    all_cases = [c for c in cases(triton, args.all_divergences, liger)
                 if c.baseline is None or not args.only or any(o in c.name for o in args.only)]
    by_name = {c.name: c for c in all_cases}
    report = {"shapes": []}
    for (N, V), dname in zip(shapes, dtypes):
        dtype = getattr(torch, dname)
        tn, tv = parse_shape(args.triton_shape) if args.triton_shape else (4, V)
        results = []
        for case in all_cases:
            print(f"  measuring {case.name} ...", file=sys.stderr, flush=True)
            if case.backend == "triton" or case.kernels:
                results.append(extrapolate(case, N, V, dtype, tn, args.hidden, V_meas=tv))
            else:
                results.append(extrapolate(case, N, V, dtype, args.rows, args.hidden))
        unit = N * V * 4
        step = full_step(Case("", None, None, backend="batched"), V)
        print(f"\n## {N} x {V} {dname}, forward + backward per call (counted on CPU; bytes in units of one "
              f"[N, V] fp32 buffer = {unit / 2**20:.0f} MiB; rows per chunk {step}, {math.ceil(N / step)} chunks)\n")
        print(table(results, by_name, unit))
        print("\nH100 est. = (read + written) / 3.35 TB/s + launches x 5 us: an ESTIMATE, not a measurement. "
              "Budgets (issue 23): traffic vs F.cross_entropy / torch.softmax; launches of a one-chunk call <= 50.")
        tri = [r for r in results if "passes_read" in r]
        if tri:
            print(f"\nTriton kernels, measured under the interpreter at {tn} x {tv} (passes over a row; Newton "
                  "passes stop early per row, so they depend on the data):\n")
            for r in tri:
                print(f"- {r['case']}: {r['kernel_launches']} kernel launches {r['kernels']}; reads "
                      f"{r['passes_read']:.2f} passes per row, writes {r['passes_written']:.2f}")
        if args.top:
            print(f"\nTop {args.top} ops per case (one measured chunk; bytes in units of that chunk's [rows, V] "
                  "fp32):\n")
            for r in results:
                print(top_ops(r, args.top, r["rows_measured"] * r["V_measured"] * 4))
        report["shapes"].append({"N": N, "V": V, "dtype": dname, "unit_bytes": unit, "results": results})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(report), fh, indent=1)
    return report["shapes"]


if __name__ == "__main__":
    main()
