"""Token classification (NER) from JSON lines with ``tokens`` and ``ner_tags`` (strings), written like
transformers' run_ner.py (HfArgumentParser, labels aligned to the first sub-token of each word, -100
elsewhere, DataCollatorForTokenClassification) with one change: the Trainer and its arguments are hf_fdiv's.

    python examples/tasks/token_classification.py --model_name_or_path bert-base-cased \
        --train_file ner.jsonl --output_dir out --divergence alpha:1.5
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                          HfArgumentParser)

# the only change from a stock script: `from transformers import Trainer, TrainingArguments`
from hf_fdiv import FDivTrainer as Trainer, FDivTrainingArguments as TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or path of the pretrained encoder."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "JSON lines with `tokens` (words) and `ner_tags` (their tags)."})
    max_seq_length: int = field(default=128)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    raw = load_dataset("json", data_files={"train": data_args.train_file})["train"]
    tags = sorted({tag for row in raw["ner_tags"] for tag in row})
    label2id = {tag: i for i, tag in enumerate(tags)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForTokenClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(tags), label2id=label2id,
        id2label={i: tag for tag, i in label2id.items()})

    def tokenize_and_align(batch):
        out = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True,
                        max_length=data_args.max_seq_length)
        out["labels"] = []
        for i, row_tags in enumerate(batch["ner_tags"]):
            previous, labels = None, []
            for word in out.word_ids(batch_index=i):
                # special tokens and the continuation of a word are not targets (-100), as in run_ner.py
                labels.append(-100 if word is None or word == previous else label2id[row_tags[word]])
                previous = word
            out["labels"].append(labels)
        return out

    data = raw.map(tokenize_and_align, batched=True, remove_columns=raw.column_names)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForTokenClassification(tokenizer))
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)


if __name__ == "__main__":
    main()
