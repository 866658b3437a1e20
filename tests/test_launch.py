"""tests/launch.py, the one way the tests start processes: a hung run ends at its timeout with every
process's stack printed and no process left behind, even one in a session of its own (as torchrun starts
each rank, issue 26)."""

from __future__ import annotations

import os
import sys
import textwrap

import psutil

from launch import HANG_DUMP_ENV, launch

# A launcher that starts a "rank" in a new session (as torchrun does) and waits for it; the rank hangs.
HUNG_TREE = textwrap.dedent("""
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", "import time\\ndef rank_hangs_here():\\n    time.sleep(600)\\n"
                             "rank_hangs_here()"], start_new_session=True)
    print("rank pid", rank.pid, flush=True)
    def launcher_waits_here():
        rank.wait()
    launcher_waits_here()
""")


def test_a_hung_run_is_ended_with_every_stack_and_nothing_left_behind():
    run = launch([sys.executable, "-c", HUNG_TREE], timeout=8)
    assert run.timed_out and run.returncode is None
    assert 8 <= run.seconds < 30
    rank_pid = int(run.stdout.split("rank pid")[1].split()[0])
    assert not psutil.pid_exists(rank_pid) or psutil.Process(rank_pid).status() == psutil.STATUS_ZOMBIE
    # both Python stacks, printed on SIGABRT by faulthandler (PYTHONFAULTHANDLER=1)
    assert "rank_hangs_here" in run.stderr and "launcher_waits_here" in run.stderr
    assert "timed out after" in run.report()


def test_a_worker_dumps_its_stacks_and_exits_before_the_timeout():
    worker = ("import sys, time; sys.path.insert(0, 'tests'); from launch import arm_hang_dump\n"
              "arm_hang_dump()\ndef worker_stuck_here():\n    time.sleep(600)\nworker_stuck_here()")
    run = launch([sys.executable, "-c", worker], timeout=60, env={HANG_DUMP_ENV: "2"})
    assert not run.timed_out and run.returncode == 1 and run.seconds < 30
    assert "Timeout (0:00:02)" in run.stderr and "worker_stuck_here" in run.stderr


def test_a_normal_run_keeps_its_output_and_exit_code():
    run = launch([sys.executable, "-c", "import os, sys; print(os.environ['TRANSFORMERS_OFFLINE']); sys.exit(3)"],
                 timeout=60)
    assert (run.returncode, run.stdout.strip(), run.timed_out) == (3, "1", False)
    clean = launch([sys.executable, "-c", "import os; print(sorted(os.environ))"], timeout=60,
                   env={"PATH": os.environ["PATH"]}, inherit=False)
    assert "TRANSFORMERS_OFFLINE" not in clean.stdout and "PYTHONFAULTHANDLER" in clean.stdout
