"""Masked language modelling on a text file, written like transformers' run_mlm.py (HfArgumentParser,
tokenize, group into blocks, DataCollatorForLanguageModeling with mlm_probability) with one change: the
Trainer and its arguments are hf_fdiv's (the loss is fused with the MLM decoder when it is a plain linear
layer; BERT's goes through its transform first, so the logits are used).

    python examples/tasks/masked_lm.py --model_name_or_path bert-base-uncased --train_file text.txt \
        --output_dir out --divergence alpha:1.5
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, HfArgumentParser

# the only change from a stock script: `from transformers import Trainer, TrainingArguments`
from hf_fdiv import FDivTrainer as Trainer, FDivTrainingArguments as TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or path of the pretrained masked LM."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A text file, one document per line."})
    max_seq_length: int = field(default=64)
    mlm_probability: float = field(default=0.15)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    raw = load_dataset("text", data_files={"train": data_args.train_file})["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)
    block = data_args.max_seq_length

    def group_texts(batch):
        # concatenate, then cut into blocks of max_seq_length tokens, as run_mlm.py does without line_by_line
        ids = [i for row in tokenizer(batch["text"], return_special_tokens_mask=True)["input_ids"] for i in row]
        usable = (len(ids) // block) * block
        return {"input_ids": [ids[i:i + block] for i in range(0, usable, block)]}

    data = raw.map(group_texts, batched=True, remove_columns=raw.column_names)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, processing_class=tokenizer,
                      data_collator=collator)
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)


if __name__ == "__main__":
    main()
