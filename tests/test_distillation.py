"""FDivDistillationTrainer on tiny in-code teacher/student pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel

from hf_fdiv import (
    FDivDistillationConfig,
    FDivDistillationTrainer,
    FDivSFTConfig,
    FDivSFTTrainer,
    add_teacher_topk,
    f_softargmax,
    fdiv_loss,
)

from tiny import SFT_COMMON, docstring_lines, make_model, messages_dataset, text_dataset


def distiller(tok, tmp_path, teacher=None, student=None, dataset=None, **cfg):
    kwargs = dict(SFT_COMMON)
    kwargs.update(per_device_train_batch_size=8, max_steps=1, learning_rate=0.1, optim="sgd")
    kwargs.update(cfg)
    args = FDivDistillationConfig(output_dir=str(tmp_path), **kwargs)
    return FDivDistillationTrainer(
        model=student if student is not None else make_model(tok),
        teacher_model=teacher if teacher is not None else make_model(tok, hidden=32, seed=1),
        args=args, train_dataset=dataset if dataset is not None else messages_dataset(8), processing_class=tok,
    )


def batch_of(trainer):
    return dict(next(iter(trainer.get_train_dataloader())))


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------- exact losses


def test_kl_target_mode_is_forward_kl_teacher_student(tok, tmp_path):
    tr = distiller(tok, tmp_path, divergence="kl", teacher_mode="target", temperature=1.0)
    batch = batch_of(tr)
    student, teacher = tr.model, tr.teacher_model
    loss = tr.compute_loss(student, dict(batch))
    loss.backward()
    got = grads_of(student)
    student.zero_grad()
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    valid = batch["labels"][:, 1:] != -100
    pt = torch.softmax(t, -1)
    kl = (pt * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    want = kl[valid].sum() / valid.sum()
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) <= 1e-5
    ref = grads_of(student)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-6


def test_kl_reference_mode_is_cross_entropy_on_shifted_logits(tok, tmp_path):
    tr = distiller(tok, tmp_path, divergence="kl", teacher_mode="reference", reference_floor=0.0)
    batch = batch_of(tr)
    student, teacher = tr.model, tr.teacher_model
    with torch.no_grad():
        loss = tr.compute_loss(student, dict(batch))
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    want = F.cross_entropy((s + torch.log_softmax(t, -1)).flatten(0, 1), labels.flatten())
    assert abs(float(loss) - float(want)) <= 1e-5


@pytest.mark.parametrize("mode", ["target", "reference"])
def test_temperature_and_label_weight(tok, tmp_path, mode):
    extra = {"label_weight": 0.3} if mode == "target" else {"reference_mix": 0.1, "reference_floor": 1e-6}
    tr = distiller(tok, tmp_path, teacher_mode=mode, temperature=2.0, divergence="alpha:1.5", **extra)
    batch = batch_of(tr)
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, dict(batch))
        s = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = tr.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    pt = torch.softmax(t / 2.0, -1)[valid]
    V = s.shape[-1]
    if mode == "target":
        y = 0.7 * pt + 0.3 * F.one_hot(labels[valid], V).float()
        want = fdiv_loss(s[valid], y, "alpha:1.5", reduction="sum") / valid.sum()
    else:
        q = (0.9 * pt + 0.1 / V).clamp(min=1e-6)
        want = fdiv_loss(s[valid], labels[valid], "alpha:1.5", q, reduction="sum") / valid.sum()
    assert abs(float(loss) - float(want)) <= 1e-5


# --------------------------------------------------------------------------------- GA exactness


@pytest.mark.parametrize("mode", ["target", "reference"])
def test_batch_size_times_accumulation_invariance(tok, tmp_path, mode):
    out = []
    for bs, ga in [(8, 1), (4, 2), (2, 4)]:
        tr = distiller(tok, tmp_path / f"{bs}", teacher_mode=mode, per_device_train_batch_size=bs,
                       gradient_accumulation_steps=ga, learning_rate=0.5)
        tr.train()
        out.append({n: p.detach().clone() for n, p in tr.model.named_parameters()})
    for other in out[1:]:
        assert max(float((out[0][k] - other[k]).abs().max()) for k in other) <= 1e-6


# --------------------------------------------------------------------------------- it learns


@pytest.fixture(scope="module")
def trained_teacher(tok, tmp_path_factory):
    """A teacher trained a little on real English (standard-library docstrings)."""
    lines = docstring_lines()
    train, held_out = lines[:-96], lines[-96:]
    cfg = FDivSFTConfig(output_dir=str(tmp_path_factory.mktemp("teacher")), divergence="kl",
                        per_device_train_batch_size=16, max_steps=120, learning_rate=5e-3, **SFT_COMMON)
    tr = FDivSFTTrainer(model=make_model(tok, hidden=64, seed=3), args=cfg, train_dataset=Dataset.from_dict({"text": train}),
                        processing_class=tok)
    tr.train()
    teacher = tr.model.eval()
    return teacher, train, held_out


def held_out_batch(tok, lines):
    enc = tok(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def logits_pair(student, teacher, ids, mask):
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return s, t


@pytest.mark.slow
def test_target_mode_student_gets_closer_to_teacher(tok, tmp_path, trained_teacher):
    teacher, train, held_out = trained_teacher
    ids, mask, labels = held_out_batch(tok, held_out)
    valid = labels[:, 1:] != -100

    def measure(student):
        s, t = logits_pair(student, teacher, ids, mask)
        agree = float((s.argmax(-1) == t.argmax(-1))[valid].float().mean())
        div = float(fdiv_loss(s[valid], torch.softmax(t[valid], -1), "alpha:1.5"))
        return agree, div

    student = make_model(tok, hidden=32, seed=7)
    before = measure(student)
    tr = distiller(tok, tmp_path, teacher=teacher, student=student, dataset=Dataset.from_dict({"text": train}),
                   teacher_mode="target", divergence="alpha:1.5", per_device_train_batch_size=16, max_steps=40,
                   learning_rate=5e-3, optim="adamw_torch")
    tr.train()
    after = measure(tr.model.eval())
    assert after[0] > before[0] + 0.15, (before, after)  # top-1 agreement with the teacher up
    assert after[1] < 0.6 * before[1], (before, after)  # divergence to the teacher down


@pytest.mark.slow
def test_reference_mode_combined_predictor_beats_teacher(tok, tmp_path, trained_teacher):
    teacher, train, held_out = trained_teacher
    ids, mask, labels = held_out_batch(tok, held_out)
    target = labels[:, 1:]
    valid = target != -100

    def fit(s, q):
        p = f_softargmax(s[valid], "alpha:1.5", q)
        acc = float((p.argmax(-1) == target[valid]).float().mean())
        return float(fdiv_loss(s[valid], target[valid], "alpha:1.5", q)), acc

    student = make_model(tok, hidden=32, seed=7)
    tr = distiller(tok, tmp_path, teacher=teacher, student=student, dataset=Dataset.from_dict({"text": train}),
                   teacher_mode="reference", divergence="alpha:1.5", per_device_train_batch_size=16, max_steps=80,
                   learning_rate=1e-2, optim="adamw_torch")
    tr.train()
    s, t = logits_pair(tr.model.eval(), teacher, ids, mask)
    q = torch.softmax(t[valid], -1).clamp(min=1e-12)
    combined = fit(s, q)
    teacher_alone = fit(torch.zeros_like(s), q)  # f-softargmax(0; q) = q: the teacher's own prediction
    assert combined[0] < teacher_alone[0] - 0.08, (combined, teacher_alone)
    assert combined[1] >= teacher_alone[1], (combined, teacher_alone)


# --------------------------------------------------------------------------------- LoRA, vocab, offline


def test_lora_student(tok, tmp_path):
    kwargs = dict(SFT_COMMON)
    kwargs.update(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2)
    args = FDivDistillationConfig(output_dir=str(tmp_path), **kwargs)
    tr = FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1), args=args,
                                 train_dataset=messages_dataset(8), processing_class=tok,
                                 peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert isinstance(tr.model, PeftModel)
    tr.train()
    tr.save_model()
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert ModelCard.load(str(tmp_path / "README.md")).data.library_name == "peft"


def test_vocabulary_padding_rows_ok_and_mismatch_is_a_clear_error(tok, tmp_path):
    V = len(tok)
    tr = distiller(tok, tmp_path, teacher=make_model(tok, hidden=32, seed=1, vocab_size=V + 22),
                   student=make_model(tok, vocab_size=V + 10))
    assert tr.num_classes == V + 10
    tr.train()
    with pytest.raises(ValueError, match=r"vocabularies differ \(106 vs 100 output rows\).*106 tokens"):
        distiller(tok, tmp_path, teacher=make_model(tok, hidden=32, seed=1, vocab_size=V - 6))


def test_offline_topk_equals_online_at_full_k_and_trains_with_small_k(tok, tmp_path):
    teacher = make_model(tok, hidden=32, seed=1)
    online = distiller(tok, tmp_path / "online", teacher=teacher, divergence="alpha:1.5")
    with torch.no_grad():
        want = online.compute_loss(online.model, batch_of(online))
    full = add_teacher_topk(online.train_dataset, teacher, k=len(tok), pad_token_id=tok.pad_token_id)
    kwargs = dict(SFT_COMMON)
    kwargs.update(per_device_train_batch_size=8, max_steps=1, divergence="alpha:1.5")
    offline = FDivDistillationTrainer(model=make_model(tok), args=FDivDistillationConfig(output_dir=str(tmp_path / "off"), **kwargs),
                                      train_dataset=full, processing_class=tok)
    assert offline.teacher_model is None
    with torch.no_grad():
        got = offline.compute_loss(offline.model, batch_of(offline))
    assert abs(float(got) - float(want)) <= 1e-5

    small = add_teacher_topk(online.train_dataset, teacher, k=8, pad_token_id=tok.pad_token_id)
    kwargs.update(max_steps=15, learning_rate=1e-2, per_device_train_batch_size=4)
    tr = FDivDistillationTrainer(model=make_model(tok), args=FDivDistillationConfig(output_dir=str(tmp_path / "k8"), **kwargs),
                                 train_dataset=small, processing_class=tok)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])


# --------------------------------------------------------------------------------- on-policy, card, config


def test_on_policy_generation_recounts_tokens(tok, tmp_path):
    tr = distiller(tok, tmp_path, lmbda=1.0, max_new_tokens=6, per_device_train_batch_size=4, max_steps=2)
    original = batch_of(tr)
    samples, n = tr.get_batch_samples(iter(tr.get_train_dataloader()), 2, tr.args.device)
    assert len(samples) == 2
    count = sum(int((b["labels"][..., 1:] != -100).sum()) for b in samples)
    assert int(n) == count
    first = samples[0]
    assert not torch.equal(first["labels"], original["labels"])  # completions were regenerated
    for row_ids, row_labels in zip(first["input_ids"], first["labels"]):
        targets = (row_labels != -100).nonzero().flatten()
        assert 1 <= len(targets) <= 6
    tr.train()
    assert tr.state.global_step == 2


def test_card_names_teacher_mode_temperature(tok, tmp_path):
    teacher = make_model(tok, hidden=32, seed=1)
    teacher.config._name_or_path = "acme/tiny-teacher"
    tr = distiller(tok, tmp_path, teacher=teacher, teacher_mode="reference", temperature=2.0, divergence="js")
    tr.train()
    tr.save_model()
    card = ModelCard.load(str(tmp_path / "README.md"))
    for text in ("acme/tiny-teacher", "`reference`", "temperature T | 2.0", "`js`", "learns a correction to the teacher",
                 "teacher's probabilities at T = 2"):
        assert text in card.text, text


def test_config_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="teacher_mode"):
        FDivDistillationConfig(output_dir=str(tmp_path), teacher_mode="both", **SFT_COMMON)
    with pytest.raises(ValueError, match="label_weight"):
        FDivDistillationConfig(output_dir=str(tmp_path), teacher_mode="reference", label_weight=0.5, **SFT_COMMON)
    with pytest.raises(ValueError, match="needs a teacher"):
        FDivDistillationTrainer(model=make_model(tok), args=FDivDistillationConfig(output_dir=str(tmp_path), **SFT_COMMON),
                                train_dataset=text_dataset(4), processing_class=tok)


def test_teacher_from_path_with_init_kwargs(tok, tmp_path):
    teacher = make_model(tok, hidden=32, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    kwargs = dict(SFT_COMMON)
    kwargs.update(per_device_train_batch_size=4, max_steps=1, teacher_model_name_or_path=str(tmp_path / "teacher"),
                  teacher_model_init_kwargs={"dtype": "float32"})
    tr = FDivDistillationTrainer(model=make_model(tok), args=FDivDistillationConfig(output_dir=str(tmp_path / "s"), **kwargs),
                                 train_dataset=messages_dataset(4), processing_class=tok)
    assert not tr.teacher_model.training
    assert all(not p.requires_grad for p in tr.teacher_model.parameters())
    assert torch.equal(tr.teacher_model.lm_head.weight, teacher.lm_head.weight)
    tr.train()


def test_stored_topk_from_another_vocabulary_is_refused():
    from hf_fdiv.trainers.teacher import TopKLogProbs

    ids = torch.tensor([[[0, 5], [1, 9]]])
    lp = torch.log(torch.tensor([[[0.6, 0.3], [0.5, 0.4]]]))
    with pytest.raises(ValueError, match="ids reach 9 but the student has 8 classes"):
        TopKLogProbs(ids, lp, num_classes=8, temperature=1.0)
    with pytest.raises(ValueError, match="ids reach 9 but the student has 9 classes"):  # id == V: one past the end
        TopKLogProbs(ids, lp, num_classes=9, temperature=1.0)
    full = TopKLogProbs(ids, lp, num_classes=10, temperature=1.0)(torch.tensor([0, 1]))
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2))
    assert abs(float(full[0, 5].exp()) - 0.3) < 1e-6


def test_on_policy_mixing_rate_follows_lmbda(tok, tmp_path, monkeypatch):
    """A step's batches are regenerated by the student with probability lmbda (the seeded policy RNG):
    never at 0, always at 1, on some steps but not all at 0.5 (counted over 40 steps)."""
    counts = {}
    for lmbda in [0.0, 0.5, 1.0]:
        tr = distiller(tok, tmp_path / str(lmbda), lmbda=lmbda, max_new_tokens=2)
        calls = []
        monkeypatch.setattr(tr, "_generate_on_policy", lambda b, calls=calls: calls.append(1) or b)
        for _ in range(40):
            tr.get_batch_samples(iter(tr.get_train_dataloader()), 1, tr.args.device)
        counts[lmbda] = len(calls)
    assert counts[0.0] == 0 and counts[1.0] == 40 and 5 <= counts[0.5] <= 35, counts


def test_on_policy_prompts_are_left_padded_with_their_mask(tok, tmp_path, monkeypatch):
    """The prompts handed to ``generate``: left-padded with the tokenizer's pad id (not EOS), the attention
    mask 1 exactly on each prompt's tokens (the positions before its first target)."""
    tr = distiller(tok, tmp_path, lmbda=1.0, max_new_tokens=2, per_device_train_batch_size=4)
    batch = batch_of(tr)
    batch["labels"] = batch["input_ids"].clone()
    for i, prompt_len in enumerate([3, 7, 5, 10]):  # prompts of different lengths: padding shows
        batch["labels"][i, :prompt_len] = -100
    model = tr.accelerator.unwrap_model(tr.model)
    seen = {}
    original = model.generate

    def spy(**kw):
        seen.update(kw)
        return original(**kw)

    monkeypatch.setattr(model, "generate", spy)
    tr._generate_on_policy(batch)
    ids, mask = seen["input_ids"].cpu(), seen["attention_mask"].cpu()
    assert seen["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    for i in range(ids.shape[0]):
        first_target = int((batch["labels"][i] != -100).nonzero()[0])
        n = mask[i].sum()
        assert n == first_target and bool((mask[i, -n:] == 1).all()) and bool((mask[i, : ids.shape[1] - n] == 0).all())
        torch.testing.assert_close(ids[i, -n:], batch["input_ids"][i, :first_target])
        assert bool((ids[i, : ids.shape[1] - n] == tok.pad_token_id).all())


def test_teacher_log_probs_from_the_model_and_from_hidden_states(tok):
    """TeacherLogProbs (the backbone once, the head per chunk of rows) and TeacherLogProbs.from_hidden
    (hidden states given, a head with a bias, [B, T, H] rows) equal log_softmax(head(h) / T) of the
    materialised teacher, on any rows."""
    from hf_fdiv.trainers.teacher import TeacherLogProbs

    teacher = make_model(tok, hidden=32, seed=1).eval()
    ids = torch.randint(2, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    V = teacher.get_output_embeddings().weight.shape[0]
    rows = torch.tensor([0, 3, 7, 11])
    with torch.no_grad():
        logits = teacher(**inputs).logits.reshape(-1, V)
        hidden = teacher.base_model(**inputs).last_hidden_state
    want = torch.log_softmax(logits[rows] / 2.0, -1)
    torch.testing.assert_close(TeacherLogProbs(teacher, inputs, V, 2.0)(rows), want, atol=1e-5, rtol=1e-5)

    class WholeOnly(torch.nn.Module):  # no separate backbone (base_model is itself): one full forward
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        @property
        def base_model(self):
            return self

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            return self.inner(**kw)

    torch.testing.assert_close(TeacherLogProbs(WholeOnly(teacher), inputs, V, 2.0)(rows), want, atol=1e-5, rtol=1e-5)
    head = torch.nn.Linear(32, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(teacher.get_output_embeddings().weight)
        head.bias.normal_(generator=torch.Generator().manual_seed(1))
        want = torch.log_softmax((hidden.reshape(-1, 32)[rows] @ head.weight.T + head.bias) / 2.0, -1)
    got = TeacherLogProbs.from_hidden(hidden, head, teacher.config, V, 2.0)(rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_trainer_args_teacher_loading_and_vocabularies(tok, tmp_path):
    """The distillation trainer refuses a config of another class; a teacher loaded by path takes its
    init kwargs (dtype by name, the old torch_dtype key, "auto" kept); vocabularies that differ only by
    padding rows beyond the tokenizer share the smaller size, including a tokenizer of exactly that size."""
    from transformers import TrainingArguments

    from hf_fdiv.trainers.teacher import common_vocab, load_teacher

    with pytest.raises(ValueError, match="needs args=FDivDistillationConfig"):
        FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok),
                                args=TrainingArguments(str(tmp_path / "x")), train_dataset=messages_dataset(4),
                                processing_class=tok)
    make_model(tok, hidden=32, seed=1).save_pretrained(tmp_path / "teacher")
    path = str(tmp_path / "teacher")
    assert next(load_teacher(path, {"dtype": "bfloat16"}).parameters()).dtype == torch.bfloat16
    assert next(load_teacher(path, {"torch_dtype": "float64"}).parameters()).dtype == torch.float64
    assert next(load_teacher(path, {"dtype": "auto"}).parameters()).dtype == torch.float32
    assert next(load_teacher(path, None).parameters()).dtype == torch.float32
    assert common_vocab(10, 12, 10) == 10 and common_vocab(12, 10, 9) == 10
    with pytest.raises(ValueError, match="vocabularies differ"):
        common_vocab(10, 12, 11)


def test_distillation_config_combinations_refused_before_training(tok, tmp_path):
    """Offline top-k columns with on-policy generation, packing or padding-free, and on-policy generation
    with packing or padding-free, are refused with the reason; packing without on-policy generation is fine."""
    offline = messages_dataset(4).add_column("teacher_topk_ids", [[[0]]] * 4)
    for extra in [{"lmbda": 0.5}, {"packing": True}, {"padding_free": True}]:
        args = FDivDistillationConfig(output_dir=str(tmp_path / "o"), **{**SFT_COMMON, **extra})
        with pytest.raises(ValueError, match="offline top-k teacher supports neither"):
            FDivDistillationTrainer(model=make_model(tok), args=args, train_dataset=offline, processing_class=tok)
    for extra in [{"packing": True}, {"padding_free": True}]:
        args = FDivDistillationConfig(output_dir=str(tmp_path / "p"), **{**SFT_COMMON, "lmbda": 0.5, **extra})
        with pytest.raises(ValueError, match="needs padded batches"):
            FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok), args=args,
                                    train_dataset=messages_dataset(4), processing_class=tok)
    args = FDivDistillationConfig(output_dir=str(tmp_path / "q"), **{**SFT_COMMON, "packing": True})
    FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok), args=args,
                            train_dataset=messages_dataset(4), processing_class=tok)


def test_output_rows_reads_the_head_not_the_config(tok):
    """The classes of a model's logits are its head's rows (a head padded beyond config.vocab_size counts
    them); a model without an output layer falls back to config.vocab_size."""
    from transformers import BertConfig, BertModel

    from hf_fdiv.trainers.loss_path import output_rows

    model = make_model(tok)
    rows = model.get_output_embeddings().weight.shape[0]
    model.config.vocab_size = rows - 5  # as when the head was padded to a multiple of 64
    assert output_rows(model) == rows
    headless = BertModel(BertConfig(vocab_size=37, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32))
    assert output_rows(headless) == 37
