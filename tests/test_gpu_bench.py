"""benchmarks/gpu_bench.py runs end to end on CPU at the tiny scale (the GPU numbers need a GPU)."""

import importlib.util
import json
import math
import os
import sys

from launch import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_bench.py")


def _load():
    if "gpu_bench" not in sys.modules:
        sys.path.insert(0, os.path.dirname(SCRIPT))  # as `python benchmarks/gpu_bench.py` has it (loss_bench)
        spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_bench"] = mod  # its dataclasses look the module up
        spec.loader.exec_module(mod)
    return sys.modules["gpu_bench"]


def test_plan_keeps_each_case_baseline():
    gb = _load()
    plan = {case.name: [r.name for r in rows] for case, rows in gb.plan(["fused kl", "op_sparsemax"])}
    assert plan["fused_bf16"] == ["materialised F.cross_entropy", "fused kl"]
    assert plan["op_sparsemax_fp32"][0] == "torch.softmax" and "f_softargmax alpha:2" in plan["op_sparsemax_fp32"]
    assert set(plan) == {"fused_bf16", "op_sparsemax_fp32"}
    # every target names rows that exist in its case
    names = {(c.name, r.name) for c in gb.CASES for r in c.rows}
    for t in gb.TARGETS:
        assert (t.case, t.row) in names and (t.case, t.ref) in names, t


def test_cpu_tiny_run(tmp_path):
    out = tmp_path / "bench.json"
    only = ["loss_fp32/fdiv_loss alpha", "op_sparsemax", "fused_bf16/fused alpha", "model_step/alpha"]
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--scale", "tiny", "--repeats", "2", "--out", str(out)]
    for o in only:
        cmd += ["--only", o]
    proc = launch(cmd, timeout=120)
    assert proc.returncode == 0, proc.report()
    stdout = proc.stdout
    assert "| case | impl | backend | shape, dtype | time ms | peak GiB | x base | target |" in stdout
    assert "Targets of issue 11" in stdout

    data = json.loads(out.read_text())
    assert data["meta"]["complete"] is True and data["meta"]["device"].startswith("CPU")
    rows = {(r["case"], r["impl"]): r for r in data["rows"]}
    ours = [r for r in data["rows"] if r["ours"]]
    expected = {
        ("loss_fp32", "fdiv_loss alpha:1.5"),
        ("op_sparsemax_fp32", "f_softargmax alpha:2"), ("fused_bf16", "fused alpha:1.5"),
        ("model_step", "alpha:1.5 fused"),
    }
    assert {(r["case"], r["impl"]) for r in ours} == expected
    for r in ours:
        assert r["status"] == "ok", r
        assert len(r["times_ms"]) == 2 and all(math.isfinite(t) and t > 0 for t in r["times_ms"]), r
        assert math.isfinite(r["median_ms"]) and math.isfinite(r["ratio"]), r
        assert r["peak_gib"] is None  # no memory figure on CPU
        assert r["grad_finite"] is True, r
        if r["case"] != "op_sparsemax_fp32":
            assert math.isfinite(r["value"]), r
        assert f"**{r['impl']}**" in stdout
        assert r["targets"], r
    # the baselines ran too (the ratios' denominators)
    for key in [("loss_fp32", "F.cross_entropy"), ("op_sparsemax_fp32", "torch.softmax"),
                ("fused_bf16", "materialised F.cross_entropy"), ("model_step", "stock loss")]:
        assert rows[key]["status"] == "ok", rows[key]
    # Liger-Kernel needs CUDA: recorded as not applicable, not as a failure
    assert rows[("op_sparsemax_fp32", "liger Sparsemax")]["status"].startswith("n/a")
