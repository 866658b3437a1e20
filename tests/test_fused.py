"""Fused LM-head loss equals the materialised path (unit level and inside the trainers)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Gemma2Config, Gemma2ForCausalLM

from hf_fdiv import FDivDistillationConfig, FDivDistillationTrainer, FDivSFTConfig, FDivSFTTrainer, fdiv_loss
from hf_fdiv.fused import LogitTransform, fused_linear_fdiv_loss
from hf_fdiv.solver import RowProvider

from tiny import SFT_COMMON, loss_and_grads, make_model, messages_dataset, text_dataset


def materialised(h, W, b, t, name, transform, reference="unit"):
    z = h @ W.T + (b if b is not None else 0)
    z = z * transform.scale
    if transform.softcap:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    return fdiv_loss(z, t, name, reference, reduction="sum")


@pytest.mark.parametrize("name", ["alpha:1.5", "kl", "js", "alpha:2", "alpha:1.25", "reverse_kl"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=4.0)])
@pytest.mark.parametrize("ignore", [False, True])
def test_fused_equals_materialised(name, transform, ignore):
    g = torch.Generator().manual_seed(0)
    N, H, V = 90, 12, 300
    h = torch.randn(N, H, generator=g, dtype=torch.float64) * 2
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[::4] = -100
    ref = [x.clone().requires_grad_() for x in (h, W, b)]
    got = [x.clone().requires_grad_() for x in (h, W, b)]
    want = materialised(*ref, t, name, transform)
    want.backward()
    loss = fused_linear_fdiv_loss(got[0], got[1], t, name, bias=got[2], transform=transform, chunk_elements=16 * V)
    loss.backward()
    assert abs(float(loss) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
    for a, c in zip(ref, got):
        torch.testing.assert_close(c.grad, a.grad, atol=1e-10, rtol=1e-8)


def test_fused_fp32_and_references():
    g = torch.Generator().manual_seed(1)
    N, H, V = 64, 16, 500
    h, W = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    prior = torch.rand(V, generator=g) + 0.05
    for reference in ["uniform", prior]:
        a = [x.clone().requires_grad_() for x in (h, W)]
        c = [x.clone().requires_grad_() for x in (h, W)]
        want = materialised(a[0], a[1], None, t, "alpha:1.5", LogitTransform(), reference)
        want.backward()
        got = fused_linear_fdiv_loss(c[0], c[1], t, "alpha:1.5", reference)
        got.backward()
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
        torch.testing.assert_close(c[0].grad, a[0].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c[1].grad, a[1].grad, atol=1e-5, rtol=1e-4)
    # per-token references and soft targets through RowProviders
    q = torch.rand(N, V, generator=g) + 0.01
    y = torch.softmax(torch.randn(N, V, generator=g), -1)
    rows = torch.arange(N)
    for target, reference in [(t, RowProvider(lambda r: q[r])), (RowProvider(lambda r: y[r]), "unit")]:
        a = [x.clone().requires_grad_() for x in (h, W)]
        c = [x.clone().requires_grad_() for x in (h, W)]
        dense_t = t if isinstance(target, torch.Tensor) else y
        dense_q = q if isinstance(reference, RowProvider) else reference
        want = fdiv_loss(a[0] @ a[1].T, dense_t, "js", dense_q, reduction="sum")
        want.backward()
        got = fused_linear_fdiv_loss(c[0], c[1], target, "js", reference, rows=rows)
        got.backward()
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
        torch.testing.assert_close(c[0].grad, a[0].grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------- trainers


def compare_paths(make_trainer):
    fused, plain = make_trainer(True), make_trainer(False)
    assert fused._fdiv_fused_parts(fused.model) is not None
    assert plain._fdiv_fused_parts(plain.model) is None
    batch = next(iter(fused.get_train_dataloader()))
    lf, gf = loss_and_grads(fused, batch)
    lp, gp = loss_and_grads(plain, batch)
    assert abs(lf - lp) <= 1e-5 * max(1.0, abs(lp))
    assert gf.keys() == gp.keys()
    for k in gp:
        torch.testing.assert_close(gf[k], gp[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["alpha:1.5", "kl", "js"])
def test_sft_trainer_fused_equals_materialised(tok, tmp_path, name):
    def make(fused):
        cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, divergence=name, fdiv_fused=fused,
                            **SFT_COMMON)
        return FDivSFTTrainer(model=make_model(tok), args=cfg, train_dataset=messages_dataset(8), processing_class=tok)

    compare_paths(make)


@pytest.mark.parametrize("mode", ["target", "reference"])
def test_distillation_fused_equals_materialised(tok, tmp_path, mode):
    def make(fused):
        cfg = FDivDistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, teacher_mode=mode,
                                     fdiv_fused=fused, temperature=1.5, **SFT_COMMON)
        return FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1), args=cfg,
                                       train_dataset=messages_dataset(8), processing_class=tok)

    compare_paths(make)


def test_softcapped_tied_model_fused_equals_materialised(tok, tmp_path):
    def model():
        torch.manual_seed(0)
        return Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=128, final_logit_softcapping=3.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        ))

    def make(fused):
        cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, fdiv_fused=fused, **SFT_COMMON)
        return FDivSFTTrainer(model=model(), args=cfg, train_dataset=text_dataset(8), processing_class=tok)

    compare_paths(make)


def test_adapted_lm_head_is_refused_clearly(tok, tmp_path):
    # (TRL's SFTTrainer already refuses LoRA on lm_head; a PeftModel given to FDivTrainer reaches us)
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling

    from hf_fdiv import FDivTrainer, FDivTrainingArguments
    from tiny import COMMON, tokenized_lm_dataset

    def trainer(fused):
        lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
        args = FDivTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                     fdiv_fused=fused, **COMMON)
        return FDivTrainer(model=get_peft_model(make_model(tok), lora), args=args,
                           train_dataset=tokenized_lm_dataset(tok, 4),
                           data_collator=DataCollatorForLanguageModeling(tok, mlm=False))

    with pytest.raises(ValueError, match="lm_head is adapted.*fdiv_fused=False"):
        trainer(True).train()
    trainer(False).train()
