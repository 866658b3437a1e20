"""Gradient accumulation when the Trainer gives no ``num_items_in_batch`` (a subclass or model that
does not accept loss kwargs): the loss is the micro-batch mean and the Trainer must divide it by the
accumulation steps, exactly as for the stock loss (transformers' GA loss-alignment test, ported)."""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_fdiv import FDivTrainer, FDivTrainingArguments
from tiny import COMMON, make_model, tokenized_lm_dataset


def _train(tok, tmp_path, cls, args_cls, ga, **extra):
    torch.manual_seed(0)
    model = make_model(tok)
    args = args_cls(output_dir=str(tmp_path / f"{cls.__name__}-{ga}"), per_device_train_batch_size=8 // ga,
                    gradient_accumulation_steps=ga, max_steps=2, learning_rate=0.1, optim="sgd",
                    **COMMON, **extra)
    trainer = cls(model=model, args=args, train_dataset=tokenized_lm_dataset(tok, 16),
                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.model_accepts_loss_kwargs = False  # the Trainer then counts no num_items_in_batch
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(num_items_in_batch)
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = spy
    trainer.train()
    assert seen and all(n is None for n in seen)  # the case under test really happened
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_without_num_items_is_scaled_like_the_stock_trainer(tok, tmp_path):
    for ga in (1, 2, 4):
        stock_losses, stock_params = _train(tok, tmp_path, Trainer, TrainingArguments, ga)
        ours_losses, ours_params = _train(tok, tmp_path, FDivTrainer, FDivTrainingArguments, ga, divergence="kl")
        assert len(ours_losses) == len(stock_losses) == 2
        for a, b in zip(ours_losses, stock_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (ga, ours_losses, stock_losses)
        for name in stock_params:
            torch.testing.assert_close(ours_params[name], stock_params[name], atol=1e-6, rtol=0)
