"""Sharded training (issue 13): 2 processes (gloo, CPU) under FSDP1, FSDP2 and DeepSpeed ZeRO-2/3
against 1 process on the same global batch: the logged losses and the parameters after a few SGD steps
must match (1e-5).

Cases: FDivSFTTrainer with the fused loss at alpha:1.5 and at kl, FDivDistillationTrainer (fused) with
``teacher_mode="target"`` and ``"reference"``, and from stored teacher top-k (no teacher in memory). Each engine is launched once for all four cases
(tests/sharded_worker.py, which also checks that the engine really wrapped the model, that the teacher
is sharded like the student, and that the fused loss ran rather than a fall-back to the logits).

The FSDP engines need nothing beyond the CI pins (~15-20 s a launch on 2 cores) and run in `make test`.
The DeepSpeed ones carry the ``distributed`` marker, are skipped without ``deepspeed``, and run with
``make test-distributed`` (which installs the pinned deepspeed; its first start builds a CPU op, ~3.5 min).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from launch import accelerate_launch, launch
from tiny import make_model, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharded_worker.py")
CASES = ("sft_alpha", "sft_kl", "distill_target", "distill_reference", "distill_topk")
STEPS = 3  # sharded_worker.STEPS
TOL = 1e-5

_no_deepspeed = importlib.util.find_spec("deepspeed") is None
_deepspeed = [
    pytest.mark.distributed,
    pytest.mark.skipif(_no_deepspeed, reason="deepspeed is not installed (`make test-distributed` installs it)"),
]
#: engine -> (accelerate config, accelerate's distributed type, pytest marks)
ENGINES = {
    "ddp": ("cpu_2proc.yaml", "MULTI_CPU", [pytest.mark.slow]),
    "fsdp1_orig": ("cpu_fsdp1.yaml", "FSDP", [pytest.mark.slow]),            # FSDP1, use_orig_params: true
    "fsdp1_flat": ("cpu_fsdp1_flat.yaml", "FSDP", [pytest.mark.slow]),       # FSDP1, use_orig_params: false
    "fsdp2": ("cpu_fsdp2.yaml", "FSDP", []),                 # accelerate's fully_shard wrapping
    "fsdp2_manual": ("cpu_fsdp2_manual.yaml", "FSDP", [pytest.mark.slow]),   # fully_shard by hand, root resharded
    "zero2": ("cpu_zero2.yaml", "DEEPSPEED", _deepspeed),
    "zero3": ("cpu_zero3.yaml", "DEEPSPEED", _deepspeed),
    "zero3_init": ("cpu_zero3_init.yaml", "DEEPSPEED", _deepspeed),  # zero3_init_flag + from_pretrained
}
# seconds a launch may take (five cases of 3 steps, ~15-40 s on 2 loaded cores); the first DeepSpeed start
# builds a CPU op (minutes), later starts load it from the cache
TIMEOUT = {"single": 300, "fsdp": 300, "zero2": 1200, "zero3": 1200, "zero3_init": 1200}


class Runs:
    """Each launch once per session, all four cases in it; results read from the worker's files."""

    def __init__(self, out):
        self.out = out
        self.logs: dict = {}

    def _run(self, engine: str, cmd: list, timeout: int):
        if engine not in self.logs:
            self.logs[engine] = f"[{engine}] " + launch(cmd, timeout=timeout).report(tail=8000)

    def result(self, engine: str, case: str) -> dict:
        cases = ",".join(CASES)
        if engine == "single":
            self._run(engine, [sys.executable, WORKER, self.out, "single", cases], TIMEOUT["single"])
        else:
            self._run(engine, accelerate_launch(ENGINES[engine][0], WORKER, self.out, engine, cases),
                      TIMEOUT.get(engine, TIMEOUT["fsdp"]))
        path = self.out / f"{case}-{engine}.pt"
        if not path.exists():
            pytest.fail(f"{engine}/{case}: no result written\n{self.logs[engine]}")
        result = torch.load(path, weights_only=False)
        if "error" in result:
            pytest.fail(f"{engine}/{case} raised {result['error']}\n{result['traceback']}")
        return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def initial_params():
    return make_model(make_tokenizer()).state_dict()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", [pytest.param(e, marks=ENGINES[e][2]) for e in ENGINES])
def test_two_sharded_processes_equal_one_process(runs, initial_params, engine, case):
    one = runs.result("single", case)
    two = runs.result(engine, case)
    assert two["world"] == 2 and one["world"] == 1
    assert two["distributed_type"].endswith(ENGINES[engine][1]), two["distributed_type"]
    # the fused LM-head loss ran at every step (no silent fall-back to the materialised logits)
    assert one["fused_calls"] >= STEPS and two["fused_calls"] >= STEPS, (one["fused_calls"], two["fused_calls"],
                                                                          two["hf_fdiv_warnings"])
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=TOL, rtol=0)
    assert set(two["params"]) == set(one["params"])
    moved = max(float((one["params"][k] - initial_params[k]).abs().max()) for k in one["params"])
    assert moved > 1e-3, "the steps did not move the weights: the comparison would be vacuous"
    for name in one["params"]:
        torch.testing.assert_close(two["params"][name], one["params"][name], atol=TOL, rtol=0,
                                   msg=lambda m, name=name: f"{engine}/{case}, {name}: {m}")
