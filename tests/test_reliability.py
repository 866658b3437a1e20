"""Reliability: hostile inputs at trainer level, 2-process training, resume, bf16, huge vocabularies."""

from __future__ import annotations

import os
import sys

import entmax
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, TrainerCallback

from hf_fdiv import (
    FDivDistillationConfig,
    FDivDistillationTrainer,
    FDivSFTConfig,
    FDivSFTTrainer,
    FDivTrainer,
    FDivTrainingArguments,
    f_softargmax,
    fdiv_loss,
)
from hf_fdiv.fused import fused_linear_fdiv_loss
from hf_fdiv.solver import NonFiniteLogitsError

from launch import accelerate_launch, launch
from tiny import COMMON, SFT_COMMON, make_model, make_tokenizer, messages_dataset, text_dataset, tokenized_lm_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def sft(tok, tmp_path, model=None, dataset=None, **cfg):
    kwargs = dict(SFT_COMMON)
    kwargs.update(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3)
    kwargs.update(cfg)
    return FDivSFTTrainer(model=model if model is not None else make_model(tok), args=FDivSFTConfig(output_dir=str(tmp_path), **kwargs),
                          train_dataset=dataset if dataset is not None else text_dataset(8), processing_class=tok)


# --------------------------------------------------------------------------------- hostile inputs


def poisoned_model(tok):
    """NaN activations from the embedding of "x" on: every later position has NaN logits."""
    model = make_model(tok)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids("x")] = float("nan")
    return model


def overflowing_model(tok):
    """Finite activations, but +inf logits at every 5th position (as when logits overflow)."""
    model = make_model(tok)

    def inject(module, args, out):
        out = out.clone()
        out[:, 3::5, 0] = float("inf")
        return out

    model.lm_head.register_forward_hook(inject)
    return model


def x_data():
    return text_dataset(8).map(lambda r, i: {"text": r["text"] + (" x marks" if i % 2 else "")}, with_indices=True)


@pytest.mark.parametrize("fused", [True, False])
def test_nan_logits_stop_with_step_and_count(tok, tmp_path, fused):
    tr = sft(tok, tmp_path, model=poisoned_model(tok), dataset=x_data(), fdiv_fused=fused)
    with pytest.raises(NonFiniteLogitsError, match=r"training step 1: \d+ token row\(s\) have NaN/inf logits.*fdiv_skip_nonfinite"):
        tr.train()


def test_nonfinite_rows_skipped_and_counted_when_asked(tok, tmp_path):
    # (skipping helps when the activations are finite and only logits overflow; NaN activations make
    # every gradient NaN whatever the loss does)
    tr = sft(tok, tmp_path, model=overflowing_model(tok), fdiv_fused=False, per_device_train_batch_size=8, max_steps=2)
    with pytest.raises(NonFiniteLogitsError, match="training step 1"):
        tr.train()
    tr = sft(tok, tmp_path, model=overflowing_model(tok), fdiv_fused=False, fdiv_skip_nonfinite=True,
             per_device_train_batch_size=8, max_steps=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in logs)
    assert logs[-1]["nonfinite_rows"] > logs[0]["nonfinite_rows"] > 0  # a running count
    for name, p in tr.model.named_parameters():
        assert bool(torch.isfinite(p).all()), name


def test_fused_skip_equals_ignoring_those_rows():
    g = torch.Generator().manual_seed(0)
    N, H, V = 40, 8, 50
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    W[7] = 1e308 * torch.sign(torch.randn(H, generator=g, dtype=torch.float64))  # overflows for some rows
    t = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        bad = ~torch.isfinite((h @ W.T).amax(-1))
    assert 0 < int(bad.sum()) < N
    a = [x.clone().requires_grad_() for x in (h, W)]
    loss, stats = fused_linear_fdiv_loss(a[0], a[1], t, "alpha:1.5", skip_nonfinite=True, return_stats=True)
    loss.backward()
    assert torch.equal(stats.skipped, bad)
    assert torch.equal(stats.solved, ~bad)
    b = [x.clone().requires_grad_() for x in (h, W)]
    want = fused_linear_fdiv_loss(b[0], b[1], t.masked_fill(bad, -100), "alpha:1.5")
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    torch.testing.assert_close(a[0].grad, b[0].grad)
    torch.testing.assert_close(a[1].grad, b[1].grad)
    with pytest.raises(NonFiniteLogitsError):
        fused_linear_fdiv_loss(h, W, t, "alpha:1.5")


