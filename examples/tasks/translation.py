"""Translation with an encoder-decoder, written like transformers' run_translation.py (HfArgumentParser,
source prefix, ``text_target=`` labels with padding as -100, DataCollatorForSeq2Seq(model=...),
Seq2SeqTrainer with predict_with_generate) with one change: the Seq2SeqTrainer and its arguments are
hf_fdiv's.

    python examples/tasks/translation.py --model_name_or_path t5-small --train_file pairs.jsonl \
        --source_lang en --target_lang fr --source_prefix "translate English to French: " \
        --output_dir out --divergence alpha:1.5 --predict_with_generate
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser

# the only change from a stock script: `from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments`
from hf_fdiv import FDivSeq2SeqTrainer as Seq2SeqTrainer, FDivSeq2SeqTrainingArguments as Seq2SeqTrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or path of the pretrained encoder-decoder."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "JSON lines of {'translation': {source_lang: ..., target_lang: ...}}."})
    source_lang: str = field(default="en")
    target_lang: str = field(default="fr")
    source_prefix: str = field(default="")
    max_source_length: int = field(default=64)
    max_target_length: int = field(default=64)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    raw = load_dataset("json", data_files={"train": data_args.train_file})["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)

    def preprocess(batch):
        sources = [data_args.source_prefix + pair[data_args.source_lang] for pair in batch["translation"]]
        targets = [pair[data_args.target_lang] for pair in batch["translation"]]
        return tokenizer(sources, text_target=targets, max_length=data_args.max_source_length, truncation=True)

    data = raw.map(preprocess, batched=True, remove_columns=raw.column_names)
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=data, eval_dataset=data,
                             processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    if training_args.predict_with_generate:
        trainer.log_metrics("eval", trainer.evaluate(max_length=data_args.max_target_length))


if __name__ == "__main__":
    main()
