"""Issue 14, the user's path: defaults that work on any machine, outputs others can use from the Hub,
and errors that say what to do. Each test fails on the behaviour before the fix (see the issue items).

Oracles: stock TRL/transformers configs and trainers, huggingface_hub's ModelCard / repo-id
validation (offline), the card's own quick-start code executed, closed-form divergences."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import re
import shlex
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig
from transformers.testing_utils import CaptureLogger
from trl import SFTConfig

from hf_fdiv import (
    FDivDistillationConfig,
    FDivDistillationTrainer,
    FDivSFTConfig,
    FDivSFTTrainer,
    FDivTrainer,
    FDivTrainingArguments,
    get_divergence,
)
from hf_fdiv.trainers import arguments as fdiv_arguments
from hf_fdiv.trainers.checks import ConfigurationError, HubUnavailableError
from hf_fdiv.trainers.model_card import BASE_MODEL_RELATIONS, check_card_metadata
from launch import launch
from tiny import SFT_COMMON, make_model, messages_dataset, prompt_completion_dataset, text_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def sft(tok, tmp_path, model=None, dataset=None, **cfg):
    kwargs = dict(SFT_COMMON, per_device_train_batch_size=4, max_steps=1)
    kwargs.update(cfg)
    return FDivSFTTrainer(model=model if model is not None else make_model(tok), processing_class=tok,
                          args=FDivSFTConfig(output_dir=str(tmp_path), **kwargs),
                          train_dataset=dataset if dataset is not None else messages_dataset(8))


def hub_metadata(path) -> dict:
    """The card's YAML as huggingface_hub reads it, checked offline: valid repo ids, a known relation."""
    card = ModelCard.load(str(path))
    data = card.data.to_dict()
    check_card_metadata(data)
    if data.get("base_model"):
        validate_repo_id(data["base_model"])
        assert data.get("base_model_relation") in BASE_MODEL_RELATIONS
    return data


def card_code(path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", ModelCard.load(str(path)).text, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


# ------------------------------------------------------------------ 1. bf16 "auto"


def test_default_configs_work_without_a_gpu_and_bf16_auto_resolves(monkeypatch, tmp_path):
    assert not torch.cuda.is_available()  # this test is about the CPU machine (CI)
    # Stock TRL: bf16=True whatever the machine, which transformers then refuses here.
    with pytest.raises(ValueError, match="use_cpu"):
        SFTConfig(output_dir=str(tmp_path))
    logging.Logger.warning_once.cache_clear()  # the line is logged once per process: an earlier test may have
    with CaptureLogger(fdiv_arguments.logger) as cap:
        for cls in (FDivSFTConfig, FDivDistillationConfig, FDivTrainingArguments):
            assert cls(output_dir=str(tmp_path)).bf16 is False
    assert "bf16='auto' -> bf16=False" in cap.out
    # explicit values win; "auto" follows the machine (a bf16-capable CUDA GPU simulated)
    assert FDivSFTConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
    resolve = fdiv_arguments.resolve_bf16
    assert resolve(True) is True and resolve("false") is False and resolve("True") is True
    monkeypatch.setattr(fdiv_arguments, "cuda_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "simulated GPU")
    assert resolve("auto") is True and resolve(None) is True
    assert resolve("auto", use_cpu=True) is False and resolve("auto", fp16=True) is False
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        resolve("maybe")


def test_bf16_flag_forms_on_the_command_line(tmp_path):
    from hf_fdiv.cli import make_parser

    parser = make_parser((FDivSFTConfig,), prog="hf-fdiv sft")
    parse = lambda *a: parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *a])[0].bf16  # noqa: E731
    assert parse() is False and parse("--bf16", "auto") is False and parse("--bf16", "False") is False
    # "--bf16" alone means True: accepted by the parser (the config then needs a GPU, as in transformers)
    with pytest.raises(ValueError, match="bf16"):
        parse("--bf16")


