"""GPU speed and memory of hf_fdiv against the best cross-entropy and softmax kernels (issue 11), one process.

    python -u benchmarks/gpu_bench.py                                 # every case; < 5 minutes on one H100
    python -u benchmarks/gpu_bench.py --only loss_fp32 --only fused   # case-name filters (substrings)
    python -u benchmarks/gpu_bench.py --backends auto,batched,triton  # every hf_fdiv row once per solver path
    python benchmarks/gpu_bench.py --device cpu --scale tiny --out /tmp/gpu_bench.json   # smoke test
    python benchmarks/gpu_bench.py --list                             # the case names

Cases (``case/impl`` names; ``--only`` keeps the rows whose name contains one of its strings, plus
the case's baseline row, the first one listed):

    loss_fp32          8192 x 32768 fp32 logits: F.cross_entropy, Liger CrossEntropy, entmax Entmax15Loss
                       and EntmaxBisectLoss(alpha=1.5), fdiv_loss kl / alpha:1.5 / js
    loss_bf16          8192 x 128256 bf16 logits: the same, fdiv_loss alpha:1.5 and kl
    op_alpha_bf16      8192 x 128256 bf16: torch.softmax, entmax.entmax15, f_softargmax alpha:1.5, and
                       f_softargmax alpha:2 (sparsemax where LigerSparsemax does not run)
    op_sparsemax_fp32  8192 x 32768 fp32: torch.softmax, LigerSparsemax (V <= 65536), f_softargmax alpha:2
    fused_bf16         LM head, 8192 tokens, H 2048, V 128256, bf16, loss = sum over tokens: materialised
                       F.cross_entropy((h @ W^T).float()) (as transformers upcasts), Liger
                       FusedLinearCrossEntropy, fused_linear_fdiv_loss alpha:1.5 and kl
    model_step         SmolLM2-135M-shaped Llama (random init, bf16), 8 x 1024 tokens, forward + backward of
                       the whole model: stock loss (model(ids, labels=ids)), Liger FLCE on the backbone's last
                       hidden state, and fused_linear_fdiv_loss alpha:1.5 / kl as FDivSFTTrainer runs it

Every row is forward + backward with inputs that require grad (operators: a dense random upstream
gradient); ``--warmup`` untimed calls, then the median of ``--repeats`` calls (a single call when the
warm-up took longer than ``--slow-s``). On CUDA the time is CUDA events around the call and the peak is
``torch.cuda.max_memory_allocated()`` minus the memory allocated just before the call (outputs and
gradients included); on CPU (``--device cpu``: a smoke test, use ``--scale tiny``) the time is
``time.perf_counter`` and the peak is n/a. Liger-Kernel and entmax rows run when those packages import
(Liger on CUDA only); a row that runs out of memory is recorded as OOM and the run goes on.

hf_fdiv picks its solver from the environment variable ``HF_FDIV_SOLVER`` at call time;
``--backends`` runs each hf_fdiv row once per value (default: the variable's current value, else auto).

Output: a markdown table on stdout, one line per row as it finishes ("x base" is the ratio to the case's
first row, F.cross_entropy / torch.softmax / the stock step; "target" is the issue's headline target for
the row), then every target of the issue with pass / FAIL; JSON (rewritten after every row) in
``benchmarks/results/gpu_bench_<device-name>.json`` or ``--out``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import hf_fdiv
from hf_fdiv import f_softargmax, fdiv_loss
from hf_fdiv.fused import LogitTransform, fused_linear_fdiv_loss

from loss_bench import cpu_name

GiB = 2**30
ENV = "HF_FDIV_SOLVER"
HERE = os.path.dirname(os.path.abspath(__file__))

# Shapes of the issue (scale "full") and a tiny version of each for a CPU smoke test.
SCALES = {
    "full": dict(
        N=8192, V=32768, V_big=128256, fused_N=8192, fused_H=2048, fused_V=128256,
        model=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152),
        batch=8, seq=1024,
    ),
    "tiny": dict(
        N=64, V=1000, V_big=1500, fused_N=64, fused_H=32, fused_V=1500,
        model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=1000),
        batch=2, seq=32,
    ),
}


# ----------------------------------------------------------------------------- optional packages
def _optional(import_fn, package: str):
    """The imported object, or the reason it is unavailable (a short string)."""
    try:
        return import_fn()
    except ImportError as err:
        if (getattr(err, "name", None) or "").split(".")[0] == package:
            return "not installed"
        return f"import failed ({' '.join(str(err).split())[:60]})"
    except Exception as err:  # a package that fails at import (e.g. no usable triton)
        return f"import failed ({type(err).__name__})"


def _import_entmax():
    import entmax

    return entmax


def _import_liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    try:
        from liger_kernel.transformers import LigerSparsemax
    except ImportError:
        try:
            from liger_kernel.transformers.sparsemax import LigerSparsemax
        except ImportError:
            LigerSparsemax = None
    return dict(CE=LigerCrossEntropyLoss, FLCE=LigerFusedLinearCrossEntropyLoss, Sparsemax=LigerSparsemax)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- cases
class Unavailable(Exception):
    """A row that cannot run here (package missing, CPU device, shape out of range)."""


@dataclass
class Call:
    """One benchmarked call: ``run()`` is forward + backward and returns the loss (or None).

    ``grads`` are the tensors whose .grad the call fills (cleared after every call, checked for
    finiteness after the last); ``prepare`` runs untimed before every call."""

    run: Callable[[], Optional[torch.Tensor]]
    grads: list
    prepare: Optional[Callable[[], None]] = None


@dataclass
class RowSpec:
    name: str
    make: Callable[[dict], Call]
    ours: bool = False  # an hf_fdiv row: run once per backend


@dataclass
class Case:
    name: str
    shape: Callable[[dict], str]
    setup: Callable[[dict, torch.device], dict]
    rows: list


def _loss_call(ctx, fn) -> Call:
    x, t = ctx["x"], ctx["t"]

    def run():
        loss = fn(x, t)
        loss.backward()
        return loss

    return Call(run, [x])


def _op_call(ctx, fn) -> Call:
    x, g = ctx["x"], ctx["g"]

    def run():
        p = fn(x)
        p.backward(g)
        return None

    return Call(run, [x])


def _need_cuda(ctx, what):
    if ctx["device"].type != "cuda":
        raise Unavailable(f"{what} needs CUDA")


def _first(out):
    """Liger's losses return the loss, or (loss, z_loss) in some versions."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _liger(ctx, key):
    lib = ctx["liger"]
    if isinstance(lib, str):
        raise Unavailable(f"liger_kernel {lib}")
    _need_cuda(ctx, "Liger-Kernel")
    if lib.get(key) is None:
        raise Unavailable(f"liger_kernel has no {key}")
    return lib[key]


