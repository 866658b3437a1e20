"""One way for the tests (and `make test-soak`) to start processes: they always end, and a hang is diagnosed.

:func:`launch` runs a command in a session of its own and waits at most ``timeout`` seconds. Every
process of the run is tracked while it runs (``accelerate launch`` / torchrun start each rank in a *new*
session, so killing the launcher's process group would leave the ranks behind, as in issue 26). On timeout
each of them gets SIGABRT first (``PYTHONFAULTHANDLER=1`` is set, so every Python process prints all its
threads' stacks; core files are off), then SIGKILL; the run's output comes back with those stacks. Whatever
happens (timeout, error, Ctrl-C), no process of the run outlives the call.

:func:`arm_hang_dump` is for the workers: each rank also prints its stacks and exits by itself a little
before the launcher's timeout (``faulthandler.dump_traceback_later``).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: offline, one BLAS thread per process (two ranks share two cores), no tokenizer thread pools
ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
           OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
#: the environment variable that tells a worker when to dump its stacks and exit (seconds from its start)
HANG_DUMP_ENV = "HF_FDIV_HANG_DUMP_S"
#: seconds between SIGABRT (stacks printed) and SIGKILL on timeout
GRACE_S = 5.0


@dataclass
class Run:
    """What a launched command did: ``returncode`` None when it timed out (then ``timed_out``)."""

    args: list
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def report(self, tail: int = 6000) -> str:
        """For an assertion message: the command, how it ended, and the end of its output."""
        how = f"timed out after {self.seconds:.0f} s (stacks above)" if self.timed_out else f"exit {self.returncode}"
        return (f"{' '.join(map(str, self.args))}\n[{how}, {self.seconds:.0f} s]\nSTDOUT:\n{self.stdout[-tail:]}\n"
                f"STDERR:\n{self.stderr[-tail:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, *args) -> list:
    """``accelerate launch --config_file examples/accelerate_configs/<config> --main_process_port <free> ARGS``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(ROOT, "examples", "accelerate_configs", config), "--main_process_port", str(free_port()),
            *map(str, args)]


#: runs the command with core files off (SIGABRT on timeout must not write any), by exec: same pid, and
#: no preexec_fn (not safe in a parent with threads)
_NO_CORE = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            "os.execvp(sys.argv[1], sys.argv[1:])")


def _tree(root, known: dict) -> dict:
    """``known`` plus every live descendant of ``root`` (psutil.Process objects, keyed by pid)."""
    import psutil

    try:
        for child in root.children(recursive=True):
            known.setdefault(child.pid, child)
    except psutil.Error:
        pass
    return known


def _signal_all(procs, sig) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)  # psutil checks the pid still names the same process (no reuse)
        except psutil.Error:
            pass


def launch(args, *, timeout: float, env: dict | None = None, inherit: bool = True, cwd: str = ROOT) -> Run:
    """Run ``args`` (a list) and wait at most ``timeout`` seconds; see the module docstring.

    ``env`` adds to ``os.environ`` + :data:`ENV`; with ``inherit=False`` it is the whole environment (plus
    ``PYTHONFAULTHANDLER`` and the hang-dump time). Workers that call :func:`arm_hang_dump` print their
    stacks and exit at 85% of ``timeout``.
    """
    import psutil

    base = {**os.environ, **ENV} if inherit else {"PYTHONFAULTHANDLER": "1"}
    full_env = {**base, HANG_DUMP_ENV: f"{0.85 * timeout:.0f}", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _NO_CORE, *map(str, args)], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    root = psutil.Process(proc.pid)
    known = {proc.pid: root}
    out = err = None
    timed_out = False
    try:
        while out is None:
            _tree(root, known)
            try:
                out, err = proc.communicate(timeout=0.5)  # retrying after TimeoutExpired loses no output
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > timeout:
                    timed_out = True
                    break
        if timed_out:
            _signal_all(list(_tree(root, known).values()), signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    finally:
        # nothing of the run outlives the call: the ranks live in sessions of their own
        leftovers = [p for p in _tree(root, known).values() if p.is_running()]
        _signal_all(leftovers, signal.SIGKILL)
        psutil.wait_procs(leftovers, timeout=10)
        if out is None:
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a process outside the tree still holds the pipes
                proc.kill()
    return Run(list(args), None if timed_out else proc.returncode, out or "", err or "",
               time.perf_counter() - start, timed_out)


def arm_hang_dump() -> None:
    """In a worker: print every thread's Python stack and exit (code 1) once the launcher's budget is
    nearly spent (``HF_FDIV_HANG_DUMP_S``, set by :func:`launch`; 100 s when run by hand)."""
    faulthandler.dump_traceback_later(float(os.environ.get(HANG_DUMP_ENV, "100")), exit=True)