def test_trainer_without_args_uses_fdiv_config(tok, tmp_path, monkeypatch):
    # TRL builds SFTConfig(bf16=True) when args is None, which fails on a CPU machine.
    monkeypatch.chdir(tmp_path)
    trainer = FDivSFTTrainer(model=make_model(tok), train_dataset=messages_dataset(4), processing_class=tok)
    assert isinstance(trainer.args, FDivSFTConfig) and trainer.args.bf16 is False


# ------------------------------------------------------------------ 2. push_to_hub without the Hub


@pytest.mark.parametrize("cls", ["sft", "plain"])
def test_push_to_hub_offline_stops_before_training_in_one_line(tok, tmp_path, cls):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: nothing here touches the network
    with pytest.raises(HubUnavailableError) as err:
        if cls == "sft":
            sft(tok, tmp_path, push_to_hub=True, hub_model_id="me/tiny")
        else:
            from transformers import DataCollatorForLanguageModeling

            from tiny import tokenized_lm_dataset

            args = FDivTrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/tiny",
                                         report_to="none", use_cpu=True, max_steps=1)
            FDivTrainer(model=make_model(tok), args=args, train_dataset=tokenized_lm_dataset(tok),
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    message = str(err.value)
    assert "\n" not in message and "--push_to_hub" in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path) in message and "nothing was trained" in message


def test_push_to_hub_unreachable_network_is_the_same_clear_error(tok, tmp_path, monkeypatch):
    from huggingface_hub import constants

    import transformers.trainer

    class NoNetwork:
        def create_repo(self, *a, **k):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoNetwork())
    with pytest.raises(HubUnavailableError, match=r"ConnectionError: Failed to resolve.*--push_to_hub|--push_to_hub"):
        sft(tok, tmp_path, push_to_hub=True, hub_model_id="me/tiny")


def test_cli_push_to_hub_offline_exits_with_one_line(tiny, tmp_path, capsys):
    from hf_fdiv import cli

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--model_name_or_path", str(tiny / "student"), "--dataset_name", str(tiny / "data"),
                  "--output_dir", str(out), "--push_to_hub", "--report_to", "none", "--max_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-fdiv sft: error: push_to_hub=True (--push_to_hub)")
    assert not (out / "model.safetensors").exists()


# ------------------------------------------------------------------ 3. Hub-ready adapters and cards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_assets import main as write_tiny_assets

    out = tmp_path_factory.mktemp("tiny")
    write_tiny_assets(str(out))
    return out


