"""``hf-fdiv``: command-line entry point (TrlParser: a YAML ``--config`` plus flags).

    hf-fdiv sft          --model_name_or_path M --dataset_name D --output_dir O [--divergence alpha:1.5] [--use_peft]
    hf-fdiv distill      --model_name_or_path S --teacher_model_name_or_path T --dataset_name D --output_dir O
                         [--teacher_mode target|reference] [--temperature 1.0] [--lmbda 0.0]
    hf-fdiv distill --on-policy --model_name_or_path S --teacher_model_name_or_path T --dataset_name PROMPTS
                         --output_dir O [--divergence alpha:1.5] [--max_completion_length 512] (trl.DistillationTrainer)
    hf-fdiv teacher-topk --teacher_model_name_or_path T --dataset_name D --k 64 --output_dir O
    hf-fdiv demo         [--steps N] [--output_dir O] [--student_hidden 128] ...
    hf-fdiv --version

Every command accepts ``--help`` (hf_fdiv's own options are listed first) and ``--config file.yaml``;
flags override the YAML. ``--bf16`` defaults to ``auto`` (on with a bf16-capable CUDA GPU, else off).
Evaluation (``--eval_strategy steps``) uses ``--dataset_test_split`` when the data has it, else
``--eval_split_size 0.1`` (held out of the training split) or ``--eval_dataset_name FILE``. Multi-process:
``accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml -m hf_fdiv.cli sft ...``.
``--dataset_name`` may be a Hub name (only when online), a local data file (.json/.jsonl/.csv/.parquet),
a folder of data files, or a ``save_to_disk`` folder.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Optional

from .distributed import finish_distributed

COMMANDS = ("sft", "distill", "teacher-topk", "demo")


def load_any_dataset(name: str, config: Optional[str] = None):
    """A DatasetDict from a local file, a local folder, a save_to_disk folder, or the Hub."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(name) and (
        os.path.exists(os.path.join(name, "dataset_dict.json")) or os.path.exists(os.path.join(name, "dataset_info.json"))
    ):
        ds = load_from_disk(name)
        return ds if isinstance(ds, DatasetDict) else DatasetDict({"train": ds})
    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lstrip(".").lower()
        kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"unsupported data file {name!r}: use .json, .jsonl, .csv or .parquet")
        return load_dataset(kind, data_files=name)
    return load_dataset(name, name=config)


