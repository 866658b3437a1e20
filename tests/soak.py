"""`make test-soak`: the 2-process runs, many times over, to catch a run that does not exit (issue 26).

    python tests/soak.py [--runs 50] [--fsdp2-runs 10] [--timeout 120] [--log build/soak.log]

Each launch is the README's multi-process recipe: ``accelerate launch --config_file
examples/accelerate_configs/cpu_2proc.yaml`` on a script that trains and ends with
``finish_distributed(trainer)`` (tests/dist_worker.py: one SFT step, alpha:1.5, or one distillation step,
js), ``--runs`` times each; then ``--fsdp2-runs`` launches of tests/sharded_worker.py under FSDP2 (gloo on
CPU, one SFT case, 3 steps). Every launch goes through tests/launch.py: its own session, a timeout, every
process killed after it. A launch is

* ``ok``: exit 0 and the parameters written;
* ``hang``: it did not end within ``--timeout`` (or a rank's faulthandler timer fired);
* ``abort``: a rank died of a signal (e.g. "terminate called without an active exception");
* ``fail``: any other non-zero exit.

Prints one line per launch and a summary; the full output of every launch that was not ``ok`` (with the
stacks of all ranks for a hang) goes to ``--log``. Exits 1 unless every launch was ``ok``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import ROOT, accelerate_launch, launch  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
SHARDED = os.path.join(ROOT, "tests", "sharded_worker.py")
#: what a rank that died of a signal leaves in the launcher's output
ABORT = re.compile(r"terminate called|Aborted|Fatal Python error|Signal \d+ \(SIG|exitcode\s*:\s*-\d+")


def classify(run, wrote: bool) -> str:
    if run.timed_out or "Timeout (0:" in run.output:  # faulthandler.dump_traceback_later's header
        return "hang"
    if run.returncode == 0 and wrote:
        return "ok"
    if (run.returncode is not None and run.returncode < 0) or ABORT.search(run.output):
        return "abort"
    return "fail"


def one(kind: str, timeout: float) -> tuple[str, object]:
    out = tempfile.mkdtemp(prefix=f"soak-{kind}-")
    try:
        if kind == "fsdp2":
            run = launch(accelerate_launch("cpu_fsdp2.yaml", SHARDED, out, "fsdp2", "sft_alpha"), timeout=timeout)
            wrote = os.path.exists(os.path.join(out, "sft_alpha-fsdp2.pt"))
        else:
            run = launch(accelerate_launch("cpu_2proc.yaml", WORKER, out, kind, 4), timeout=timeout)
            wrote = os.path.exists(os.path.join(out, "params-2.pt"))
        return classify(run, wrote), run
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="launches of each of the SFT and distillation runs")
    parser.add_argument("--fsdp2-runs", type=int, default=10, help="launches of the FSDP2 run (0: none)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a launch may take")
    parser.add_argument("--log", default=os.path.join(ROOT, "build", "soak.log"),
                        help="where the output of launches that were not ok goes")
    args = parser.parse_args(argv)
    plan = ["sft", "distill"] * args.runs + ["fsdp2"] * args.fsdp2_runs  # interleaved: load varies alike
    counts: Counter = Counter()
    start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    with open(args.log, "w") as log:
        for i, kind in enumerate(plan, 1):
            verdict, run = one(kind, args.timeout)
            counts[kind, verdict] += 1
            print(f"[{i}/{len(plan)}] {kind}: {verdict} ({run.seconds:.0f} s)", flush=True)
            if verdict != "ok":
                log.write(f"===== launch {i}, {kind}: {verdict}\n{run.report(tail=200_000)}\n")
                log.flush()
    bad = sum(n for (_, verdict), n in counts.items() if verdict != "ok")
    print(f"\nsoak: {len(plan)} launches in {time.perf_counter() - start:.0f} s, {bad} not ok")
    for kind in dict.fromkeys(plan):
        print(f"  {kind}: " + ", ".join(f"{v} {counts[kind, v]}" for v in ("ok", "hang", "abort", "fail")))
    if bad:
        print(f"the output of each launch that was not ok is in {args.log}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