def test_smollm2_loader_records_the_hub_id_for_adapters_and_cards(tok, tmp_path):
    # load_smollm2 reads its fp32 cache; a tiny stand-in there, so that no download or GGUF is needed.
    from hf_fdiv.assets import SMOLLM2_HUB_ID, load_smollm2

    cache = tmp_path / "smollm2-cache"
    make_model(tok).save_pretrained(cache)
    tok.save_pretrained(cache)
    tokenizer, model = load_smollm2(cache_dir=str(cache))
    assert model.name_or_path == SMOLLM2_HUB_ID == model.config._name_or_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = FDivSFTTrainer(model=model, processing_class=tokenizer, train_dataset=messages_dataset(8),
                                 args=FDivSFTConfig(output_dir=str(tmp_path / "out"), **dict(SFT_COMMON, max_steps=1)),
                                 peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    trainer.train()
    trainer.save_model()
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == SMOLLM2_HUB_ID  # not the cache path
    data = hub_metadata(tmp_path / "out" / "README.md")
    assert data["base_model"] == SMOLLM2_HUB_ID and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    code = card_code(tmp_path / "out" / "README.md")
    assert "AutoPeftModelForCausalLM" in code and "FSoftargmaxLogitsProcessor(\"alpha:1.5\"" in code


def test_full_model_card_quick_start_runs_and_decodes_with_the_trained_distribution(tok, tmp_path):
    trainer = sft(tok, tmp_path, divergence="alpha:1.5")
    trainer.train()
    trainer.save_model()
    code = card_code(tmp_path / "README.md")
    assert "pipeline(" not in code and "logits_processor=processor" in code
    hub_id = trainer.hub_model_id or os.path.basename(str(tmp_path))
    ns = {}
    torch.manual_seed(0)
    exec(compile(code.replace(f'"{hub_id}"', repr(str(tmp_path))), "card", "exec"), ns)  # offline: the local copy
    out, inputs, processor = ns["out"], ns["inputs"], ns["processor"]
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # every sampled token had p > 0 under the model's alpha-1.5 distribution (a plain softmax sample need not)
    model = ns["student"]
    with torch.no_grad():
        logits = model(out).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
    from hf_fdiv import f_softargmax

    p = f_softargmax(logits.double(), "alpha:1.5")
    chosen = out[0, inputs["input_ids"].shape[1]:]
    assert bool((p.gather(1, chosen[:, None]) > 0).all())
    assert processor[0].divergence.name == "alpha:1.5"
    # a model built in code has no Hub base model: no base_model, so no relation either
    data = hub_metadata(tmp_path / "README.md")
    assert "base_model" not in data and "base_model_relation" not in data


def test_distilled_student_card_names_the_teacher_and_its_reference_mode_snippet_runs(tok, tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny / "teacher"))
    teacher.name_or_path = teacher.config._name_or_path = "acme/tiny-teacher"
    args = FDivDistillationConfig(output_dir=str(tmp_path), teacher_mode="reference", **dict(SFT_COMMON, max_steps=1))
    trainer = FDivDistillationTrainer(model=make_model(tok), teacher_model=teacher, args=args,
                                      train_dataset=messages_dataset(8), processing_class=tok)
    trainer.train()
    trainer.save_model()
    tok.save_pretrained(str(tmp_path))
    data = hub_metadata(tmp_path / "README.md")
    assert data["base_model"] == "acme/tiny-teacher" and data["base_model_relation"] == "finetune"
    code = card_code(tmp_path / "README.md")
    assert "TeacherReference(teacher" in code
    hub_id = os.path.basename(str(tmp_path))
    code = code.replace(f'"{hub_id}"', repr(str(tmp_path))).replace('"acme/tiny-teacher"', repr(str(tiny / "teacher")))
    ns = {}
    exec(compile(code, "card", "exec"), ns)
    assert ns["out"].shape[1] > ns["inputs"]["input_ids"].shape[1]


def test_base_model_id_is_validated(tmp_path):
    with pytest.raises(ValueError, match="not a Hub model id"):
        FDivSFTConfig(output_dir=str(tmp_path), base_model_id=str(tmp_path))
    with pytest.raises(ValueError, match="not a Hub model id"):
        FDivSFTConfig(output_dir=str(tmp_path), base_model_id="no spaces/allowed here")


def test_cli_sft_readme_line_on_a_cpu_machine_with_lora_base_model_id_and_eval_split(tiny, tmp_path):
    # The README's command line as written (no --bf16 False, no --use_cpu, no --activation_checkpointing False),
    # on the tiny assets: runs on this CPU machine, evaluates on a held-out split of one file, and writes an
    # adapter whose config and card name the Hub base model.
    out = tmp_path / "sft"
    args = [sys.executable, "-m", "hf_fdiv.cli", "sft", "--model_name_or_path", str(tiny / "student"),
            "--dataset_name", str(tiny / "data" / "train.jsonl"), "--output_dir", str(out), "--divergence",
            "alpha:1.5", "--reference", "unit", "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
            "--base_model_id", SMOL, "--eval_strategy", "steps", "--eval_steps", "1", "--eval_split_size", "0.25",
            "--max_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4"]
    proc = launch(args, timeout=240)
    text = proc.output
    assert proc.returncode == 0, proc.report(tail=3000)
    assert "bf16='auto' -> bf16=False" in text
    assert "is deprecated" not in text, [line for line in text.splitlines() if "deprecated" in line]
    assert "'eval_loss'" in text
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == SMOL
    data = hub_metadata(out / "README.md")
    assert data["base_model"] == SMOL and data["base_model_relation"] == "adapter"


# ------------------------------------------------------------------ 4. evaluation split from the CLI


