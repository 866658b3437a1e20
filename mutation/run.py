"""``make mutation``: mutation testing of the core modules with mutmut (pinned in requirements-mutation.txt).

Each group below mutates some modules and runs, for every mutant, the tests of its test files that
call the mutated function (mutmut's per-function test selection, fastest test first, stop at the first
failure). Mutation happens in a copy of the working tree (``build/mutation/<group>``, mutmut's
``mutants/`` inside it): the checkout is never modified. A second run reuses the results of functions
whose code did not change.

Operators: mutmut's own, minus three that would triple the run without testing the numerics (see
``DROPPED_OPERATORS``); the ``trainers`` group also leaves out number and ternary mutations
(``GROUP_DROPPED_OPERATORS``: its tests are trainer runs, ~1 s each, and it must fit the budget with
the numerics). Every module the issue names is mutated; no function is skipped (``SKIPPED_FUNCTIONS``
is there for a function that only a slow test file reaches, with the reason next to it).

Time (2 cores, ``--jobs 2``; issue 25 asks for under 30 minutes for both groups): from a clean start
(``rm -rf build/mutation``) both groups took 17.4 minutes in all (the numerics group alone took 24.6
before). Three things made that: pytest's ``unraisableexception`` plugin is off in the mutant runs (its
``gc.collect()`` over the whole heap of torch and transformers at the end of every pytest session was 0.5
of the 0.6 s each mutant cost before its tests ran; with it off, both groups took 29.9 minutes); a
mutant's tests run fastest first (:func:`_fastest_tests_first`); the clean-test pass is skipped after a
full stats pass (:func:`_no_clean_run_after_full_stats`); these two: 29.9 -> 17.4 minutes. What it
costs: a killed mutant runs its tests until the first that fails; a surviving one runs every test that
reaches its function (up to ~17 s for the numerics, minutes for ``compute_loss``, which every trainer
test reaches). So the run stays short
only while survivors are few: write the test, or list the mutant. A mutant that makes a loop run forever
is stopped at 8x its tests' time (``timeout_multiplier``; mutmut's default 30x cost minutes per such
mutant). Reruns are incremental: a killed mutant keeps its result while its function's code is
unchanged; every survivor of an earlier run is tested again (a test written since may kill it); the
mutants listed in ``mutation/equivalent.txt`` are not run at all (marked skipped).

``mutation/equivalent.txt`` lists, one per line with why: equivalent mutants (no test can tell them
apart from the original; left out of the kill rate and not reported again), ``cuda-only:`` ones (the
code differs only on a CUDA device, which the CPU suite cannot run; left out of the rate, counted
apart) and ``open:`` ones (known survivors, e.g. a test would have to pin a bug of the source; they
stay in the rate as not killed). Prints the kill rate per group and overall, and every other
surviving mutant with its diff; exits 1 below ``--min-kill-rate`` (95 %).

    python mutation/run.py [--group numerics|trainers] [--jobs 2] [--min-kill-rate 95] [--ref HEAD]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "mutation" / "equivalent.txt"
WORK_DIR = Path(os.environ.get("MUTATION_DIR", ROOT / "build" / "mutation"))

# group -> (modules mutated, test files run against them)
GROUPS = {
    "numerics": (
        [
            "hf_fdiv/divergences.py",
            "hf_fdiv/solver/__init__.py",
            "hf_fdiv/solver/core.py",
            "hf_fdiv/solver/chunked.py",
            "hf_fdiv/solver/batched.py",
            "hf_fdiv/solver/reference.py",
            "hf_fdiv/solver/grad_buffer.py",
            "hf_fdiv/solver/learnable_alpha.py",
            "hf_fdiv/losses.py",
            "hf_fdiv/fused.py",
        ],
        [
            "tests/test_solver.py",
            "tests/test_losses.py",
            "tests/test_batched.py",
            "tests/test_learnable_alpha.py",
            "tests/test_backward_twice.py",
            "tests/test_fused.py",
            "tests/test_pinned_behaviours.py",
            "tests/test_mutation_survivors.py",
            # finite-difference gradchecks: 90 % of these files' time; the gradients are also pinned in
            # closed form (p - y, entmax_bisect's alpha gradients, the fused = materialised gradients)
            "--deselect=tests/test_learnable_alpha.py::test_gradcheck_loss",
            "--deselect=tests/test_learnable_alpha.py::test_gradcheck_operator",
            "--deselect=tests/test_learnable_alpha.py::test_gradcheck_scalar_and_per_head_alpha",
            "--deselect=tests/test_backward_twice.py::test_gradcheck_fdiv_loss[",
            "--deselect=tests/test_backward_twice.py::test_gradcheck_fused_linear_fdiv_loss",
        ],
    ),
    "trainers": (
        [
            "hf_fdiv/trainers/loss_path.py",
            "hf_fdiv/trainers/mixin.py",
            "hf_fdiv/trainers/teacher.py",
            "hf_fdiv/trainers/distillation_trainer.py",
        ],
        [
            "tests/test_trainers.py",
            "tests/test_distillation.py",
            "tests/test_grad_accumulation.py",
            "tests/test_fused.py",
            "tests/test_pinned_behaviours.py",
            # the task heads (masked LM / seq2seq fused at the head's input, the label prior) and the
            # error paths (the step named in a loss error, the one-time fallback warning)
            "tests/test_tasks.py",
            "tests/test_reliability.py",
            # MoE router loss against the stock Trainer and SFTTrainer
            "tests/test_compat.py",
        ],
    ),
}

# Dropped mutmut operators (the rest are kept: arithmetic/comparison/boolean swaps, numbers, True/False,
# is/in/break keywords, unary `not`/`~` removal, `x += y` -> `x = y`, ternary branches, lambdas):
DROPPED_OPERATORS = {
    # each call argument replaced by None / dropped: half of all mutants, nearly all crash at once
    "operator_arg_removal",
    # "XX" + s + "XX" and case swaps: error messages, which the tests match by substring
    "operator_string",
    # `a = b` -> `a = None`: a crash at the next use of a
    "operator_assignment",
}

# Per group, on top of DROPPED_OPERATORS (see the module docstring for why).
GROUP_DROPPED_OPERATORS: dict = {
    # The trainer modules are glue between HF Trainer and the losses, checked by trainer-level tests
    # (~1 s each; a surviving mutant runs every test that reaches its function, up to ~50 s). Their
    # ternaries are mostly optional-argument plumbing and their numbers dims and defaults; without
    # these two operators (195 of 490 mutants) the group fits the 30-minute budget with the numerics.
    "trainers": {"operator_number", "operator_if_exp"},
}

# Per group: functions not mutated (by name, in the group's modules), each with why.
SKIPPED_FUNCTIONS: dict = {}

KILLED = {"killed", "timeout", "caught by type check"}
#: statuses tested again by every whole run (a test may have been written since)
RETESTED = {"survived", "no tests", "suspicious", "segfault"}
#: mutmut's exit code for "skipped": what a mutant listed in equivalent.txt gets instead of a run
SKIPPED_EXIT_CODE = 34


def status_by_code(code) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def copy_tree(dest: Path, ref: str = "") -> None:
    """The checkout's files into ``dest``: tracked and untracked-but-not-ignored files of the working tree,
    or the files of commit ``ref``. Only changed files are written, so mutmut sees unchanged sources as
    unchanged and keeps their results."""
    with tempfile.TemporaryDirectory() as tmp:
        if ref:
            archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp)
            base = Path(tmp)
            files = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
        else:
            base = ROOT
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                                   capture_output=True).stdout.decode().split("\0")
        for rel in filter(None, files):
            src, dst = base / rel, dest / rel
            if not src.is_file():
                continue
            if dst.is_file() and dst.read_bytes() == src.read_bytes():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def write_config(dest: Path, modules: list, tests: list, jobs: int) -> None:
    lines = ["[mutmut]", "source_paths = hf_fdiv", "only_mutate ="]
    lines += [f"    {m}" for m in modules]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    # the `slow` tests (quality runs, 2-process runs, the 2^31-element fused run) stay in `make test-slow`
    # pytest's unraisableexception plugin runs gc.collect() on the whole heap (torch, transformers) at the
    # end of every session: 0.5 of the 0.6 s each mutant cost before its tests ran
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -p", "    no:unraisableexception",
              "    -m", "    not slow"]
    lines += ["also_copy =", "    examples/"]
    # torch is not fork-safe after threads start: fork workers from a server that imported the tests only
    lines += ["process_isolation = forkserver", "use_git_change_detection = false"]
    # A mutant that makes a root search loop forever is cut at 8x (not mutmut's 30x) the time of its tests
    # (+ 8 s of CPU): 4x let two survivors time out on a loaded machine.
    lines += ["timeout_multiplier = 4"]
    (dest / "setup.cfg").write_text("\n".join(lines) + "\n")


def run_group(name: str, jobs: int, ref: str, mutants: list) -> None:
    """In a subprocess per group (mutmut keeps its config and state in module globals)."""
    modules, tests = GROUPS[name]
    dest = WORK_DIR / name
    dest.mkdir(parents=True, exist_ok=True)
    copy_tree(dest, ref)
    write_config(dest, modules, tests, jobs)
    env = dict(os.environ, PYTHONPATH=str(dest), HF_FDIV_SOLVER="auto", OMP_NUM_THREADS="1",
               HF_FDIV_MUTATION_GROUP=name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mutmut", "run", "--max-children", str(jobs)]
    cmd += mutants
    subprocess.run(cmd, cwd=dest, env=env, check=True)


def mutmut_main(argv: list) -> None:
    """mutmut's CLI with DROPPED_OPERATORS (and the group's GROUP_DROPPED_OPERATORS) removed from its
    operator table, and the group's SKIPPED_FUNCTIONS left unmutated."""
    import libcst as cst
    from mutmut.__main__ import cli
    from mutmut.mutation import file_mutation

    group = os.environ.get("HF_FDIV_MUTATION_GROUP", "")
    dropped = DROPPED_OPERATORS | GROUP_DROPPED_OPERATORS.get(group, set())
    file_mutation.mutation_operators = [
        (node, op) for node, op in file_mutation.mutation_operators if op.__name__ not in dropped
    ]
    skipped = {name for name in SKIPPED_FUNCTIONS.get(group, {})}
    if skipped:
        original = file_mutation.MutationVisitor._skip_node_and_children

        def skip(self, node):
            if isinstance(node, cst.FunctionDef) and node.name.value in skipped:
                return True
            return original(self, node)

        file_mutation.MutationVisitor._skip_node_and_children = skip
    if argv[:1] == ["run"] and len(argv) == 3:  # a whole run (no mutant names given)
        _retest_survivors_and_skip_listed()
    _no_clean_run_after_full_stats()
    _fastest_tests_first()
    cli(argv, standalone_mode=True)


