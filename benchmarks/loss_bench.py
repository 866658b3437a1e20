"""Speed and memory of hf_fdiv's loss and operator against F.cross_entropy, torch.softmax and entmax.

Everything runs in this one process so that the ratios compare like with like:

    python benchmarks/loss_bench.py                       # 2048 x 32000 (default)
    python benchmarks/loss_bench.py --shape 8192x32768 --shape 4096x131072
    python benchmarks/loss_bench.py --quick               # skip EntmaxBisectLoss (about 40 s a run)

Time: median of ``--repeats`` forward + backward runs after one warm-up (EntmaxBisectLoss: one run,
no warm-up, unless ``--bisect-repeats``). Logits are fp32 ``2 * randn``, targets uniform ids; the
operators get a dense random upstream gradient.

Memory: peak extra resident memory during one more (untimed) call, above the resident memory before
it (inputs and torch already resident), sampled every 0.2 ms from /proc/self/statm by a background
thread. It includes outputs and gradients, like the CPU tables in the README.
(EntmaxBisectLoss with one repeat is timed and sampled in the same run.)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import torch
import torch.nn.functional as F

import hf_fdiv

try:
    import entmax
except ImportError:  # pragma: no cover - entmax is a test extra
    entmax = None

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: peak RSS above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 2e-4):
        self.interval = interval

    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            r = _rss()
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        r = _rss()
        self.peak = max(self.peak, r)
        self.extra = self.peak - self.base


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def make_cases(N: int, V: int, include_bisect: bool):
    torch.manual_seed(0)
    x = (2 * torch.randn(N, V)).requires_grad_()
    t = torch.randint(0, V, (N,))
    g = torch.randn(N, V)

    def loss_case(fn):
        def run():
            loss = fn(x, t)
            loss.backward()
            x.grad = None
        return run

    def op_case(fn):
        def run():
            p = fn(x)
            p.backward(g)
            x.grad = None
        return run

    cases = {
        "F.cross_entropy": ("loss", loss_case(F.cross_entropy)),
        "fdiv_loss kl": ("loss", loss_case(lambda x, t: hf_fdiv.fdiv_loss(x, t, "kl"))),
        "fdiv_loss alpha:1.5": ("loss", loss_case(lambda x, t: hf_fdiv.fdiv_loss(x, t, "alpha:1.5"))),
        "fdiv_loss js": ("loss", loss_case(lambda x, t: hf_fdiv.fdiv_loss(x, t, "js"))),
        "torch.softmax": ("op", op_case(lambda x: torch.softmax(x, -1))),
        "f_softargmax alpha:1.5": ("op", op_case(lambda x: hf_fdiv.f_softargmax(x, "alpha:1.5"))),
    }
    if entmax is not None:
        cases["entmax.Entmax15Loss"] = ("loss", loss_case(lambda x, t: entmax.Entmax15Loss()(x, t).mean()))
        cases["entmax.entmax15"] = ("op", op_case(entmax.entmax15))
        if include_bisect:
            cases["entmax.EntmaxBisectLoss"] = (
                "loss", loss_case(lambda x, t: entmax.EntmaxBisectLoss(alpha=1.5)(x, t).mean()),
            )
    return cases


def bench_shape(N: int, V: int, repeats: int, bisect_repeats: int, include_bisect: bool, skip=()):
    cases = make_cases(N, V, include_bisect)
    results = {}
    for name, (kind, run) in cases.items():
        if name in skip:
            continue
        slow = name == "entmax.EntmaxBisectLoss"
        reps = bisect_repeats if slow else repeats
        if not slow:
            run()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        # Memory from a separate run: the sampling thread would steal CPU and the GIL from timed runs.
        if slow and reps == 1:
            peak = None
        else:
            with PeakRSS() as mem:
                run()
            peak = mem.extra
        if peak is None:  # EntmaxBisectLoss: sample during its single timed run instead of another 40 s
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                run()
                times = [time.perf_counter() - t0]
            peak = mem.extra
        results[name] = (kind, statistics.median(times), peak)
        print(f"  {name:<26} {statistics.median(times) * 1e3:9.1f} ms   peak extra {peak / 2**20:8.0f} MiB",
              flush=True)
    return results


def report(N, V, results):
    ce = results["F.cross_entropy"]
    sm = results["torch.softmax"]
    print(f"\n| {N} x {V} | median fwd+bwd | x cross-entropy | x softmax | peak extra | x CE peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (kind, t, m) in results.items():
        print(f"| `{name}` | {t * 1e3:.0f} ms | {t / ce[1]:.2f} | {t / sm[1]:.2f} | {m / 2**20:.0f} MiB | "
              f"{m / max(ce[2], 1):.2f} |")
    a15 = results["fdiv_loss alpha:1.5"][1]
    lines = [
        f"alpha=1.5 loss / cross-entropy      = {a15 / ce[1]:.2f}  (target <= 1.25)",
        f"js loss / cross-entropy             = {results['fdiv_loss js'][1] / ce[1]:.2f}  (target <= 4)",
        f"kl loss / cross-entropy             = {results['fdiv_loss kl'][1] / ce[1]:.2f}  (target <= 1.1)",
        f"f_softargmax alpha=1.5 / softmax    = {results['f_softargmax alpha:1.5'][1] / sm[1]:.2f}  (target <= 2)",
        f"alpha=1.5 loss peak / CE peak       = {results['fdiv_loss alpha:1.5'][2] / max(ce[2], 1):.2f}  (target <= 1)",
    ]
    if "entmax.Entmax15Loss" in results:
        lines.append(f"Entmax15Loss / alpha=1.5 loss       = {results['entmax.Entmax15Loss'][1] / a15:.1f}x faster (target >= 4)")
    if "entmax.EntmaxBisectLoss" in results:
        lines.append(f"EntmaxBisectLoss / alpha=1.5 loss   = {results['entmax.EntmaxBisectLoss'][1] / a15:.1f}x faster (target >= 30)")
    print("\n" + "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="NxV, repeatable (default 2048x32000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bisect-repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="skip entmax.EntmaxBisectLoss")
    ap.add_argument("--skip", action="append", default=[],
                    help="case name to leave out, repeatable (e.g. entmax.entmax15: > 22 GiB at 4096x131072)")
    args = ap.parse_args()
    shapes = args.shape or ["2048x32000"]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"hf_fdiv {hf_fdiv.__version__}; entmax {getattr(entmax, '__version__', 'n/a')}")
    for s in shapes:
        N, V = (int(v) for v in s.lower().split("x"))
        print(f"\n[{N} x {V}] fp32")
        res = bench_shape(N, V, args.repeats, args.bisect_repeats, not args.quick, set(args.skip))
        report(N, V, res)


if __name__ == "__main__":
    main()