def test_cli_eval_split_options_and_error(tiny, tmp_path, capsys):
    from hf_fdiv import cli

    data = str(tiny / "data" / "train.jsonl")
    base = ["sft", "--model_name_or_path", str(tiny / "student"), "--dataset_name", data, "--output_dir",
            str(tmp_path), "--report_to", "none", "--eval_strategy", "steps"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no 'test' split (its splits: ['train'])" in err and "--eval_split_size" in err
    assert "--eval_dataset_name" in err
    parser = cli.make_parser((cli.script_arguments_class(), FDivSFTConfig), prog="hf-fdiv sft")

    def splits(*extra):
        script, training = parser.parse_args_into_dataclasses(
            ["--dataset_name", data, "--output_dir", str(tmp_path), "--eval_strategy", "steps", *extra])
        return cli.train_eval_datasets(script, training)

    train, evaluation = splits("--eval_split_size", "0.25")
    assert (len(train), len(evaluation)) == (24, 8)
    rows = lambda d: sorted(json.dumps(r, sort_keys=True) for r in d)  # noqa: E731
    assert sorted(rows(train) + rows(evaluation)) == rows(Dataset.from_json(data))  # a partition of the file
    train, evaluation = splits("--eval_split_size", "5")
    assert (len(train), len(evaluation)) == (27, 5)
    train, evaluation = splits("--eval_dataset_name", data)
    assert len(train) == len(evaluation) == 32
    with pytest.raises(ConfigurationError, match="evaluation is off"):
        script, training = parser.parse_args_into_dataclasses(
            ["--dataset_name", data, "--output_dir", str(tmp_path), "--eval_split_size", "0.1"])
        cli.train_eval_datasets(script, training)


# ------------------------------------------------------------------ 5. dataset columns


def test_unknown_columns_are_named_with_the_accepted_formats(tok, tmp_path):
    qa = Dataset.from_dict({"question": ["what is the sun?"] * 4, "answer": ["a star."] * 4})
    with pytest.raises(ConfigurationError) as err:
        sft(tok, tmp_path, dataset=qa)
    message = str(err.value)
    for text in ("['question', 'answer']", "`text`", "`messages`", "`prompt` + `completion`",
                 "rename_columns({'question': 'prompt', 'answer': 'completion'})"):
        assert text in message, text
    # the advice works: renamed, the same data is prepared as prompt/completion
    trainer = sft(tok, tmp_path, dataset=qa.rename_columns({"question": "prompt", "answer": "completion"}))
    assert trainer.train_dataset.column_names[:2] == ["prompt", "completion"]
    assert -100 in trainer.train_dataset[0]["labels"]  # completion-only targets: the prompt is masked
    with pytest.raises(ConfigurationError, match="`prompt` but no `completion`"):
        sft(tok, tmp_path, dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    with pytest.raises(ConfigurationError, match="eval_dataset has columns"):
        FDivSFTTrainer(model=make_model(tok), processing_class=tok, train_dataset=text_dataset(4), eval_dataset=qa,
                       args=FDivSFTConfig(output_dir=str(tmp_path), **SFT_COMMON))
    # every accepted format still passes, and formatting_func accepts any columns
    for ds in (text_dataset(4), messages_dataset(4), prompt_completion_dataset(4)):
        sft(tok, tmp_path, dataset=ds)
    FDivSFTTrainer(model=make_model(tok), processing_class=tok, train_dataset=qa,
                   formatting_func=lambda ex: ex["question"] + " " + ex["answer"],
                   args=FDivSFTConfig(output_dir=str(tmp_path), **SFT_COMMON))


# ------------------------------------------------------------------ 6. not a causal LM


def test_models_without_a_causal_lm_head_are_refused_up_front(tok, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel, DataCollatorForLanguageModeling

    from tiny import tokenized_lm_dataset

    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    for model, what in ((BertModel(config), "no LM head"), (BertForMaskedLM(config), "not a next-token head")):
        with pytest.raises(ConfigurationError) as err:
            sft(tok, tmp_path, model=model)
        message = str(err.value)
        assert type(model).__name__ in message and what in message and "AutoModelForCausalLM" in message
        assert "BertLMHeadModel" in message  # the causal-LM class of this architecture
    # FDivTrainer trains a masked LM (tests/test_tasks.py), but a bare backbone has no loss to follow
    with pytest.raises(ConfigurationError, match="BertModel.*no LM head"):
        FDivTrainer(model=BertModel(config), args=FDivTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                        report_to="none"),
                    train_dataset=tokenized_lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


# ------------------------------------------------------------------ 7. reference-mode constant


def _label_divergence_oracle(teacher, trainer, divergence: str) -> float:
    """Mean over the target tokens of D_f(e_c, q_teacher), from closed forms written here: KL -> -log q_c
    (the teacher's cross-entropy); alpha-divergence with sum q = 1 -> (q_c^(1 - a) - 1) / (a (a - 1))."""
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = batch["labels"][:, 1:]
    keep = target != -100
    logq = torch.log_softmax(logits[:, :-1][keep], -1)
    c = target[keep]
    if divergence == "kl":
        return float(F.cross_entropy(logits[:, :-1][keep], c))
    a = get_divergence(divergence).alpha
    qc = logq.gather(1, c[:, None]).squeeze(1).exp()
    return float(((qc ** (1 - a) - 1) / (a * (a - 1))).mean())


@pytest.mark.parametrize("divergence", ["kl", "alpha:1.5"])
def test_reference_mode_logs_the_constant_and_a_zero_correction_sits_on_it(tok, tmp_path, divergence):
    teacher = make_model(tok, hidden=32, seed=1)
    student = make_model(tok)
    with torch.no_grad():
        student.lm_head.weight.zero_()  # theta = 0: the student adds nothing to the teacher
    args = FDivDistillationConfig(output_dir=str(tmp_path), teacher_mode="reference", divergence=divergence,
                                  per_device_train_batch_size=8, **dict(SFT_COMMON, max_steps=1))
    trainer = FDivDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=messages_dataset(8), processing_class=tok)
    oracle = _label_divergence_oracle(teacher, trainer, divergence)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["reference_constant"] == pytest.approx(oracle, rel=1e-5)
    # loss = f-softmax(0; q) + D_f(e_c, q) - 0 = the constant (q sums to 1 up to the 1e-12 floor)
    assert logged["loss"] == pytest.approx(logged["reference_constant"], rel=1e-4)
    metrics = trainer.evaluate(messages_dataset(4))
    assert metrics["eval_reference_constant"] > 0
    trainer.save_model()
    assert "reference_constant" in ModelCard.load(str(tmp_path / "README.md")).text


def test_target_mode_logs_no_reference_constant(tok, tmp_path):
    args = FDivDistillationConfig(output_dir=str(tmp_path), teacher_mode="target", **dict(SFT_COMMON, max_steps=1))
    trainer = FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1), args=args,
                                      train_dataset=messages_dataset(8), processing_class=tok)
    trainer.train()
    assert "reference_constant" not in trainer.state.log_history[0]


