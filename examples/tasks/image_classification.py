"""Image classification from an image folder (``<dir>/<class>/<image>``), written like transformers'
run_image_classification.py (HfArgumentParser, the ``imagefolder`` loader, the model's image processor
applied on the fly, a collator stacking pixel_values and labels) with one change: the Trainer and its
arguments are hf_fdiv's.

    python examples/tasks/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --train_dir images/ --output_dir out --divergence alpha:1.5 --remove_unused_columns False
"""

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

# the only change from a stock script: `from transformers import Trainer, TrainingArguments`
from hf_fdiv import FDivTrainer as Trainer, FDivTrainingArguments as TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or path of the pretrained vision backbone."})


@dataclass
class DataTrainingArguments:
    train_dir: str = field(metadata={"help": "A folder with one sub-folder of images per class."})


def collate_fn(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    data = load_dataset("imagefolder", data_dir=data_args.train_dir)["train"]
    names = data.features["label"].names
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(names), label2id={n: i for i, n in enumerate(names)},
        id2label=dict(enumerate(names)))

    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        batch["pixel_values"] = list(processor(images, return_tensors="pt")["pixel_values"])
        return batch

    data.set_transform(transform)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, processing_class=processor,
                      data_collator=collate_fn)
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)


if __name__ == "__main__":
    main()
