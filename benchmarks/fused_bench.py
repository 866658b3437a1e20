"""Fused LM-head f-divergence loss vs the materialised path vs F.cross_entropy, in one process.

    python benchmarks/fused_bench.py                          # 8192 tokens x H 576 x V 49152 (SmolLM2 head)
    python benchmarks/fused_bench.py --tokens 2048 --divergence kl --divergence js

Each case runs forward + backward of sum-reduced loss(hidden @ W^T) w.r.t. hidden and W (fp32).
"materialised" forms the [tokens, V] logits with autograd; "fused" is hf_fdiv.fused_linear_fdiv_loss.
Time: median of --repeats runs after a warm-up. Memory: peak extra RSS of one more run (see
loss_bench.py for the method).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hf_fdiv
from hf_fdiv.fused import fused_linear_fdiv_loss

from loss_bench import PeakRSS, cpu_name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--divergence", action="append", help="repeatable; default alpha:1.5 and kl")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    divs = args.divergence or ["alpha:1.5", "kl"]
    N, H, V = args.tokens, args.hidden, args.vocab
    torch.manual_seed(0)
    h = torch.randn(N, H).requires_grad_()
    W = (torch.randn(V, H) * H**-0.5 * 3).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::10] = -100  # some ignored tokens, like prompts

    def run(fn):
        def go():
            loss = fn()
            loss.backward()
            h.grad = W.grad = None
        return go

    cases = {"F.cross_entropy (materialised)": run(lambda: F.cross_entropy(h @ W.T, t, reduction="sum"))}
    for d in divs:
        cases[f"{d} materialised"] = run(lambda d=d: hf_fdiv.fdiv_loss(h @ W.T, t, d, reduction="sum"))
        cases[f"{d} fused"] = run(lambda d=d: fused_linear_fdiv_loss(h, W, t, d))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{N} tokens x H {H} x V {V}, fp32")
    res = {}
    for name, go in cases.items():
        go()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            go()
            times.append(time.perf_counter() - t0)
        with PeakRSS() as mem:
            go()
        res[name] = (statistics.median(times), mem.extra)
        print(f"  {name:<34} {res[name][0] * 1e3:9.0f} ms   peak extra {mem.extra / 2**20:7.0f} MiB", flush=True)
    ce_t, ce_m = res["F.cross_entropy (materialised)"]
    print("\n| case | fwd+bwd | x CE | peak extra | x CE peak |")
    print("|---|---:|---:|---:|---:|")
    for name, (tm, mm) in res.items():
        print(f"| {name} | {tm * 1e3:.0f} ms | {tm / ce_t:.2f} | {mm / 2**20:.0f} MiB | {mm / max(ce_m, 1):.2f} |")
    print()
    for d in divs:
        (ft, fm), (mt, mm) = res[f"{d} fused"], res[f"{d} materialised"]
        print(f"{d}: fused / materialised time = {ft / mt:.2f} (target <= 1.3); "
              f"peak memory = {fm / max(mm, 1):.1%} (target <= 25%)")


if __name__ == "__main__":
    main()