def _fastest_tests_first() -> None:
    """A mutant's tests run fastest first (with ``-x``: a killed mutant stops at its first failing test).
    mutmut 3.8.1 sorts them so in its ``fork`` runner but its ``forkserver`` runner sends them in set order
    (random per process; pytest runs node ids in the order given), so a mutant often ran slow trainer tests
    before the fast one that kills it."""
    from mutmut.state import state
    from mutmut.workers.isolation import ForkServerRunner

    submit = ForkServerRunner.submit

    def sorted_submit(self, mutant_name, tests, cpu_time_limit, estimated_time):
        durations = state().duration_by_test
        tests = sorted(tests, key=lambda name: (durations.get(name, 0.0), name))
        return submit(self, mutant_name, tests, cpu_time_limit, estimated_time)

    ForkServerRunner.submit = sorted_submit


def _no_clean_run_after_full_stats() -> None:
    """mutmut runs every test twice before the mutants: once to record which tests reach which function
    (stats) and once unmutated ("clean tests"). When the stats run of this invocation ran them all and
    passed, the clean run proves nothing more (1.5 min of the trainers group's tests): it is skipped. An
    incremental run (stats loaded from an earlier run) still runs it."""
    from mutmut.workers.isolation import MutantRunner

    passed_full_stats = []
    for cls in MutantRunner.__subclasses__():
        collect, clean = cls.collect_stats, cls.run_clean_tests

        def collect_stats(self, tests, _collect=collect):
            code = _collect(self, tests)
            if not tests and code == 0:
                passed_full_stats.append(True)
            return code

        def run_clean_tests(self, tests, _clean=clean):
            return 0 if passed_full_stats else _clean(self, tests)

        cls.collect_stats, cls.run_clean_tests = collect_stats, run_clean_tests