def test_labels_out_of_range_name_the_step(tok, tmp_path):
    class BadLabels(DataCollatorForLanguageModeling):
        def __call__(self, features, return_tensors=None):
            batch = super().__call__(features, return_tensors)
            batch["labels"][0, 3] = len(tok) + 5
            return batch

    tr = FDivTrainer(model=make_model(tok), args=FDivTrainingArguments(str(tmp_path), max_steps=1, **COMMON),
                     train_dataset=tokenized_lm_dataset(tok, 4), data_collator=BadLabels(tok, mlm=False))
    with pytest.raises(ValueError, match=rf"training step 1: target id {len(tok) + 5} is out of range for V={len(tok)}"):
        tr.train()


@pytest.mark.parametrize("mode", ["target", "reference"])
def test_distillation_labels_out_of_range_name_the_step(tok, tmp_path, mode):
    tr = FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1),
                                 args=FDivDistillationConfig(output_dir=str(tmp_path), max_steps=1, teacher_mode=mode,
                                                             **SFT_COMMON),
                                 train_dataset=messages_dataset(4), processing_class=tok)
    collate = tr.data_collator

    def bad_labels(features):
        batch = collate(features)
        batch["labels"][0, 3] = len(tok) + 5
        return batch

    tr.data_collator = bad_labels
    with pytest.raises(ValueError, match=rf"training step 1: target id {len(tok) + 5} is out of range for V={len(tok)}"):
        tr.train()


@pytest.mark.parametrize("fused", [True, False])
def test_batch_without_target_tokens(tok, tmp_path, fused):
    class NoTargets(DataCollatorForLanguageModeling):
        def __call__(self, features, return_tensors=None):
            batch = super().__call__(features, return_tensors)
            batch["labels"][:] = -100
            return batch

    model = make_model(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = FDivTrainer(model=model, args=FDivTrainingArguments(str(tmp_path), max_steps=1, fdiv_fused=fused, **COMMON),
                     train_dataset=tokenized_lm_dataset(tok, 4), data_collator=NoTargets(tok, mlm=False))
    tr.train()
    loss = [h for h in tr.state.log_history if "loss" in h][-1]["loss"]
    assert loss == 0.0
    for n, p in model.named_parameters():
        assert bool(torch.isfinite(p).all())
        torch.testing.assert_close(p.detach(), before[n])  # zero gradient, no update (no weight decay)


def test_reference_of_wrong_length_and_bad_config(tok, tmp_path):
    with pytest.raises(ValueError, match=r"reference tensor has shape \(107,\) but the model has V=106"):
        FDivTrainer(model=make_model(tok), args=FDivTrainingArguments(str(tmp_path), **COMMON),
                    train_dataset=tokenized_lm_dataset(tok, 4), reference=torch.ones(len(tok) + 1),
                    data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    for bad, msg in [("alpha:abc", "could not read alpha"), ("alpha:-2", "alpha > 0"), ("entmax", "unknown divergence")]:
        with pytest.raises(ValueError, match=msg):
            FDivSFTConfig(output_dir=str(tmp_path), divergence=bad, **SFT_COMMON)


def test_mismatched_teacher_vocabulary(tok, tmp_path):
    with pytest.raises(ValueError, match="vocabularies differ"):
        FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, vocab_size=90),
                                args=FDivDistillationConfig(output_dir=str(tmp_path), **SFT_COMMON),
                                train_dataset=messages_dataset(4), processing_class=tok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA) next to the CPU")
def test_teacher_on_another_device(tok, tmp_path):
    teacher = make_model(tok, hidden=32, seed=1).cuda()
    tr = FDivDistillationTrainer(model=make_model(tok), teacher_model=teacher,
                                 args=FDivDistillationConfig(output_dir=str(tmp_path), max_steps=1, **SFT_COMMON),
                                 train_dataset=messages_dataset(4), processing_class=tok)
    tr.train()