def _entmax(ctx):
    lib = ctx["entmax"]
    if isinstance(lib, str):
        raise Unavailable(f"entmax {lib}")
    return lib


def liger_ce(ctx) -> Call:
    # Liger's CE writes the gradient into its input's storage: give it its own copy, refreshed
    # (untimed) before every call, so that the shared logits stay intact for the other rows.
    loss_fn = _liger(ctx, "CE")()
    x0, t = ctx["x"], ctx["t"]
    xl = x0.detach().clone().requires_grad_()

    def prepare():
        with torch.no_grad():
            xl.copy_(x0)

    def run():
        loss = _first(loss_fn(xl, t))
        loss.backward()
        return loss

    return Call(run, [xl], prepare)


def loss_setup(dtype_key, V_key):
    def setup(sc, device):
        dtype = torch.float32 if dtype_key == "fp32" else torch.bfloat16
        N, V = sc["N"], sc[V_key]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, V, device=device, dtype=dtype, generator=gen).mul_(2).requires_grad_()
        t = torch.randint(0, V, (N,), device=device, generator=gen)
        return dict(x=x, t=t)

    return setup


def op_setup(dtype_key, V_key):
    def setup(sc, device):
        ctx = loss_setup(dtype_key, V_key)(sc, device)
        x = ctx["x"]
        gen = torch.Generator(device=device).manual_seed(1)
        ctx["g"] = torch.randn(x.shape, device=device, dtype=x.dtype, generator=gen)
        return ctx

    return setup


def _fdiv_rows(divs):
    return [RowSpec(f"fdiv_loss {d}", lambda ctx, d=d: _loss_call(ctx, lambda x, t: fdiv_loss(x, t, d)), ours=True)
            for d in divs]


