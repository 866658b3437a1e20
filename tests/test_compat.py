"""Whatever works with the stock trainers works with ours (issue 15): MoE router loss and prompt-learning
PEFT adapters, with the stock SFTTrainer as the oracle (divergence="kl" is cross-entropy)."""

from __future__ import annotations

import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_fdiv import (
    FDivDistillationConfig,
    FDivDistillationTrainer,
    FDivSFTConfig,
    FDivSFTTrainer,
    FDivTrainer,
    FDivTrainingArguments,
)
from tiny import COMMON, SFT_COMMON, first_batch_step, make_model, text_dataset, tokenized_lm_dataset


def _assert_same(a, b, tol=1e-5):
    assert abs(a[0] - b[0]) <= tol * max(1.0, abs(b[0])), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for part in (1, 2):
        for name in b[part]:
            torch.testing.assert_close(a[part][name], b[part][name], atol=tol, rtol=0, msg=name)


def _moe_model(tok, seed=0, **router):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    router = {"output_router_logits": True, "router_aux_loss_coef": 0.5, **router}
    config = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, **router,
    )
    return Qwen3MoeForCausalLM(config)


@pytest.mark.parametrize("fused", [True, False])
def test_moe_router_loss_equals_stock_sft(tok, tmp_path, fused):
    def run(trainer_cls, config_cls, name, **extra):
        model = _moe_model(tok)
        args = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                          learning_rate=0.1, optim="sgd", **SFT_COMMON, **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=text_dataset(8), processing_class=tok)
        return first_batch_step(model, trainer), trainer

    stock, _ = run(SFTTrainer, SFTConfig, "stock")
    ours, trainer = run(FDivSFTTrainer, FDivSFTConfig, "fdiv", divergence="kl", fdiv_fused=fused)
    _assert_same(ours, stock)
    # the router weights get the load-balancing gradient (it is what trains them), and it is logged
    assert any("mlp.gate" in n for n in ours[1])
    logged = [h for h in trainer.state.log_history if "aux_loss" in h]
    assert logged and logged[0]["aux_loss"] > 0


@pytest.mark.parametrize("router", [
    {},  # the model's forward adds the load-balancing loss to its loss
    {"output_router_logits": False},  # router logits off: no aux loss, whatever the coefficient
    {"router_aux_loss_coef": 0.0},  # a zero coefficient: nothing to add
])
def test_moe_router_loss_equals_stock_trainer(tok, tmp_path, router):
    """Without TRL's settings the model config decides; the stock Trainer's loss is the model's own."""
    def run(trainer_cls, args_cls, name, **extra):
        model = _moe_model(tok, **router)
        args = args_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                        learning_rate=0.1, optim="sgd", **COMMON, **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=tokenized_lm_dataset(tok, 8),
                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        return first_batch_step(model, trainer)

    stock = run(Trainer, TrainingArguments, "stock")
    ours = run(FDivTrainer, FDivTrainingArguments, "fdiv", divergence="kl")
    _assert_same(ours, stock)


def test_moe_router_loss_is_averaged_over_accumulation_steps(tok, tmp_path):
    """With gradient accumulation the Trainer leaves the averaging to a loss that gets num_items_in_batch:
    each micro-batch adds CE_sum / num_items + coef * aux / GA, so that GA steps sum to the batch's mean
    aux loss. Oracle: the model's own aux_loss and F.cross_entropy on a copy of the initial model."""
    class Recording(FDivTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch, float(loss)))
            return loss

    args = FDivTrainingArguments(output_dir=str(tmp_path), divergence="kl", per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=1, learning_rate=0.1, optim="sgd", **COMMON)
    trainer = Recording(model=_moe_model(tok), args=args, train_dataset=tokenized_lm_dataset(tok, 8),
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen) == 2
    oracle = _moe_model(tok)  # the parameters both micro-batches saw
    for batch, num_items, got in trainer.seen:
        with torch.no_grad():
            out = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
            ce_sum = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        expected = float(ce_sum / num_items + 0.5 * out.aux_loss / 2)
        assert abs(got - expected) <= 1e-5, (got, expected)


PEFT_CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
}


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("fused", [True, False])
def test_prompt_learning_adapters_equal_stock_sft(tok, tmp_path, kind, fused):
    def run(trainer_cls, config_cls, name, **extra):
        torch.manual_seed(0)
        model = get_peft_model(make_model(tok), PEFT_CONFIGS[kind]())
        args = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                          learning_rate=0.1, optim="sgd", **SFT_COMMON, **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=text_dataset(8), processing_class=tok)
        return first_batch_step(model, trainer)

    stock = run(SFTTrainer, SFTConfig, "stock")
    ours = run(FDivSFTTrainer, FDivSFTConfig, "fdiv", divergence="kl", fdiv_fused=fused)
    _assert_same(ours, stock)
    alpha = run(FDivSFTTrainer, FDivSFTConfig, "alpha", divergence="alpha:1.5", fdiv_fused=fused)
    assert torch.isfinite(torch.tensor(alpha[0])) and alpha[1]  # trains the prompt


def test_prompt_learning_is_refused_for_distillation(tok, tmp_path):
    student = get_peft_model(make_model(tok), PEFT_CONFIGS["prompt_tuning"]())
    args = FDivDistillationConfig(output_dir=str(tmp_path / "d"), max_steps=1, **SFT_COMMON)
    with pytest.raises(ValueError, match="prompt-learning adapters .* Use a weight-based adapter such as LoRA"):
        FDivDistillationTrainer(model=student, teacher_model=make_model(tok, hidden=32, seed=1), args=args,
                                train_dataset=text_dataset(8), processing_class=tok)
