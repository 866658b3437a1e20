"""Vision-language SFT: FDivSFTTrainer on tiny VLMs built in code (Qwen2-VL, Qwen3-VL, LLaVA, Gemma 3), with TRL's vision
dataset format (``messages`` + ``images``) and processors.

Oracle: the stock SFTTrainer. With ``divergence="kl"`` the loss, the gradients (vision tower included)
and the parameters after one SGD step are the stock ones, on the fused LM-head path and on the
materialised one; the path that ran is checked. An ``alpha:1.5`` run lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from hf_fdiv import FDivSFTConfig, FDivSFTTrainer
from hf_fdiv.trainers import loss_path

from tiny import SFT_COMMON, first_batch_step, make_gemma3, make_llava, make_qwen2_vl, make_qwen3_vl, vision_messages_dataset

MODELS = {"qwen2_vl": make_qwen2_vl, "qwen3_vl": make_qwen3_vl, "llava": make_llava, "gemma3": make_gemma3}
VISION = ("visual.", "vision_tower.", "multi_modal_projector.")


@pytest.fixture
def path_spy(monkeypatch):
    """Counts the calls of the fused LM-head loss and of the loss from materialised logits."""
    calls = {"fused": 0, "materialised": 0}
    fused, materialised = loss_path.fused_linear_fdiv_loss, loss_path._loss_from_logits

    def spy_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def spy_materialised(*args, **kwargs):
        calls["materialised"] += 1
        return materialised(*args, **kwargs)

    monkeypatch.setattr(loss_path, "fused_linear_fdiv_loss", spy_fused)
    monkeypatch.setattr(loss_path, "_loss_from_logits", spy_materialised)
    return calls


def build(make, trainer_cls, config_cls, out, edit_model=None, n=4, **extra):
    model, processor = make()
    if edit_model is not None:
        edit_model(model)
    cfg = config_cls(output_dir=out, per_device_train_batch_size=n, max_steps=1, learning_rate=0.1, optim="sgd",
                     **dict(SFT_COMMON, max_length=None), **extra)
    trainer = trainer_cls(model=model, args=cfg, train_dataset=vision_messages_dataset(n), processing_class=processor)
    return model, trainer


def _has_images(batch):
    assert batch["pixel_values"].numel() > 0


def one_step(model, trainer):
    """(loss, gradients) of the first batch (which carries images), then the parameters after one step."""
    return first_batch_step(model, trainer, check_batch=_has_images)


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_step(stock, ours):
    assert abs(stock[0] - ours[0]) <= 1e-5, (stock[0], ours[0])
    # the images reach the loss: the vision tower has (non-zero) gradients, the same as the stock ones
    vision = [k for k in stock[1] if k.startswith(tuple("model." + v for v in VISION))]
    assert vision and max(float(stock[1][k].abs().max()) for k in vision) > 0
    assert worst(stock[1], ours[1]) <= 1e-5
    assert worst(stock[2], ours[2]) <= 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialised"])
@pytest.mark.parametrize("name", list(MODELS))
def test_kl_reproduces_stock_vlm_sft(name, fused, tmp_path, path_spy):
    make = MODELS[name]
    stock = one_step(*build(make, SFTTrainer, SFTConfig, str(tmp_path / "stock")))
    model, trainer = build(make, FDivSFTTrainer, FDivSFTConfig, str(tmp_path / "fdiv"), divergence="kl",
                           fdiv_fused=fused)
    # the layout allows the fused loss: a backbone (base_model), an output embedding, logits_to_keep
    assert (loss_path.fused_head(model) is not None)
    path_spy.update(fused=0, materialised=0)
    ours = one_step(model, trainer)
    expected = "fused" if fused else "materialised"
    assert path_spy[expected] == 2 and sum(path_spy.values()) == 2, path_spy  # compute_loss + one train step
    assert_same_step(stock, ours)


def test_fused_reads_the_logit_softcap_from_the_text_config(tmp_path, path_spy):
    """A VLM keeps the logit softcap on its text config (PaliGemma, Gemma 3n/4): the fused loss reads it
    there, as TRL's fused LM head does, and reproduces the stock loss (a strong cap: it changes the loss)."""

    def cap(model):
        model.config.text_config.final_logit_softcapping = 0.05

    plain = build(make_llava, SFTTrainer, SFTConfig, str(tmp_path / "plain"))
    plain_loss = float(plain[1].compute_loss(plain[0], dict(next(iter(plain[1].get_train_dataloader())))).detach())
    stock = one_step(*build(make_llava, SFTTrainer, SFTConfig, str(tmp_path / "stock"), edit_model=cap))
    assert abs(stock[0] - plain_loss) > 1e-3  # the cap matters
    model, trainer = build(make_llava, FDivSFTTrainer, FDivSFTConfig, str(tmp_path / "fdiv"), edit_model=cap,
                           divergence="kl")
    assert loss_path.fused_head(model)[2].final_logit_softcapping == 0.05
    path_spy.update(fused=0, materialised=0)
    ours = one_step(model, trainer)
    assert path_spy == {"fused": 2, "materialised": 0}
    assert_same_step(stock, ours)


@pytest.mark.parametrize("name", list(MODELS))
def test_alpha15_vlm_sft_trains_fused(name, tmp_path, path_spy):
    model, processor = MODELS[name]()
    cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=3e-2,
                        divergence="alpha:1.5", lr_scheduler_type="constant", **dict(SFT_COMMON, max_length=None))
    trainer = FDivSFTTrainer(model=model, args=cfg, train_dataset=vision_messages_dataset(4),
                             processing_class=processor)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.85 * losses[0], losses
    assert path_spy["fused"] == 12 and path_spy["materialised"] == 0, path_spy
    assert all(1 <= h["support_size"] <= len(processor.tokenizer) for h in logs)
    assert trainer.fdiv_divergence.name == "alpha:1.5"