@dataclass
class TopKArguments:
    """Arguments of ``hf-fdiv teacher-topk``."""

    teacher_model_name_or_path: str = field(metadata={"help": "Teacher model (name or local path)."})
    dataset_name: str = field(metadata={"help": "Dataset (local file/folder, or Hub name when online)."})
    output_dir: str = field(metadata={"help": "Where to save the tokenized dataset with the top-k columns."})
    k: int = field(default=64, metadata={"help": "Number of teacher log-probabilities kept per position."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to process."})
    max_length: Optional[int] = field(default=1024, metadata={"help": "Truncation length of the tokenized rows."})
    batch_size: int = field(default=8, metadata={"help": "Teacher batch size."})


@functools.cache
def script_arguments_class():
    """TRL's ``ScriptArguments`` plus the evaluation-split options (built on first use: importing
    this module stays cheap for ``hf-fdiv --help``)."""
    from trl import ScriptArguments

    @dataclass
    class FDivScriptArguments(ScriptArguments):
        eval_split_size: Optional[float] = field(
            default=None,
            metadata={"help": "Hold out this fraction (< 1) or number of rows (>= 1) of the training split for "
                      "evaluation (seeded by --seed), e.g. when the data is one file without a test split."},
        )
        eval_dataset_name: Optional[str] = field(
            default=None,
            metadata={"help": "Separate evaluation data (local file/folder, or Hub name when online): its "
                      "--dataset_test_split split, or its only split."},
        )

    return FDivScriptArguments


def _own_option_names(dataclass_types) -> set:
    """Options hf_fdiv adds to TRL's: listed first, in their own group, by ``--help``."""
    from trl import ScriptArguments

    from .trainers import FDivDistillationConfig, FDivSFTConfig
    from .trainers.arguments import FDivLossArguments

    names = {f.name for f in fields(FDivLossArguments)}
    names |= {f.name for f in fields(FDivDistillationConfig)} - {f.name for f in fields(FDivSFTConfig)}
    names |= {f.name for f in fields(script_arguments_class())} - {f.name for f in fields(ScriptArguments)}
    if TopKArguments in dataclass_types:
        names |= {f.name for f in fields(TopKArguments)}
    return names


def make_parser(dataclass_types, prog: str):
    """A ``TrlParser`` whose ``--help`` lists hf_fdiv's options first, in their own group, then the
    options of TRL / transformers (hundreds of them), with a short usage line."""
    from trl import TrlParser

    own = _own_option_names(tuple(dataclass_types))

    class _Parser(TrlParser):
        def _add_dataclass_arguments(self, dtype):
            before = len(self._actions)
            super()._add_dataclass_arguments(dtype)
            group = getattr(self, "_fdiv_group", None)
            if group is None:
                group = self._fdiv_group = self.add_argument_group(
                    "hf_fdiv options", "The f-divergence loss, distillation, evaluation split and Hub metadata.")
                self._action_groups.remove(group)
                self._action_groups.insert(0, group)
                self._optionals.title = "TRL / transformers options (SFTConfig, ScriptArguments, ModelConfig)"
            for action in self._actions[before:]:
                if action.dest in own:
                    for other in self._action_groups:
                        if action in other._group_actions and other is not group:
                            other._group_actions.remove(action)
                    group._group_actions.append(action)

    return _Parser(dataclass_types, prog=prog, usage="%(prog)s [-h] [--config CONFIG.yaml] [OPTIONS]",
                   description="Options may also come from a YAML file given with --config (flags override it).")


def train_eval_datasets(script_args, training_args):
    """(train, eval or None) from the script arguments. Evaluation is on when ``eval_strategy`` is not
    "no"; its data is ``--eval_dataset_name``, or ``--eval_split_size`` rows held out of the training
    split, or the ``--dataset_test_split`` split. Errors say which splits exist and how to give one."""
    from .trainers.checks import ConfigurationError

    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    name, train_split, test_split = script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in dataset:
        raise ConfigurationError(
            f"{name!r} has no {train_split!r} split (its splits: {list(dataset)}): pass --dataset_train_split "
            "with one of them."
        )
    train = dataset[train_split]
    size, eval_name = script_args.eval_split_size, script_args.eval_dataset_name
    if size is not None and eval_name is not None:
        raise ConfigurationError("give either --eval_split_size or --eval_dataset_name, not both.")
    if str(training_args.eval_strategy) in ("no", "IntervalStrategy.NO"):
        if size is not None or eval_name is not None:
            raise ConfigurationError(
                "--eval_split_size / --eval_dataset_name give evaluation data, but evaluation is off "
                "(--eval_strategy no): add --eval_strategy steps --eval_steps N (or --eval_strategy epoch)."
            )
        return train, None
    if eval_name is not None:
        extra = load_any_dataset(eval_name)
        if test_split in extra:
            return train, extra[test_split]
        if len(extra) == 1:
            return train, next(iter(extra.values()))
        raise ConfigurationError(
            f"--eval_dataset_name {eval_name!r} has splits {list(extra)} and none is {test_split!r}: pass "
            "--dataset_test_split with one of them."
        )
    if size is not None:
        if not size > 0 or (size >= 1 and size != int(size)):
            raise ConfigurationError(f"--eval_split_size must be a fraction in (0, 1) or a row count >= 1, got {size}.")
        test_size = int(size) if size >= 1 else size
        if isinstance(test_size, int) and test_size >= len(train):
            raise ConfigurationError(
                f"--eval_split_size {test_size} leaves no training rows: {train_split!r} has {len(train)} rows."
            )
        parts = train.train_test_split(test_size=test_size, seed=training_args.seed)
        return parts["train"], parts["test"]
    if test_split in dataset:
        return train, dataset[test_split]
    raise ConfigurationError(
        f"evaluation is on (--eval_strategy {training_args.eval_strategy}) but {name!r} has no {test_split!r} split "
        f"(its splits: {list(dataset)}). Pass --eval_split_size 0.1 to hold out 10% of {train_split!r}, "
        "--eval_dataset_name <file or folder> for separate data, --dataset_test_split <split> to use another split, "
        "or --eval_strategy no."
    )


def _sft(argv):
    from trl import ModelConfig, get_peft_config

    from .trainers import FDivSFTConfig, FDivSFTTrainer

    parser = make_parser((script_arguments_class(), FDivSFTConfig, ModelConfig), prog="hf-fdiv sft")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    train, evaluation = train_eval_datasets(script_args, training_args)
    trainer = FDivSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )
    _train_save_push(trainer, training_args, script_args.dataset_name)


def _distill(argv):
    if "--on-policy" in argv:
        return _distill_on_policy([a for a in argv if a != "--on-policy"])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig, get_peft_config

    from .trainers import FDivDistillationConfig, FDivDistillationTrainer

    parser = make_parser((script_arguments_class(), FDivDistillationConfig, ModelConfig), prog="hf-fdiv distill")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    train, evaluation = train_eval_datasets(script_args, training_args)
    from .trainers.teacher import TOPK_IDS

    offline = TOPK_IDS in train.column_names
    if training_args.teacher_model_name_or_path is None and not offline:
        parser.error("distill needs --teacher_model_name_or_path, or a dataset made by `hf-fdiv teacher-topk`.")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    trainer = FDivDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    _train_save_push(trainer, training_args, script_args.dataset_name)


def _distill_on_policy(argv):
    """TRL's DistillationTrainer (the student writes the completions of a `prompt` dataset) with the f-divergence."""
    from trl import ModelConfig, get_peft_config

    from .trainers import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer

    parser = make_parser((script_arguments_class(), FDivOnPolicyDistillationConfig, ModelConfig),
                         prog="hf-fdiv distill --on-policy")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if training_args.teacher_model_name_or_path is None:
        parser.error("distill --on-policy needs --teacher_model_name_or_path.")
    train, evaluation = train_eval_datasets(script_args, training_args)
    trainer = FDivOnPolicyDistillationTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )
    _train_save_push(trainer, training_args, script_args.dataset_name)


