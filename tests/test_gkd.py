"""FDivGKDTrainer against TRL's own GKDTrainer (trl.experimental.gkd), on tiny in-code models.

Oracle: divergence="kl", teacher_mode="target" is KL(teacher || student) per token at temperature 1,
GKD's loss with beta=0: the same loss, gradients and parameters on the same sequences.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from trl.experimental.gkd import GKDConfig, GKDTrainer

from hf_fdiv import FDivGKDConfig, FDivGKDTrainer

from tiny import SFT_COMMON, loss_and_grads, make_model, max_diff, messages_dataset, params

GKD_COMMON = dict(SFT_COMMON, per_device_train_batch_size=4, max_steps=3, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", max_new_tokens=8)


def build(cls, config_cls, tok, tmp_path, teacher=None, **cfg):
    kwargs = dict(GKD_COMMON)
    kwargs.update(cfg)
    teacher = teacher if teacher is not None else make_model(tok, hidden=32, seed=1)
    return cls(model=make_model(tok), teacher_model=teacher,
               args=config_cls(output_dir=str(tmp_path), **kwargs), train_dataset=messages_dataset(8),
               processing_class=tok)


def test_kl_target_is_stock_gkd_beta0_on_data_and_on_student_completions(tok, tmp_path):
    mine = build(FDivGKDTrainer, FDivGKDConfig, tok, tmp_path / "fdiv", divergence="kl", lmbda=0.0)
    theirs = build(GKDTrainer, GKDConfig, tok, tmp_path / "stock", beta=0.0, lmbda=0.0)
    batch = next(iter(theirs.get_train_dataloader()))
    # the student's own completions of the same prompts (GKD's on-policy step), scored by both losses
    ids, mask, labels = GKDTrainer.generate_on_policy_outputs(theirs.model, batch, theirs.generation_config)
    on_policy = dict(batch, input_ids=ids, attention_mask=mask, labels=labels)
    for inputs in (batch, on_policy):
        count = (inputs["labels"][:, 1:] != -100).sum()
        theirs.model.train()
        loss_t, grads_t = loss_and_grads(theirs, inputs, num_items_in_batch=count)
        mine.model.train()
        loss_m, grads_m = loss_and_grads(mine, inputs, num_items_in_batch=count)
        assert loss_t > 1e-3
        assert abs(loss_m - loss_t) <= 1e-6 * max(1.0, loss_t)
        assert max_diff(grads_m, grads_t) <= 1e-6
    theirs.train()
    mine.train()
    losses_t = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    losses_m = [h["loss"] for h in mine.state.log_history if "loss" in h]
    assert len(losses_m) == len(losses_t) == 3
    assert losses_m == pytest.approx(losses_t, abs=1e-6)
    assert max_diff(params(mine.model), params(theirs.model)) <= 1e-6


def test_batch_8_ga_1_equals_batch_4_ga_2(tok, tmp_path):
    out = []
    for bs, ga in [(8, 1), (4, 2)]:
        trainer = build(FDivGKDTrainer, FDivGKDConfig, tok, tmp_path / f"{bs}", lmbda=0.0, max_steps=1,
                        per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        before = params(trainer.model)
        trainer.train()
        out.append(params(trainer.model))
        assert max_diff(out[-1], before) > 1e-4
    assert max_diff(out[0], out[1]) <= 1e-6


def test_alpha_15_on_policy_trains_and_card(tok, tmp_path):
    teacher = make_model(tok, hidden=32, seed=1)
    teacher.config._name_or_path = "acme/tiny-teacher"
    trainer = build(FDivGKDTrainer, FDivGKDConfig, tok, tmp_path, teacher=teacher, lmbda=1.0, learning_rate=1e-2,
                    optim="adamw_torch", teacher_mode="reference")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    supports = [h["support_size"] for h in trainer.state.log_history if "support_size" in h]
    assert len(supports) == 3 and max(supports) <= len(tok)
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "README.md"))
    for text in ("FDivGKDTrainer", "acme/tiny-teacher", "`reference`", "`alpha:1.5`"):
        assert text in card.text, text


def test_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match=r"beta=0.5 selects TRL's forward/reverse-KL mix.*--divergence"):
        FDivGKDConfig(output_dir=str(tmp_path), beta=0.5, **SFT_COMMON)
    with pytest.raises(ValueError, match="vocab_size .* shared vocabulary"):
        build(FDivGKDTrainer, FDivGKDConfig, tok, tmp_path, teacher=make_model(tok, hidden=32, seed=1,
                                                                             vocab_size=len(tok) + 64))
