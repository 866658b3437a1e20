"""Logged training loss at batch 4 x gradient accumulation 2 over batch 8 x 1, stock Trainer /
Seq2SeqTrainer vs hf_fdiv's (divergence="kl"), one SGD step on the tiny in-code models of
tests/tiny_tasks.py (same 8 examples, some targets ignored). 1.000 = accumulation done right.

    python benchmarks/stock_ga_by_kind.py [kind ...]
"""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples")]

from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments,  # noqa: E402
                          default_data_collator)
from transformers.utils import logging  # noqa: E402

from hf_fdiv import FDivSeq2SeqTrainer, FDivSeq2SeqTrainingArguments, FDivTrainer, FDivTrainingArguments  # noqa: E402
from tiny import COMMON  # noqa: E402
from tiny_tasks import KINDS, SEQ2SEQ, make_dataset, make_model  # noqa: E402


def ratio(kind: str, fdiv: bool) -> float:
    seq2seq = kind in SEQ2SEQ
    if fdiv:
        cls, args_cls = (FDivSeq2SeqTrainer, FDivSeq2SeqTrainingArguments) if seq2seq else (FDivTrainer,
                                                                                           FDivTrainingArguments)
    else:
        cls, args_cls = (Seq2SeqTrainer, Seq2SeqTrainingArguments) if seq2seq else (Trainer, TrainingArguments)
    losses = []
    for bs, ga in ((8, 1), (4, 2)):
        args = args_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                        max_steps=1, optim="sgd", learning_rate=0.1, **COMMON, **({"divergence": "kl"} if fdiv else {}))
        trainer = cls(model=make_model(kind), args=args, train_dataset=make_dataset(kind),
                      data_collator=default_data_collator)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    return losses[1] / losses[0]


if __name__ == "__main__":
    logging.set_verbosity_error()
    print("| model kind | stock: loss(4 x 2) / loss(8 x 1) | hf_fdiv kl |\n|---|---:|---:|")
    for kind in sys.argv[1:] or KINDS:
        print(f"| {kind} | {ratio(kind, False):.3f} | {ratio(kind, True):.3f} |", flush=True)
