"""The package a user installs: every module of the source tree imports from the *installed* package
(not this checkout), the package data is there, the public API computes, the CLI prints its help and its
version, the tiny SFT example trains, and the version has one source.

These tests need a non-editable install (``make test`` installs the built wheel; ``make test-lowest``
installs it with the lowest supported dependencies). Under an editable install (``make dev``) the first
assertion says so: they check what users get, which an editable install is not.

Every check runs in a subprocess started with ``python -I`` (isolated mode: neither the working directory
nor PYTHONPATH is on ``sys.path``) from a directory outside the checkout, so ``import hf_fdiv`` can only
find the installed copy.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

from launch import launch

pytestmark = pytest.mark.installed

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "hf_fdiv"
BIN = pathlib.Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
# Modules that need an optional extra to import, and the distribution that provides it.
OPTIONAL = {"hf_fdiv.solver.triton_kernels": "triton"}


def source_modules() -> list[str]:
    """Every module of the source tree, as a dotted name (packages by their ``__init__``)."""
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run(args, cwd, timeout=300) -> str:
    proc = launch(args, timeout=timeout, env=OFFLINE, cwd=cwd)  # own session, killed on timeout (tests/launch.py)
    assert proc.returncode == 0, proc.report(tail=3000)
    return proc.stdout


def isolated_python(code: str, cwd) -> str:
    return run([sys.executable, "-I", "-c", code], cwd)


def test_every_source_directory_is_a_package():
    """setuptools' find discovers packages by their ``__init__.py``: a folder of modules without one
    would be left out of the wheel."""
    folders = {p.parent for p in SOURCE.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert missing == [], f"add an __init__.py to {missing}: without it the wheel leaves the folder out"


def test_every_module_imports_from_the_installed_package(tmp_path):
    modules = source_modules()
    assert {"hf_fdiv", "hf_fdiv.solver", "hf_fdiv.trainers", "hf_fdiv.model_cards"} <= set(modules)
    code = f"""
import importlib, json
result = {{}}
for name in {modules!r}:
    try:
        result[name] = importlib.import_module(name).__file__
    except ImportError as err:
        result[name] = "ImportError:" + str(err.name)
print(json.dumps(result))
"""
    files = json.loads(isolated_python(code, tmp_path).strip().splitlines()[-1])
    assert sorted(files) == sorted(modules)
    # An optional extra's own package may be absent (make test-lowest installs no extras); a module of
    # hf_fdiv never may: that is a module the wheel left out.
    failed = {name: file.split(":", 1)[1] for name, file in files.items() if file.startswith("ImportError:")}
    extras_missing = {name: OPTIONAL.get(name) for name in failed}
    assert failed == extras_missing, (
        f"modules of the source tree that do not import from the installed package: {failed} "
        f"(a missing hf_fdiv.* module is one the wheel left out; check [tool.setuptools.packages.find])")
    assert all(importlib.util.find_spec(OPTIONAL[name]) is None for name in failed)
    for name, file in files.items():
        if name in failed:
            continue
        path = pathlib.Path(file).resolve()
        assert SOURCE not in path.parents, (
            f"{name} was imported from the source tree ({path}), not from an installed wheel: "
            "run these tests through `make test` (they check what users install)")
        assert "site-packages" in path.parts, (name, path)
    installed_root = pathlib.Path(files["hf_fdiv"]).parent
    data = sorted(p.relative_to(SOURCE) for p in SOURCE.rglob("*")
                  if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts)
    assert data, "expected package data (the model-card template, py.typed)"
    assert [p for p in data if not (installed_root / p).is_file()] == []


def test_public_api_computes(tmp_path):
    code = """
import torch, torch.nn.functional as F
import hf_fdiv
from hf_fdiv import f_softargmax, fdiv_loss, causal_lm_fdiv_loss, FDivLoss, available_divergences
torch.manual_seed(0)
x = torch.randn(5, 11, dtype=torch.float64)
y = torch.randint(0, 11, (5,))
assert torch.allclose(f_softargmax(x, "kl"), torch.softmax(x, -1), atol=1e-12)
assert torch.allclose(fdiv_loss(x, y, "kl"), F.cross_entropy(x, y), atol=1e-12)
p = f_softargmax(x, "alpha:1.5")
assert torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12) and (p == 0).any()
logits, labels = torch.randn(2, 6, 11, dtype=torch.float64), torch.randint(0, 11, (2, 6))
ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
assert torch.allclose(causal_lm_fdiv_loss(logits, labels, divergence="kl"), ce, atol=1e-12)
assert torch.allclose(FDivLoss("kl")(x, y), F.cross_entropy(x, y), atol=1e-12)
for name in hf_fdiv.__all__:  # every public name resolves (the trainers load lazily)
    getattr(hf_fdiv, name)
print("ok", len(available_divergences()))
"""
    assert isolated_python(code, tmp_path).startswith("ok")


def test_cli_help_and_version_have_one_source(tmp_path):
    help_text = run([str(BIN / "hf-fdiv"), "--help"], tmp_path)
    for command in ("sft", "distill", "teacher-topk", "demo", "--version"):
        assert command in help_text
    version = run([str(BIN / "hf-fdiv"), "--version"], tmp_path).strip()
    code = "import importlib.metadata as m, hf_fdiv; print(m.version('hf-fdiv'), hf_fdiv.__version__)"
    metadata_version, package_version = isolated_python(code, tmp_path).split()
    assert version == f"hf-fdiv {package_version}"
    assert metadata_version == package_version


def test_tiny_sft_trains_and_its_card_records_the_version(tmp_path):
    """The CLI's SFT on tiny in-code assets, from the installed console script, outside the checkout."""
    run([sys.executable, "-I", str(ROOT / "examples" / "tiny_assets.py"), str(tmp_path / "tiny")], tmp_path)
    run([str(BIN / "hf-fdiv"), "sft", "--model_name_or_path", str(tmp_path / "tiny" / "student"),
         "--dataset_name", str(tmp_path / "tiny" / "data" / "train.jsonl"), "--output_dir", str(tmp_path / "sft"),
         "--divergence", "alpha:1.5", "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu",
         "--bf16", "False", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"], tmp_path)
    version = isolated_python("import hf_fdiv; print(hf_fdiv.__version__)", tmp_path).strip()
    card = (tmp_path / "sft" / "README.md").read_text()
    assert f"- hf_fdiv: {version}" in card and "`alpha:1.5`" in card
    # it trained: the saved weights are finite and differ from the initial student's
    code = f"""
from safetensors.torch import load_file
before = load_file({str(tmp_path / "tiny" / "student" / "model.safetensors")!r})
after = load_file({str(tmp_path / "sft" / "model.safetensors")!r})
assert before.keys() == after.keys()
assert all(t.isfinite().all() for t in after.values())
print(sum(int(not before[k].equal(after[k])) for k in before), len(before))
"""
    changed, total = map(int, isolated_python(code, tmp_path).split())
    assert changed > total // 2, (changed, total)
