"""The CLI end to end in subprocesses, and every example in its tiny mode (offline, tiny models)."""

from __future__ import annotations

import os
import sys

import pytest
from huggingface_hub import ModelCard

from launch import accelerate_launch, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
COMMON = ["--bf16", "False", "--use_cpu", "--report_to", "none", "--activation_checkpointing", "False",
          "--per_device_train_batch_size", "4", "--save_strategy", "no", "--max_steps", "2"]


def run(args, timeout=300):
    proc = launch(args, timeout=timeout)  # its own session, every process killed on timeout (tests/launch.py)
    assert proc.returncode == 0, proc.report(tail=3000)
    return proc.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    run([PY, "examples/tiny_assets.py", str(out)])
    return out


def cli(*args):
    return [PY, "-m", "hf_fdiv.cli", *args]


def test_cli_sft_and_help(tiny, tmp_path):
    text = run(cli("sft", "--help"))
    assert "--divergence" in text and "--reference" in text and "--use_peft" in text
    run(cli("sft", "--model_name_or_path", str(tiny / "student"), "--dataset_name", str(tiny / "data" / "train.jsonl"),
            "--output_dir", str(tmp_path / "sft"), "--divergence", "js", "--use_peft", "--lora_target_modules",
            "q_proj", "v_proj", *COMMON))
    card = ModelCard.load(str(tmp_path / "sft" / "README.md"))
    assert card.data.library_name == "peft" and "`js`" in card.text
    # YAML config plus flags (flags win)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {tiny / 'student'}\ndataset_name: {tiny / 'data'}\ndivergence: chi2\n"
                   f"output_dir: {tmp_path / 'sft_yaml'}\nlearning_rate: 0.001\n")
    run(cli("sft", "--config", str(cfg), "--divergence", "alpha:2", *COMMON))
    assert "`alpha:2`" in ModelCard.load(str(tmp_path / "sft_yaml" / "README.md")).text


@pytest.mark.slow
def test_cli_distill_online_offline_and_topk(tiny, tmp_path):
    run(cli("distill", "--model_name_or_path", str(tiny / "student"), "--teacher_model_name_or_path",
            str(tiny / "teacher"), "--dataset_name", str(tiny / "data"), "--output_dir", str(tmp_path / "d"),
            "--teacher_mode", "reference", "--temperature", "2.0", "--lmbda", "0.5", "--max_new_tokens", "6", *COMMON))
    card = ModelCard.load(str(tmp_path / "d" / "README.md"))
    assert str(tiny / "teacher") in card.text and "`reference`" in card.text
    out = run(cli("teacher-topk", "--teacher_model_name_or_path", str(tiny / "teacher"), "--dataset_name",
                  str(tiny / "data"), "--output_dir", str(tmp_path / "topk"), "--k", "8"))
    assert "teacher top-8" in out
    run(cli("distill", "--model_name_or_path", str(tiny / "student"), "--dataset_name", str(tmp_path / "topk"),
            "--output_dir", str(tmp_path / "off"), *COMMON))
    assert "offline teacher" in ModelCard.load(str(tmp_path / "off" / "README.md")).text


def test_cli_errors():
    proc = launch(cli("bogus"), timeout=60)
    assert proc.returncode == 2 and "unknown command 'bogus'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [
    ("examples/sft.py", []),
    ("examples/sft_lora.py", ["--lora_target_modules", "q_proj", "v_proj"]),
    ("examples/distill_and_push.py", ["--teacher_model_name_or_path", "{tiny}/teacher"]),
])
def test_examples_tiny_mode(tiny, tmp_path, script, extra):
    extra = [e.replace("{tiny}", str(tiny)) for e in extra]
    out = run([PY, script, "--model_name_or_path", str(tiny / "student"), "--dataset_name", str(tiny / "data"),
               "--output_dir", str(tmp_path / "out"), *extra, *COMMON])
    assert (tmp_path / "out" / "README.md").exists()
    if "lora" in script:
        assert "adapter saved" in out