def _baseline_loss_rows():
    return [
        RowSpec("F.cross_entropy", lambda ctx: _loss_call(ctx, F.cross_entropy)),
        RowSpec("liger CrossEntropy", liger_ce),
        RowSpec("entmax Entmax15Loss",
                lambda ctx: _loss_call(ctx, lambda x, t: _entmax(ctx).Entmax15Loss()(x, t).mean())),
        RowSpec("entmax EntmaxBisectLoss",
                lambda ctx: _loss_call(ctx, lambda x, t: _entmax(ctx).EntmaxBisectLoss(alpha=1.5)(x, t).mean())),
    ]


def liger_sparsemax(ctx) -> Call:
    cls = _liger(ctx, "Sparsemax")
    if ctx["x"].shape[-1] > 65536:
        raise Unavailable("LigerSparsemax fails for V > 65536")
    mod = cls(dim=-1)
    return _op_call(ctx, mod)


# --- fused LM head
def fused_setup(sc, device):
    N, H, V = sc["fused_N"], sc["fused_H"], sc["fused_V"]
    gen = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    h = torch.randn(N, H, device=device, dtype=bf, generator=gen).requires_grad_()
    W = (torch.randn(V, H, device=device, dtype=bf, generator=gen) * (3 * H**-0.5)).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=gen)
    t[::10] = -100  # some ignored tokens, like prompts
    return dict(h=h, W=W, t=t)


def _fused_call(ctx, fn) -> Call:
    h, W, t = ctx["h"], ctx["W"], ctx["t"]

    def run():
        loss = fn(h, W, t)
        loss.backward()
        return loss

    return Call(run, [h, W])


def liger_flce(ctx) -> Call:
    loss_fn = _liger(ctx, "FLCE")(reduction="sum")
    return _fused_call(ctx, lambda h, W, t: _first(loss_fn(W, h, t)))


# --- model step
def model_setup(sc, device):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:
        raise Unavailable(f"transformers not available ({err})") from None
    config = LlamaConfig(
        **sc["model"], tie_word_embeddings=True, max_position_embeddings=max(2048, sc["seq"]), use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).train()
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (sc["batch"], sc["seq"]), device=device, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(model=model, ids=ids, params=params, config=config)


def _backbone_hidden(model, ids):
    # the decoder without the LM head, as FDivSFTTrainer reads it (its forward hook on base_model)
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def model_stock(ctx) -> Call:
    model, ids = ctx["model"], ctx["ids"]

    def run():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    return Call(run, ctx["params"])


def _model_fused(ctx, loss_of) -> Call:
    model, ids = ctx["model"], ctx["ids"]
    W = model.get_output_embeddings().weight
    labels = ids[:, 1:].reshape(-1)
    n_tokens = int((labels != -100).sum())

    def run():
        hidden = _backbone_hidden(model, ids)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        loss = loss_of(h, W, labels) / n_tokens
        loss.backward()
        return loss

    return Call(run, ctx["params"])


def model_liger(ctx) -> Call:
    loss_fn = _liger(ctx, "FLCE")(reduction="sum")
    return _model_fused(ctx, lambda h, W, y: _first(loss_fn(W, h, y)))


def model_fdiv(div):
    def make(ctx) -> Call:
        transform = LogitTransform.from_config(ctx["config"])
        return _model_fused(ctx, lambda h, W, y: fused_linear_fdiv_loss(h, W, y, div, transform=transform))

    return make


def _fmt_shape_loss(V_key, dtype):
    return lambda sc: f"{sc['N']} x {sc[V_key]} {dtype}"