def _train_save_push(trainer, training_args, dataset_name):
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model and card saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        try:
            trainer.push_to_hub(dataset_name=dataset_name)
        except Exception as err:  # the Hub was reachable when the trainer was built, but not now
            print(f"hf-fdiv: the push to the Hub failed ({type(err).__name__}: {str(err).strip()[:300]}); the model "
                  f"and its card are saved in {training_args.output_dir}: upload them with "
                  f"`hf upload {trainer.hub_model_id} {training_args.output_dir}`.", file=sys.stderr)
            sys.exit(1)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    finish_distributed(trainer)  # under `accelerate launch`: leave together, close the group safely (issue 26)


def _teacher_topk(argv):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .trainers import FDivSFTConfig, FDivSFTTrainer, add_teacher_topk

    parser = make_parser((TopKArguments,), prog="hf-fdiv teacher-topk")
    (args,) = parser.parse_args_and_config(argv)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model_name_or_path)
    tok = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.teacher_model_name_or_path)
    data = load_any_dataset(args.dataset_name)[args.dataset_train_split]
    with tempfile.TemporaryDirectory() as tmp:
        # SFT's own preparation (chat templates, completion/assistant masks, truncation) builds the rows.
        prep = FDivSFTTrainer(
            model=teacher, processing_class=tok, train_dataset=data,
            args=FDivSFTConfig(output_dir=tmp, max_length=args.max_length, bf16=False, use_cpu=not _has_gpu(),
                               report_to="none", activation_checkpointing=False),
        ).train_dataset
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = add_teacher_topk(prep, teacher, k=args.k, batch_size=args.batch_size, pad_token_id=pad)
    out.save_to_disk(args.output_dir)
    print(f"{len(out)} rows with teacher top-{args.k} log-probabilities saved to {args.output_dir}; "
          f"distil with: hf-fdiv distill --dataset_name {args.output_dir} --model_name_or_path <student> ...")
    finish_distributed()  # the SFT preparation started the process group under `accelerate launch`


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _demo(argv):
    from .demo import main as demo_main

    demo_main(argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"hf-fdiv {__version__}")
        return
    command, rest = argv[0], argv[1:]
    handlers = {"sft": _sft, "distill": _distill, "teacher-topk": _teacher_topk, "demo": _demo}
    if command not in handlers:
        print(f"hf-fdiv: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see hf-fdiv --help).",
              file=sys.stderr)
        sys.exit(2)
    from .trainers.checks import ConfigurationError

    try:
        handlers[command](rest)
    except ConfigurationError as err:  # a wrong input: one line that says what to change, no traceback
        print(f"hf-fdiv {command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
