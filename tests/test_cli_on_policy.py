"""On-policy distillation end to end in subprocesses, tiny mode: the TRL-recipe script with the class
swapped (examples/on_policy_distillation.py), ``hf-fdiv distill --on-policy`` and the on-policy study."""

from __future__ import annotations

import json
import math

import pytest
from huggingface_hub import ModelCard

from test_cli_examples import PY, run, tiny  # noqa: F401  (the tiny assets fixture)

TINY = ["--bf16", "False", "--use_cpu", "--report_to", "none", "--activation_checkpointing", "False",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--max_steps", "2",
        "--max_completion_length", "8", "--logging_steps", "1"]


def test_trl_recipe_script_with_the_class_swapped(tiny, tmp_path):  # noqa: F811
    out = run([PY, "examples/on_policy_distillation.py", "--model_name_or_path", str(tiny / "student"),
               "--teacher_model_name_or_path", str(tiny / "teacher"), "--dataset_name", str(tiny / "prompts"),
               "--output_dir", str(tmp_path / "script"), "--divergence", "alpha:1.5", *TINY])
    assert "'support_size'" in out and "'completions/mean_length'" in out  # ours and TRL's metrics, logged
    card = ModelCard.load(str(tmp_path / "script" / "README.md"))
    assert "FDivOnPolicyDistillationTrainer" in card.text and "`alpha:1.5`" in card.text
    assert str(tiny / "teacher") in card.text


def test_cli_distill_on_policy(tiny, tmp_path):  # noqa: F811
    text = run([PY, "-m", "hf_fdiv.cli", "distill", "--on-policy", "--help"])
    assert "--divergence" in text and "--max_completion_length" in text
    run([PY, "-m", "hf_fdiv.cli", "distill", "--on-policy", "--model_name_or_path", str(tiny / "student"),
         "--teacher_model_name_or_path", str(tiny / "teacher"), "--dataset_name", str(tiny / "prompts"),
         "--output_dir", str(tmp_path / "cli"), "--divergence", "kl", "--teacher_mode", "reference",
         "--use_peft", "--lora_target_modules", "q_proj", "v_proj", *TINY])
    card = ModelCard.load(str(tmp_path / "cli" / "README.md"))
    assert card.data.library_name == "peft" and "`reference`" in card.text and "`kl`" in card.text


@pytest.mark.slow
def test_on_policy_study_tiny_mode(tmp_path):
    run([PY, "examples/on_policy_study.py", "--tiny", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in summary["runs"]] == ["alpha:1.5 (hf_fdiv)", "forward KL (TRL beta=0)",
                                                      "reverse KL (TRL beta=1)"]
    for r in summary["runs"]:
        assert 0.0 <= r["agreement"] <= 1.0 and r["seconds_per_step"] > 0 and math.isfinite(r["final_train_loss"])
    assert "| alpha:1.5 (hf_fdiv) |" in (tmp_path / "results.md").read_text()