CASES = [
    Case("loss_fp32", _fmt_shape_loss("V", "fp32"), loss_setup("fp32", "V"),
         _baseline_loss_rows() + _fdiv_rows(["kl", "alpha:1.5", "js"])),
    Case("loss_bf16", _fmt_shape_loss("V_big", "bf16"), loss_setup("bf16", "V_big"),
         _baseline_loss_rows() + _fdiv_rows(["alpha:1.5", "kl"])),
    Case("op_alpha_bf16", _fmt_shape_loss("V_big", "bf16"), op_setup("bf16", "V_big"), [
        RowSpec("torch.softmax", lambda ctx: _op_call(ctx, lambda x: torch.softmax(x, -1))),
        RowSpec("entmax entmax15", lambda ctx: _op_call(ctx, _entmax(ctx).entmax15)),
        RowSpec("f_softargmax alpha:1.5", lambda ctx: _op_call(ctx, lambda x: f_softargmax(x, "alpha:1.5")),
                ours=True),
        # sparsemax where LigerSparsemax cannot run (V > 65536)
        RowSpec("f_softargmax alpha:2", lambda ctx: _op_call(ctx, lambda x: f_softargmax(x, "alpha:2")), ours=True),
    ]),
    Case("op_sparsemax_fp32", _fmt_shape_loss("V", "fp32"), op_setup("fp32", "V"), [
        RowSpec("torch.softmax", lambda ctx: _op_call(ctx, lambda x: torch.softmax(x, -1))),
        RowSpec("liger Sparsemax", liger_sparsemax),
        RowSpec("f_softargmax alpha:2", lambda ctx: _op_call(ctx, lambda x: f_softargmax(x, "alpha:2")), ours=True),
    ]),
    Case("fused_bf16", lambda sc: f"{sc['fused_N']} tok, H {sc['fused_H']}, V {sc['fused_V']} bf16", fused_setup, [
        RowSpec("materialised F.cross_entropy",
                lambda ctx: _fused_call(ctx, lambda h, W, t: F.cross_entropy((h @ W.T).float(), t, reduction="sum"))),
        RowSpec("liger FusedLinearCE", liger_flce),
        RowSpec("fused alpha:1.5",
                lambda ctx: _fused_call(ctx, lambda h, W, t: fused_linear_fdiv_loss(h, W, t, "alpha:1.5")), ours=True),
        RowSpec("fused kl",
                lambda ctx: _fused_call(ctx, lambda h, W, t: fused_linear_fdiv_loss(h, W, t, "kl")), ours=True),
    ]),
    Case("model_step",
         lambda sc: (f"Llama {sc['model']['num_hidden_layers']}L H {sc['model']['hidden_size']} "
                     f"V {sc['model']['vocab_size']}, {sc['batch']} x {sc['seq']} tok bf16"),
         model_setup, [
             RowSpec("stock loss", model_stock),
             RowSpec("liger FusedLinearCE", model_liger),
             RowSpec("alpha:1.5 fused", model_fdiv("alpha:1.5"), ours=True),
             RowSpec("kl fused", model_fdiv("kl"), ours=True),
         ]),
]


@dataclass
class Target:
    case: str
    row: str
    ref: str  # the row it is compared with (same case)
    limit: float
    metric: str = "time"  # "time" or "peak": ratio row / ref must be <= limit
    label: str = ""

    def describe(self) -> str:
        what = "peak" if self.metric == "peak" else "time"
        return self.label or f"{what} <= {self.limit:g}x {self.ref}"


# The targets (one H100, full scale). The first target of a row is its "target" column.
TARGETS = [
    Target("loss_fp32", "fdiv_loss kl", "F.cross_entropy", 1.1),
    Target("loss_bf16", "fdiv_loss kl", "F.cross_entropy", 1.1),
    Target("loss_fp32", "fdiv_loss alpha:1.5", "F.cross_entropy", 1.5),
    Target("loss_bf16", "fdiv_loss alpha:1.5", "F.cross_entropy", 1.5),
    Target("loss_fp32", "fdiv_loss alpha:1.5", "entmax EntmaxBisectLoss", 0.1,
           label=">= 10x faster than entmax EntmaxBisectLoss"),
    Target("loss_bf16", "fdiv_loss alpha:1.5", "entmax EntmaxBisectLoss", 0.1,
           label=">= 10x faster than entmax EntmaxBisectLoss"),
    Target("loss_fp32", "fdiv_loss alpha:1.5", "F.cross_entropy", 1.0, "peak"),
    Target("loss_bf16", "fdiv_loss alpha:1.5", "F.cross_entropy", 1.0, "peak"),
    Target("loss_bf16", "fdiv_loss alpha:1.5", "liger CrossEntropy", 2.0, label="stretch: time <= 2x liger CrossEntropy"),
    Target("loss_bf16", "fdiv_loss kl", "liger CrossEntropy", 2.0, label="stretch: time <= 2x liger CrossEntropy"),
    Target("loss_fp32", "fdiv_loss js", "F.cross_entropy", 3.0),
    Target("op_alpha_bf16", "f_softargmax alpha:1.5", "torch.softmax", 2.0),
    Target("op_alpha_bf16", "f_softargmax alpha:2", "torch.softmax", 2.0),
    Target("op_sparsemax_fp32", "f_softargmax alpha:2", "torch.softmax", 2.0),
    Target("op_sparsemax_fp32", "f_softargmax alpha:2", "liger Sparsemax", 1.0),
    Target("fused_bf16", "fused alpha:1.5", "liger FusedLinearCE", 1.0),
    Target("fused_bf16", "fused alpha:1.5", "liger FusedLinearCE", 1.5, "peak"),
    Target("fused_bf16", "fused kl", "liger FusedLinearCE", 1.2),
    Target("model_step", "alpha:1.5 fused", "stock loss", 1.1),
]