def test_teacher_inputs_follow_the_teacher(tok, tmp_path):
    # CPU-only stand-in for "teacher on another device": the teacher provider moves the batch to the
    # teacher's device and its log-probabilities back to the student's (fp64 teacher here).
    from hf_fdiv.trainers.teacher import TeacherLogProbs

    teacher = make_model(tok, hidden=32, seed=1).double()
    ids = torch.randint(6, len(tok), (2, 7))
    lp = TeacherLogProbs(teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, len(tok), 1.0,
                         out_device=torch.device("cpu"))
    got = lp(torch.arange(14))
    want = torch.log_softmax(teacher(input_ids=ids).logits.reshape(14, -1).float(), -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("which", ["sft", pytest.param("distill", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_on_the_doubled_batch(tmp_path, which):
    # a 1-step tiny run takes ~20 s on 2 loaded cores: 120 s, then every rank's stacks and all killed
    two_processes = launch(accelerate_launch("cpu_2proc.yaml", WORKER, tmp_path, which, 4), timeout=120)
    assert two_processes.returncode == 0, two_processes.report()
    single = launch([sys.executable, WORKER, tmp_path, which, 8], timeout=120)
    assert single.returncode == 0, single.report()
    two = torch.load(tmp_path / "params-2.pt")
    one = torch.load(tmp_path / "params-1.pt")
    init = make_model(make_tokenizer()).state_dict()
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # the step moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- resume


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_equals_uninterrupted(tok, tmp_path):
    def trainer(out, callbacks=()):
        kwargs = dict(SFT_COMMON)
        kwargs.update(per_device_train_batch_size=2, max_steps=4, learning_rate=5e-3, save_strategy="steps",
                      save_steps=2, optim="adamw_torch", divergence="alpha:1.5")
        tr = FDivSFTTrainer(model=make_model(tok), args=FDivSFTConfig(output_dir=str(out), **kwargs),
                            train_dataset=text_dataset(8), processing_class=tok, callbacks=list(callbacks))
        return tr

    full = trainer(tmp_path / "full")
    full.train()
    interrupted = trainer(tmp_path / "cut", [StopAt(2)])
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- low precision


def test_bf16_autocast_run_trains_with_fp32_solve(tok, tmp_path, monkeypatch):
    import hf_fdiv.fused as fused_mod

    seen = []
    original = fused_mod.solve_rows

    def spy(z, *args, **kwargs):
        seen.append(z.dtype)
        return original(z, *args, **kwargs)

    monkeypatch.setattr(fused_mod, "solve_rows", spy)
    tr = sft(tok, tmp_path, bf16=True, max_steps=6, learning_rate=3e-3, per_device_train_batch_size=8)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert seen and set(seen) == {torch.float32}
    # bf16 logits through the materialised path are solved in fp32 too
    x = torch.randn(4, 106).to(torch.bfloat16)
    t = torch.randint(0, 106, (4,))
    assert fdiv_loss(x, t).dtype == torch.float32
    assert abs(float(fdiv_loss(x, t)) - float(fdiv_loss(x.float(), t))) <= 1e-6


# --------------------------------------------------------------------------------- large vocabularies


def test_vocabulary_of_262144():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 262144, generator=g, dtype=torch.float64) * 3
    torch.testing.assert_close(f_softargmax(x, "alpha:1.5"), entmax.entmax15(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(f_softargmax(x.float(), "kl"), torch.softmax(x.float(), -1), atol=1e-6, rtol=0)
    t = torch.randint(0, 262144, (3,), generator=g)
    torch.testing.assert_close(fdiv_loss(x, t, "alpha:1.5", reduction="none"),
                               entmax.Entmax15Loss(k=None, reduction="none")(x, t), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_tokens_times_vocab_beyond_2_pow_31_fused():
    # 8192 tokens x 262144 classes = 2^31 logits, never materialised; spot-check rows against the
    # materialised loss of those rows (any int32 offset overflow would scramble far rows).
    g = torch.Generator().manual_seed(0)
    N, V, H = 8192, 262144, 4
    assert N * V >= 2**31
    h = torch.randn(N, H, generator=g) * 2
    W = torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    total, stats = fused_linear_fdiv_loss(h, W, t, "alpha:1.5", return_stats=True)
    assert int(stats.solved.sum()) == N
    picks = torch.tensor([0, 1, 4095, 8190, 8191])
    rows = fdiv_loss(h[picks] @ W.T, t[picks], "alpha:1.5", reduction="none")
    mask = torch.zeros(N, dtype=torch.long) - 100
    mask[picks] = t[picks]
    partial = fused_linear_fdiv_loss(h, W, mask, "alpha:1.5")
    assert abs(float(partial) - float(rows.sum())) <= 1e-4 * float(rows.sum())
    assert torch.isfinite(total) and float(total) > float(partial)
