"""Text classification from a CSV file, written like transformers' run_classification.py / run_glue.py
(argument dataclasses parsed with HfArgumentParser, a Trainer built as they build it) with one change:
the Trainer and its arguments are hf_fdiv's.

    python examples/tasks/text_classification.py --model_name_or_path bert-base-uncased \
        --train_file train.csv --text_column sentence --label_column label --output_dir out \
        --divergence alpha:1.5 --num_train_epochs 3

Tiny mode (CI): python examples/tasks/task_assets.py /tmp/t, then --model_name_or_path /tmp/t/bert
--train_file /tmp/t/data/sentiment.csv --max_steps 2.
"""

from dataclasses import dataclass, field
from typing import Optional

from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          HfArgumentParser)

# the only change from a stock script: `from transformers import Trainer, TrainingArguments`
from hf_fdiv import FDivTrainer as Trainer, FDivTrainingArguments as TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or path of the pretrained encoder."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "CSV file with a text and a label column."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "CSV file for evaluation."})
    text_column: str = field(default="sentence")
    label_column: str = field(default="label")
    max_seq_length: int = field(default=128)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    raw = load_dataset("csv", data_files=files)
    labels = sorted(set(raw["train"][data_args.label_column]))
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(labels), label2id=label2id,
        id2label={i: label for label, i in label2id.items()})

    def preprocess(batch):
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [label2id[label] for label in batch[data_args.label_column]]
        return out

    columns = raw["train"].column_names
    data = raw.map(preprocess, batched=True, remove_columns=columns)
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"],
                      eval_dataset=data.get("validation"), processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    if "validation" in data:
        trainer.log_metrics("eval", trainer.evaluate())


if __name__ == "__main__":
    main()