# ----------------------------------------------------------------------------- measuring
@dataclass
class Result:
    case: str
    impl: str
    backend: Optional[str]
    shape: str
    ours: bool
    status: str = "ok"  # ok | OOM | error: ... | n/a: ...
    times_ms: list = field(default_factory=list)
    median_ms: Optional[float] = None
    peak_gib: Optional[float] = None
    value: Optional[float] = None
    grad_finite: Optional[bool] = None
    ratio: Optional[float] = None
    peak_ratio: Optional[float] = None
    wall_s: float = 0.0
    targets: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.case}/{self.impl}"


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and ("out of memory" in msg or "can't allocate memory" in msg)


def _clear(call: Call) -> None:
    for t in call.grads:
        t.grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Call, device, warmup: int, repeats: int, slow_s: float, res: Result) -> None:
    cuda = device.type == "cuda"
    warm_s = 0.0
    for _ in range(warmup):
        if call.prepare:
            call.prepare()
        _sync(device)
        t0 = time.perf_counter()
        call.run()
        _sync(device)
        warm_s = time.perf_counter() - t0
        _clear(call)
    reps = 1 if warm_s > slow_s else max(1, repeats)
    peak, loss = 0, None
    for i in range(reps):
        if call.prepare:
            call.prepare()
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = call.run()
            end.record()
            end.synchronize()
            res.times_ms.append(start.elapsed_time(end))
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            t0 = time.perf_counter()
            loss = call.run()
            res.times_ms.append((time.perf_counter() - t0) * 1e3)
        if i == reps - 1:
            res.value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else None
            grads = [t.grad for t in call.grads if t.grad is not None]
            res.grad_finite = bool(all(bool(torch.isfinite(g).all()) for g in grads)) if grads else None
        loss = None
        _clear(call)
    res.median_ms = statistics.median(res.times_ms)
    res.peak_gib = peak / GiB if cuda else None


