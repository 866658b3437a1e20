"""FDivOnPolicyDistillationTrainer under FSDP2 (accelerate, 2 CPU processes, gloo): the losses and the
parameters after 2 SGD steps equal one process on the same global batch (greedy completions, so both
runs train on the same tokens). Worker: tests/on_policy_sharded_worker.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from launch import accelerate_launch, launch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "on_policy_sharded_worker.py")


def result(out, engine: str) -> dict:
    cmd = [sys.executable, WORKER, str(out), engine] if engine == "single" else \
        accelerate_launch("cpu_fsdp2.yaml", WORKER, out, engine)
    run = launch(cmd, timeout=300)
    path = out / f"on_policy-{engine}.pt"
    assert path.exists(), run.report(tail=6000)
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path):
    from tiny import make_model, make_tokenizer

    one, two = result(tmp_path, "single"), result(tmp_path, "fsdp2")
    assert two["world"] == 2 and one["world"] == 1
    assert len(one["losses"]) == 2
    assert len(two["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) <= 1e-6
    initial = make_model(make_tokenizer()).state_dict()
    assert one["params"].keys() == two["params"].keys()
    assert max(float((one["params"][k] - initial[k]).abs().max()) for k in initial) > 1e-3  # it trained
    assert max(float((one["params"][k] - two["params"][k]).abs().max()) for k in one["params"]) <= 1e-6
