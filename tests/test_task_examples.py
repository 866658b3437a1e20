"""The task example scripts (examples/tasks/), written like transformers' example scripts with only the
trainer class swapped, run in tiny mode on assets built in code (examples/tasks/task_assets.py)."""

from __future__ import annotations

import math
import os
import re
import runpy
import sys

import pytest
from huggingface_hub import ModelCard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "examples", "tasks")
COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
          "--divergence", "alpha:1.5", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0", "--logging_steps", "1"]
SCRIPTS = {
    "text_classification": (["--model_name_or_path", "{a}/bert", "--train_file", "{a}/data/sentiment.csv"],
                            "text-classification"),
    "token_classification": (["--model_name_or_path", "{a}/bert", "--train_file", "{a}/data/ner.jsonl"],
                             "token-classification"),
    "image_classification": (["--model_name_or_path", "{a}/vit", "--train_dir", "{a}/data/images",
                              "--remove_unused_columns", "False"], "image-classification"),
    "masked_lm": (["--model_name_or_path", "{a}/bert", "--train_file", "{a}/data/text.txt"], "fill-mask"),
    "translation": (["--model_name_or_path", "{a}/t5", "--train_file", "{a}/data/translation.jsonl",
                     "--predict_with_generate", "--generation_max_length", "8"], "text2text-generation"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("task_assets")
    runpy.run_path(os.path.join(TASKS, "task_assets.py"), run_name="task_assets")["main"](str(out))
    return str(out)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_task_script_runs_with_only_the_class_swapped(script, assets, tmp_path, monkeypatch):
    path = os.path.join(TASKS, f"{script}.py")
    source = open(path).read()
    # the script is a stock transformers script but for its one hf_fdiv import, aliased to the stock names
    swaps = re.findall(r"^from hf_fdiv import (.*)$", source, re.M)
    assert len(swaps) == 1 and source.count("hf_fdiv") == 1 + source.count("hf_fdiv's")
    assert re.fullmatch(r"FDiv(Seq2Seq)?Trainer as (Seq2Seq)?Trainer, FDiv(Seq2Seq)?TrainingArguments as "
                        r"(Seq2Seq)?TrainingArguments", swaps[0])
    args, pipeline_tag = SCRIPTS[script]
    out = tmp_path / "out"
    argv = [path, *[a.format(a=assets) for a in args], "--output_dir", str(out), *COMMON]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(path, run_name="__main__")
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.pipeline_tag == pipeline_tag
    assert "fdiv-alpha-1.5" in card.data.tags
    loss = float(re.search(r"last logged training loss \| ([0-9.]+)", card.text).group(1))
    assert math.isfinite(loss) and loss > 0


def test_classification_study_tiny_mode(tmp_path):
    """The classification study's CI mode on the chatterbot topics (the digits need requirements-study.txt)."""
    import json

    study = runpy.run_path(os.path.join(ROOT, "examples", "classification_study.py"), run_name="study")
    study["main"](["--tiny", "--datasets", "topics", "--output_dir", str(tmp_path)])
    results = json.load(open(tmp_path / "results.json"))["results"]
    assert sorted((r["divergence"], r["reference"]) for r in results) == [("alpha:1.5", "label_prior"),
                                                                         ("alpha:1.5", "unit")]
    for r in results:
        m = r["metrics"]
        assert 0 <= m["accuracy"] <= 1 and math.isfinite(m["eps_nll"]) and 1 <= m["support"] <= 18
    assert (tmp_path / "study.png").stat().st_size > 0 and "| topics | `alpha:1.5` | label_prior |" in open(
        tmp_path / "results.md").read()