def test_demo_helpers_offline(monkeypatch, tmp_path):
    # The demo's pieces that need no SmolLM2: options (environment defaults, flags win) and the PNG plot.
    from transformers import HfArgumentParser

    from hf_fdiv.demo import DemoArguments, _env_defaults, plot_curves

    monkeypatch.setenv("HF_FDIV_DEMO_STEPS", "7")
    monkeypatch.setenv("HF_FDIV_DEMO_OUTPUT_DIR", "elsewhere")
    parser = HfArgumentParser(DemoArguments)
    parser.set_defaults(**_env_defaults())
    (args,) = parser.parse_args_into_dataclasses(args=["--steps", "3"])
    assert args.steps == 3 and args.output_dir == "elsewhere"
    hist = [{"step": s, "loss": 1.0 / s, "support_size": 10.0 + s} for s in range(1, 6)]
    path = tmp_path / "curves.png"
    assert plot_curves({"alpha:1.5": hist, "kl": hist}, str(path)) is True  # matplotlib is pinned in CI
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DEMO_ENV_PROBE = """
import json, os, sys
before = dict(os.environ)
import hf_fdiv.demo
after_import = dict(os.environ)
try:
    hf_fdiv.demo.main(["--help"])  # parses its arguments and exits: the offline defaults are set by then
except SystemExit:
    pass
after_main = dict(os.environ)
changed = lambda a, b: sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
print(json.dumps({"import": changed(before, after_import), "main": changed(after_import, after_main),
                  "values": {k: after_main.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}}))
"""


def test_demo_import_leaves_environment_alone():
    # a clean environment (the suite's conftest sets HF_HUB_OFFLINE and friends for this process), so that
    # a module that sets them at import is caught; main() sets them, and keeps a value the user gave
    import json

    clean = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    for extra, expect_main in (({}, ["HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE",
                                     "TRANSFORMERS_OFFLINE"]),
                               ({"HF_HUB_OFFLINE": "0"}, ["HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                                          "TRANSFORMERS_OFFLINE"])):
        proc = launch([PY, "-c", DEMO_ENV_PROBE], timeout=120, env={**clean, **extra}, inherit=False)
        assert proc.returncode == 0, proc.report(tail=3000)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["import"] == [], f"import hf_fdiv.demo changed {report['import']}"
        assert report["main"] == expect_main
        assert report["values"]["HF_HUB_OFFLINE"] == extra.get("HF_HUB_OFFLINE", "1")


def test_cli_under_accelerate_launch_two_processes(tiny, tmp_path):
    out = run(accelerate_launch("cpu_2proc.yaml", "-m", "hf_fdiv.cli", "sft", "--model_name_or_path",
                                tiny / "student", "--dataset_name", tiny / "data", "--output_dir", tmp_path / "ddp",
                                "--logging_steps", "1", *COMMON))
    assert "'epoch': '0.25'" in out  # 2 processes x 4 rows of 32: a step covers a quarter of the data
    assert (tmp_path / "ddp" / "README.md").exists()


def test_readme_tiny_mode_lines_run_as_written(tmp_path):
    # The README's tiny-mode block, word for word (only /tmp/ moved under tmp_path): no --bf16 False, no
    # --use_cpu. It runs on a machine without a GPU (bf16 "auto") as well as with one.
    import re
    import shlex

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"Tiny mode, offline:\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [shlex.split(c.replace("/tmp/", f"{tmp_path}/")) for c in block.replace("\\\n", " ").splitlines()]
    assert [c[:2] for c in commands] == [["python", "examples/tiny_assets.py"], ["python", "examples/sft.py"]]
    assert "--bf16" not in commands[1] and "--use_cpu" not in commands[1]
    for command in commands:
        run([PY, *command[1:]])
    assert (tmp_path / "sft" / "README.md").exists()