# ------------------------------------------------------------------ 8. small things


def test_one_eval_accuracy_name(tok, tmp_path):
    from hf_fdiv.metrics import make_compute_metrics

    with_metrics = FDivSFTTrainer(model=make_model(tok), processing_class=tok, train_dataset=messages_dataset(4),
                                  args=FDivSFTConfig(output_dir=str(tmp_path), **SFT_COMMON),
                                  compute_metrics=make_compute_metrics("alpha:1.5"))
    logged = with_metrics.evaluate(messages_dataset(4))
    assert "eval_token_accuracy" in logged and "eval_mean_token_accuracy" not in logged
    plain = sft(tok, tmp_path).evaluate(messages_dataset(4))
    assert "eval_mean_token_accuracy" in plain and "eval_token_accuracy" not in plain


def test_no_gradient_checkpointing_deprecation_unless_the_user_sets_it(tmp_path):
    stock = SFTConfig(output_dir=str(tmp_path), bf16=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = FDivSFTConfig(output_dir=str(tmp_path))
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    assert ours.activation_checkpointing is stock.activation_checkpointing is True  # TRL's default kept
    # the deprecated name still works (and still warns: the user wrote it)
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):
        assert FDivSFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False).activation_checkpointing is False
    assert FDivSFTConfig(output_dir=str(tmp_path), activation_checkpointing=False).gradient_checkpointing is False