def _retest_survivors_and_skip_listed() -> None:
    """Per whole run: mutants listed in equivalent.txt are not run (marked skipped: no test can kill an
    equivalent one, and each would run every test that reaches its function); every other survivor (and
    mutant with no tests) of an earlier run is tested again, since a test written since may kill it. Killed
    mutants keep their result while their function's code is unchanged (mutmut's own cache)."""
    import mutmut.__main__ as mm

    listed = set(read_equivalents())
    original = mm.collect_source_file_mutation_data

    def collect(*, mutant_names):
        mutants, by_path = original(mutant_names=mutant_names)
        kept = []
        for m, key, result in mutants:
            if key in listed:
                m.exit_code_by_key[key] = SKIPPED_EXIT_CODE
                continue
            kept.append((m, key, None if status_by_code(result) in RETESTED else result))
        for m in by_path.values():
            m.save()
        return kept, by_path

    mm.collect_source_file_mutation_data = collect


def read_equivalents() -> dict:
    out = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, why = line.partition(" ")
            out[name] = why.strip().lstrip("#").strip()
    return out


def results(name: str) -> dict:
    """mutant name -> status, from mutmut's per-file .meta files of a group."""
    modules, _ = GROUPS[name]
    out = {}
    for module in modules:
        meta = WORK_DIR / name / "mutants" / (module + ".meta")
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[key] = status_by_code(code)
    return out