def _free(device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_row(spec: RowSpec, ctx: dict, device, args, res: Result) -> None:
    t0 = time.perf_counter()
    failure = None
    call = None
    try:
        call = spec.make(ctx)
        measure(call, device, args.warmup, args.repeats, args.slow_s, res)
    except Unavailable as err:
        failure = f"n/a: {err}"
    except Exception as err:  # OOM, or a baseline / backend that fails here: record it and go on
        failure = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    if failure is not None:
        res.status, res.times_ms, res.median_ms, res.peak_gib = failure, [], None, None
    if call is not None:
        _clear(call)
    call = None
    _free(device)
    res.wall_s = time.perf_counter() - t0


# ----------------------------------------------------------------------------- reporting
def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def _fmt(v: Optional[float], nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def evaluate_target(tg: Target, res: Result, done: dict) -> dict:
    ref = done.get((tg.case, tg.ref))
    out = dict(target=tg.describe(), limit=tg.limit, metric=tg.metric, ref=tg.ref, ratio=None, verdict="n/a")
    if res.status != "ok":
        out["verdict"] = f"n/a ({res.status.split(':')[0]})"
    elif ref is None or ref.status != "ok":
        out["verdict"] = f"n/a ({tg.ref}: {'not run' if ref is None else ref.status.split(':')[0]})"
    else:
        a, b = (res.median_ms, ref.median_ms) if tg.metric == "time" else (res.peak_gib, ref.peak_gib)
        if a is None or b is None or not b > 0:
            out["verdict"] = "n/a (no memory figure)" if tg.metric == "peak" else "n/a"
        else:
            out["ratio"] = a / b
            out["verdict"] = "pass" if a / b <= tg.limit else "FAIL"
    return out


def table_line(res: Result) -> str:
    if res.status == "ok":
        t, p = _fmt_ms(res.median_ms), _fmt(res.peak_gib) if res.peak_gib is not None else "n/a"
    else:
        t, p = res.status if len(res.status) <= 60 else res.status[:57] + "...", "-"
    ratio = _fmt(res.ratio) if res.ratio is not None else "-"
    tgt = ""
    if res.targets:
        first = res.targets[0]
        r = f"{first['ratio']:.2f}" if first["ratio"] is not None else ""
        tgt = f"{first['target']}: {r} {first['verdict']}".replace("  ", " ")
    impl = f"**{res.impl}**" if res.ours else res.impl
    return f"| {res.case} | {impl} | {res.backend or ''} | {res.shape} | {t} | {p} | {ratio} | {tgt} |"


TABLE_HEAD = ("| case | impl | backend | shape, dtype | time ms | peak GiB | x base | target |\n"
              "|---|---|---|---|---:|---:|---:|---|")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"


def _selected(name: str, only: list) -> bool:
    return not only or any(o.lower() in name.lower() for o in only)


def plan(only: list) -> list:
    """[(case, [row specs])]: the rows matching --only, with each case's baseline (its first row)."""
    out = []
    for case in CASES:
        rows = [r for r in case.rows if _selected(f"{case.name}/{r.name}", only)]
        if rows:
            if rows[0] is not case.rows[0]:
                rows.insert(0, case.rows[0])
            out.append((case, rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (default when available), cuda:1, or cpu (smoke test: use --scale tiny)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full", help="full: the issue's shapes; tiny: N 64, V 1000")
    ap.add_argument("--only", action="append", default=[],
                    help="keep rows whose case/impl name contains this (case-insensitive); repeatable or comma-separated")
    ap.add_argument("--backends", default=os.environ.get(ENV, "auto") or "auto",
                    help=f"comma-separated {ENV} values, each hf_fdiv row runs once per value (default: ${ENV} or auto)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (median); default 3")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per row first; default 1")
    ap.add_argument("--slow-s", type=float, default=10.0,
                    help="a row whose warm-up call took longer than this gets a single timed call; default 10")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip the rows left once this much wall time has passed (0: no limit)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_bench_<device-name>.json)")
    ap.add_argument("--list", action="store_true", help="print the case/impl names and exit")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    only = [s.strip() for o in args.only for s in o.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] or ["auto"]
    if args.list:
        for case in CASES:
            for r in case.rows:
                print(f"{case.name}/{r.name}" + ("   (hf_fdiv)" if r.ours else ""))
        return 0
    todo = plan(only)
    if not todo:
        print(f"no case matches --only {only}; see --list", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run with --device cpu --scale tiny for a smoke test", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    sc = SCALES[args.scale]
    if device.type == "cpu" and args.scale == "full":
        print("warning: the full-scale cases on CPU take very long (and > 60 GiB); use --scale tiny", file=sys.stderr)
    dev_name = device_name(device)
    out_path = args.out or os.path.join(
        HERE, "results", f"gpu_bench_{slug(dev_name)}{'' if args.scale == 'full' else '_' + args.scale}.json")
    entmax_lib = _optional(_import_entmax, "entmax")
    liger_lib = _optional(_import_liger, "liger_kernel")
    env_before = os.environ.get(ENV)
    meta = dict(
        device=dev_name, device_type=device.type, scale=args.scale,
        torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"), hf_fdiv=hf_fdiv.__version__,
        transformers=_version("transformers"), liger_kernel=_version("liger-kernel") or _version("liger_kernel"),
        entmax=_version("entmax"), python=platform.python_version(), backends=backends, env_solver=env_before,
        repeats=args.repeats, warmup=args.warmup, slow_s=args.slow_s, only=only,
        time_method="CUDA events" if device.type == "cuda" else "time.perf_counter",
        memory_method=("torch.cuda.max_memory_allocated - memory_allocated before the call"
                       if device.type == "cuda" else "n/a"),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    results: list = []

    def save(final=False):
        meta["complete"] = final
        meta["total_s"] = time.perf_counter() - t_start
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(dict(meta=meta, rows=[r.__dict__ for r in results]), fh, indent=1, default=str)
        os.replace(tmp, out_path)

    def log(msg):
        if not args.quiet:
            print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    print(f"# gpu_bench: {dev_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {meta['triton']}; "
          f"hf_fdiv {hf_fdiv.__version__}; liger-kernel {meta['liger_kernel']}; entmax {meta['entmax']}; "
          f"transformers {meta['transformers']}", flush=True)
    print(f"# scale {args.scale}; forward + backward; median of {args.repeats} after {args.warmup} warm-up; "
          f"time by {meta['time_method']}; peak = {meta['memory_method']}; {ENV} backends {','.join(backends)}\n",
          flush=True)
    print(TABLE_HEAD, flush=True)
    done: dict = {}
    try:
        for case, specs in todo:
            shape = case.shape(sc)
            ctx = None
            setup_failure = None
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                setup_failure = "n/a: time budget spent"
            else:
                log(f"{case.name}: setting up {shape}")
                try:
                    ctx = case.setup(sc, device)
                    ctx.update(device=device, entmax=entmax_lib, liger=liger_lib)
                except Unavailable as err:
                    setup_failure = f"n/a: {err}"
                except Exception as err:
                    setup_failure = ("OOM" if _is_oom(err)
                                     else f"error: setup: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
                    ctx = None
                _free(device)
            for spec in specs:
                for backend in (backends if spec.ours else [None]):
                    res = Result(case.name, spec.name, backend, shape, spec.ours)
                    if setup_failure:
                        res.status = setup_failure
                    elif args.budget_s and time.perf_counter() - t_start > args.budget_s:
                        res.status = "n/a: time budget spent"
                    else:
                        log(f"{res.name}" + (f" [{ENV}={backend}]" if backend else ""))
                        if backend is not None:
                            os.environ[ENV] = backend
                        try:
                            run_row(spec, ctx, device, args, res)
                        finally:
                            if env_before is None:
                                os.environ.pop(ENV, None)
                            else:
                                os.environ[ENV] = env_before
                    base = done.get((case.name, case.rows[0].name))
                    if res.status == "ok" and base is not None and base.status == "ok":
                        res.ratio = res.median_ms / base.median_ms if base.median_ms else None
                        if res.peak_gib is not None and base.peak_gib:
                            res.peak_ratio = res.peak_gib / base.peak_gib
                    if spec.ours:
                        res.targets = [evaluate_target(tg, res, done) for tg in TARGETS
                                       if tg.case == case.name and tg.row == spec.name]
                    if not spec.ours or (case.name, spec.name) not in done:
                        done[(case.name, spec.name)] = res  # baselines; hf_fdiv rows: the first backend
                    results.append(res)
                    print(table_line(res), flush=True)
                    save()
            ctx = None
            gc.collect()
            _free(device)
    except KeyboardInterrupt:
        print("\ninterrupted: partial results", flush=True)

    ours = [r for r in results if r.ours and r.targets]
    if ours:
        print("\nTargets of issue 11" + (" (measured at full scale on one H100; at this scale for information only)"
                                          if args.scale != "full" or device.type != "cuda" else "") + ":\n")
        print("| case | impl | backend | target | ratio | verdict |\n|---|---|---|---|---:|---|")
        for r in ours:
            for t in r.targets:
                print(f"| {r.case} | {r.impl} | {r.backend} | {t['target']} | "
                      f"{_fmt(t['ratio']) if t['ratio'] is not None else '-'} | {t['verdict']} |", flush=True)
        verdicts = [t["verdict"] for r in ours for t in r.targets]
        print(f"\n{verdicts.count('pass')} pass, {verdicts.count('FAIL')} FAIL, "
              f"{sum(v.startswith('n/a') for v in verdicts)} n/a", flush=True)
    bad = [r for r in results if r.ours and r.status == "ok" and (r.grad_finite is False or
                                                                  (r.value is not None and not math.isfinite(r.value)))]
    for r in bad:
        print(f"WARNING: {r.name} [{r.backend}] gave a non-finite loss or gradient", flush=True)
    save(final=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; JSON: {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