def test_unknown_divergence_suggests_the_closest_name(tmp_path):
    for typo, meant in (("alpha1.5", "alpha:1.5"), ("alpha-2", "alpha:2"), ("revers_kl", "reverse_kl"), ("jss", "js"),
                        ("chi_2", "chi2")):
        with pytest.raises(ValueError, match=f"Did you mean '{meant}'"):
            get_divergence(typo)
        get_divergence(meant)  # the suggestion is itself valid
    with pytest.raises(ValueError, match="Did you mean 'alpha:1.5'"):
        FDivSFTConfig(output_dir=str(tmp_path), divergence="alpha1.5")
    with pytest.raises(ValueError) as err:
        get_divergence("zzz")
    assert "Did you mean" not in str(err.value)


def test_demo_teacher_pass_shows_rate_and_eta_after_the_first_batch(tok):
    from hf_fdiv import add_teacher_topk
    from hf_fdiv.demo import teacher_pass

    teacher = make_model(tok, hidden=32, seed=1)
    ds = Dataset.from_dict({"input_ids": [tok(s)["input_ids"] for s in text_dataset(12)["text"]]})
    log = io.StringIO()
    out = teacher_pass(ds, teacher, k=5, pad_token_id=tok.pad_token_id, batch_size=4, file=log)
    updates = [u for u in re.split(r"[\r\n]", log.getvalue()) if u.strip()]
    first = next(u for u in updates if " 4/12 " in u)  # the bar after the first batch of 4
    assert re.search(r"\d+(\.\d+)?conv/s", first) and re.search(r"<\d\d:\d\d", first), first  # a rate and an ETA
    whole = add_teacher_topk(ds, teacher, k=5, batch_size=12, pad_token_id=tok.pad_token_id)  # one pass, the oracle
    for key in ("teacher_topk_ids", "teacher_topk_logprobs"):
        for a, b in zip(out[key], whole[key]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_readme_cpu_tips_and_demo_args_parse():
    from transformers import HfArgumentParser

    from hf_fdiv.demo import DemoArguments

    readme = (ROOT / "README.md").read_text()
    assert "OMP_NUM_THREADS=1" in readme
    lines = re.findall(r'make demo DEMO_ARGS="([^"]+)"', readme)
    assert len(lines) >= 2
    parser = HfArgumentParser(DemoArguments)
    for line in lines:
        (args,) = parser.parse_args_into_dataclasses(args=shlex.split(line))
        assert isinstance(args, DemoArguments)


def test_torch_compile_on_cpu_warns(tmp_path):
    logging.Logger.warning_once.cache_clear()
    with CaptureLogger(fdiv_arguments.logger) as cap:
        FDivSFTConfig(output_dir=str(tmp_path), torch_compile=True, use_cpu=True)
    assert "torch_compile=True on a CPU" in cap.out and "minutes" in cap.out


def test_help_lists_hf_fdiv_options_first():
    from trl import ModelConfig

    from hf_fdiv import cli

    for types, prog in (((cli.script_arguments_class(), FDivSFTConfig, ModelConfig), "hf-fdiv sft"),
                        ((cli.script_arguments_class(), FDivDistillationConfig, ModelConfig), "hf-fdiv distill")):
        text = cli.make_parser(types, prog=prog).format_help()
        lines = text.splitlines()
        assert len(lines[0]) < 80  # a short usage line, not every option
        own = [text.index(f"  --{name} ") for name in ("divergence", "reference", "bf16", "base_model_id",
                                                        "eval_split_size")]
        stock = text.index("TRL / transformers options")
        assert max(own) < stock < text.index("  --learning_rate ")
        assert text.index("hf_fdiv options") < 300
    assert "--teacher_mode" in text[:stock]