def print_diffs(names: list) -> None:
    """(In a group's directory) the changed lines of each mutant, as ``mutmut show`` prints them."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    for name in names:
        print(f"@@ {name}")
        for line in get_diff_for_mutant(name).splitlines():
            if line[:1] in "+-" and not line.startswith(("+++", "---")):
                print(f"        {line}")


def show_survivors(group: str, survivors: list) -> None:
    """Print each (name, status) with its diff (one subprocess per group: mutmut reads the group's files)."""
    if not survivors:
        return
    shown = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--diffs", *(k for k, _ in survivors)],
                           cwd=WORK_DIR / group, env=dict(os.environ, PYTHONPATH=str(WORK_DIR / group)),
                           capture_output=True, text=True).stdout
    diffs = {}
    for block in shown.split("@@ ")[1:]:
        name, _, lines = block.partition("\n")
        diffs[name] = lines.rstrip()
    for name, state in survivors:
        print(f"  {state}: {name}\n{diffs.get(name, '        (no diff: run mutmut show in ' + str(WORK_DIR / group) + ')')}")


def report(groups: list, min_kill_rate: float, seconds: float) -> int:
    """Kill rate of the non-equivalent mutants, per group and overall. Lines of equivalent.txt whose reason
    starts with ``cuda-only:`` name mutants that only a CUDA device can tell apart (the CPU suite cannot
    run that code): left out of the rate like the equivalent ones, but counted and printed apart. Lines
    starting with ``open:`` are known survivors (e.g. blocked by a bug in the source): counted as not
    killed, printed with their reason instead of their diff."""
    listed = read_equivalents()
    cuda_only = {k for k, why in listed.items() if why.startswith("cuda-only:")}
    known_open = {k: why for k, why in listed.items() if why.startswith("open:")}
    equivalent = {k for k in listed if k not in cuda_only and k not in known_open}
    status = {}
    for g in groups:
        status.update({k: (g, s) for k, s in results(g).items()})
    counted = {k: v for k, v in status.items() if k not in equivalent and k not in cuda_only}
    killed = sum(s in KILLED for _, s in counted.values())
    survivors = sorted(k for k, (_, s) in counted.items() if s not in KILLED)
    rate = 100.0 * killed / max(1, len(counted))
    print(f"\nmutation ({seconds / 60:.1f} min): {len(status)} mutants in {', '.join(groups)}; listed in "
          f"mutation/equivalent.txt: {sum(k in equivalent for k in status)} equivalent, "
          f"{sum(k in cuda_only for k in status)} CUDA-only, {sum(k in known_open for k in status)} open")
    for g in groups:
        mine = {k: s for k, (gg, s) in counted.items() if gg == g}
        g_killed = sum(s in KILLED for s in mine.values())
        print(f"  {g}: {g_killed} of {len(mine)} non-equivalent mutants killed = "
              f"{100.0 * g_killed / max(1, len(mine)):.1f} %")
    with_cuda = killed / max(1, len(counted) + sum(k in cuda_only for k in status))
    print(f"  all: {killed} of {len(counted)} = {rate:.1f} % ({100.0 * with_cuda:.1f} % counting the CUDA-only "
          "mutants as survivors)")
    stale = sorted(set(listed) - set(status))
    if stale and len(groups) == len(GROUPS):
        print(f"equivalent.txt names {len(stale)} mutant(s) that no longer exist: {', '.join(stale)}")
    unchecked = [k for k in survivors if status[k][1] == "not checked"]
    if unchecked:
        print(f"{len(unchecked)} mutant(s) not checked yet (an interrupted run): run make mutation again.")
    for k in survivors:
        if k in known_open:
            print(f"  open ({status[k][1]}): {k}  {known_open[k]}")
    for g in groups:
        show_survivors(g, [(k, status[k][1]) for k in survivors
                           if status[k][0] == g and status[k][1] != "not checked" and k not in known_open])
    if rate < min_kill_rate:
        print(f"kill rate {rate:.1f} % < {min_kill_rate} %: write the missing tests, or list the mutant in "
              "mutation/equivalent.txt with why no test can kill it.")
        return 1
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--mutmut"]:
        mutmut_main(sys.argv[2:])
        return 0
    if sys.argv[1:2] == ["--diffs"]:
        print_diffs(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted(GROUPS), action="append",
                        help="run only this group (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--min-kill-rate", type=float, default=95.0)
    parser.add_argument("mutants", nargs="*", help="rerun only these mutants (names or globs, e.g. after a new test)")
    parser.add_argument("--ref", default="", help="mutate this commit (e.g. HEAD) instead of the working tree")
    parser.add_argument("--report-only", action="store_true", help="print the last run's results")
    args = parser.parse_args()
    groups = args.group or list(GROUPS)
    start = time.time()
    if not args.report_only:
        for g in groups:
            prefixes = tuple(module[:-3].replace("/", ".").removesuffix(".__init__") + "." for module in GROUPS[g][0])
            named = [m for m in args.mutants if m.startswith(prefixes)]
            if named or not args.mutants:
                run_group(g, args.jobs, args.ref, named)
    return report(groups, args.min_kill_rate, time.time() - start)


if __name__ == "__main__":
    sys.exit(main())
