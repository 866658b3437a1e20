"""``hf-fdiv``: command-line entry point (TrlParser: a YAML ``--config`` plus flags).

    hf-fdiv sft          --model_name_or_path M --dataset_name D --output_dir O [--divergence alpha:1.5] [--use_peft]
    hf-fdiv distill      --model_name_or_path S --teacher_model_name_or_path T --dataset_name D --output_dir O
                         [--teacher_mode target|reference] [--temperature 1.0] [--lmbda 0.0]
    hf-fdiv teacher-topk --teacher_model_name_or_path T --dataset_name D --k 64 --output_dir O
    hf-fdiv demo         [--steps N] [--output_dir O] [--student_hidden 128] ...

Every command accepts ``--help`` and ``--config file.yaml``; flags override the YAML. Multi-process:
``accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml -m hf_fdiv.cli sft ...``.
``--dataset_name`` may be a Hub name (only when online), a local data file (.json/.jsonl/.csv/.parquet),
a folder of data files, or a ``save_to_disk`` folder.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

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


def _sft(argv):
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    from .trainers import FDivSFTConfig, FDivSFTTrainer

    parser = TrlParser((ScriptArguments, FDivSFTConfig, ModelConfig), prog="hf-fdiv sft")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    trainer = FDivSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    _train_save_push(trainer, training_args, script_args.dataset_name)


def _distill(argv):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

    from .trainers import FDivDistillationConfig, FDivDistillationTrainer

    parser = TrlParser((ScriptArguments, FDivDistillationConfig, ModelConfig), prog="hf-fdiv distill")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    train = dataset[script_args.dataset_train_split]
    from .trainers.teacher import TOPK_IDS

    offline = TOPK_IDS in train.column_names
    if training_args.teacher_model_name_or_path is None and not offline:
        parser.error("distill needs --teacher_model_name_or_path, or a dataset made by `hf-fdiv teacher-topk`.")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left")
    trainer = FDivDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    _train_save_push(trainer, training_args, script_args.dataset_name)


def _train_save_push(trainer, training_args, dataset_name):
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model and card saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")


def _teacher_topk(argv):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import TrlParser

    from .trainers import FDivSFTConfig, FDivSFTTrainer, add_teacher_topk

    parser = TrlParser((TopKArguments,), prog="hf-fdiv teacher-topk")
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
    command, rest = argv[0], argv[1:]
    handlers = {"sft": _sft, "distill": _distill, "teacher-topk": _teacher_topk, "demo": _demo}
    if command not in handlers:
        print(f"hf-fdiv: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (see hf-fdiv --help).",
              file=sys.stderr)
        sys.exit(2)
    handlers[command](rest)


if __name__ == "__main__":
    main()
