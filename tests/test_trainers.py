"""FDivTrainer / FDivSFTTrainer on tiny in-code models: equivalence with the stock trainers for KL,
gradient-accumulation exactness, LoRA, masking, padding-free, metrics, model cards, configs."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer, TrlParser

from hf_fdiv import (
    FDivSFTConfig,
    FDivSFTTrainer,
    FDivTrainer,
    FDivTrainingArguments,
    causal_lm_fdiv_loss,
)

from tiny import COMMON, SFT_COMMON, make_model, messages_dataset, prompt_completion_dataset
from tiny import params, text_dataset, tokenized_lm_dataset


def assert_params_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def lm_trainer(cls, tok, args, model=None, **kwargs):
    """``cls`` (Trainer or FDivTrainer) on 4 tokenized sentences with the causal-LM collator."""
    return cls(model=make_model(tok) if model is None else model, args=args, train_dataset=tokenized_lm_dataset(tok, 4),
               data_collator=DataCollatorForLanguageModeling(tok, mlm=False), **kwargs)


# --------------------------------------------------------------------------------- KL = stock


def one_step(make_trainer, name, tmp_path):
    """(loss, gradients) of one batch, then the parameters after one SGD step of ``train()``."""
    model, trainer = make_trainer(str(tmp_path / name))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    trainer.train()
    return float(loss.detach()), grads, params(model)


def assert_same_step(a, b):
    assert abs(a[0] - b[0]) <= 1e-5
    assert_params_close(a[1], b[1], 1e-5)
    assert_params_close(a[2], b[2], 1e-5)


def test_fdiv_trainer_kl_reproduces_stock_trainer(tok, tmp_path):
    ds = tokenized_lm_dataset(tok, 8)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)

    def make(cls, args_cls, **extra):
        def build(out):
            model = make_model(tok)
            args = args_cls(output_dir=out, per_device_train_batch_size=8, max_steps=1, learning_rate=0.1,
                            optim="sgd", **COMMON, **extra)
            return model, cls(model=model, args=args, train_dataset=ds, data_collator=collator)
        return build

    assert_same_step(one_step(make(Trainer, TrainingArguments), "stock", tmp_path),
                     one_step(make(FDivTrainer, FDivTrainingArguments, divergence="kl"), "fdiv", tmp_path))


def test_fdiv_sft_trainer_kl_reproduces_stock_sft(tok, tmp_path):
    def make(cls, cfg_cls, **extra):
        def build(out):
            model = make_model(tok)
            cfg = cfg_cls(output_dir=out, per_device_train_batch_size=8, max_steps=1, learning_rate=0.1,
                          optim="sgd", **SFT_COMMON, **extra)
            return model, cls(model=model, args=cfg, train_dataset=text_dataset(8), processing_class=tok)
        return build

    assert_same_step(one_step(make(SFTTrainer, SFTConfig), "stock", tmp_path),
                     one_step(make(FDivSFTTrainer, FDivSFTConfig, divergence="kl"), "fdiv", tmp_path))


# --------------------------------------------------------------------------------- GA exactness


@pytest.mark.parametrize("which", ["trainer", "sft"])
def test_batch_size_times_accumulation_invariance(tok, tmp_path, which):
    results = []
    for bs, ga in [(8, 1), (4, 2), (2, 4)]:
        model = make_model(tok)
        common = dict(output_dir=str(tmp_path / f"{bs}x{ga}"), per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, max_steps=1, learning_rate=0.5, optim="sgd",
                      divergence="alpha:1.5")
        if which == "trainer":
            args = FDivTrainingArguments(**common, **COMMON)
            tr = FDivTrainer(model=model, args=args, train_dataset=tokenized_lm_dataset(tok, 8),
                             data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        else:
            args = FDivSFTConfig(**common, **SFT_COMMON)
            tr = FDivSFTTrainer(model=model, args=args, train_dataset=text_dataset(8), processing_class=tok)
        tr.train()
        results.append(params(model))
    moved = max(float((results[0][k] - make_model(tok).state_dict()[k]).abs().max()) for k in results[0])
    assert moved > 1e-3  # the step did something
    assert_params_close(results[0], results[1], 1e-6)
    assert_params_close(results[0], results[2], 1e-6)


# --------------------------------------------------------------------------------- LoRA


def test_lora_sft_trains_saves_reloads_and_generates(tok, tmp_path):
    out = tmp_path / "lora"
    cfg = FDivSFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                        **SFT_COMMON)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = FDivSFTTrainer(model=make_model(tok), args=cfg, train_dataset=messages_dataset(8), processing_class=tok,
                        peft_config=lora)
    assert isinstance(tr.model, PeftModel)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    tr.train()
    after = {n: p.detach() for n, p in tr.model.named_parameters() if "lora_B" in n}
    assert any(float((after[n] - before[n]).abs().max()) > 0 for n in before)
    tr.save_model()
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_model(tok), str(out))
    for n, p in reloaded.named_parameters():
        if "lora_B" in n:
            key = n.replace(".default", "")
            match = [v for k, v in after.items() if k.replace(".default", "") == key]
            assert match and torch.equal(p.detach(), match[0])
    ids = tok("the cat", return_tensors="pt")
    gen = reloaded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.library_name == "peft"
    assert "alpha:1.5" in card.text and "unit" in card.text and "roulet2025loss" in card.text
    assert "None" not in card.text.split("## Training loss")[0]


# --------------------------------------------------------------------------------- masks


def manual_loss(model, input_ids, attention_mask, labels, divergence="alpha:1.5"):
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return causal_lm_fdiv_loss(logits, labels, divergence=divergence)


def test_completion_only_loss_equals_manual(tok, tmp_path):
    ds = prompt_completion_dataset(8)
    model = make_model(tok)
    cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, **SFT_COMMON)
    tr = FDivSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    batch = first_batch(tr)
    model.eval()
    with torch.no_grad():
        got = tr.compute_loss(model, dict(batch))
    # manual targets: completion tokens (and the EOS TRL appends) only
    labels = torch.full_like(batch["input_ids"], -100)
    texts = {r["prompt"] + r["completion"]: r for r in ds}
    for i, row_ids in enumerate(batch["input_ids"]):
        n = int(batch["attention_mask"][i].sum())
        text = tok.decode(row_ids[:n], skip_special_tokens=True)
        row = texts[text]
        start = len(tok(row["prompt"])["input_ids"])
        labels[i, start:n] = row_ids[start:n]
    assert int((labels != -100).sum()) < int(batch["attention_mask"].sum())  # prompts really are masked
    want = manual_loss(model, batch["input_ids"], batch["attention_mask"], labels)
    assert abs(float(got) - float(want)) <= 1e-6


def test_assistant_only_loss_equals_manual(tok, tmp_path):
    ds = messages_dataset(8)
    model = make_model(tok)
    kwargs = dict(SFT_COMMON, max_length=256)  # no truncation: rows match their rendered template
    cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                        assistant_only_loss=True, **kwargs)
    tr = FDivSFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    batch = first_batch(tr)
    model.eval()
    with torch.no_grad():
        got = tr.compute_loss(model, dict(batch))
    by_text = {}
    for r in ds:
        enc = tok.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True, tokenize=True)
        by_text[tuple(enc["input_ids"])] = enc["assistant_masks"]
    labels = torch.full_like(batch["input_ids"], -100)
    for i, row_ids in enumerate(batch["input_ids"]):
        n = int(batch["attention_mask"][i].sum())
        mask = torch.tensor(by_text[tuple(row_ids[:n].tolist())], dtype=torch.bool)
        labels[i, :n] = torch.where(mask, row_ids[:n], torch.full_like(row_ids[:n], -100))
    assert 0 < int((labels != -100).sum()) < int(batch["attention_mask"].sum())
    want = manual_loss(model, batch["input_ids"], batch["attention_mask"], labels)
    assert abs(float(got) - float(want)) <= 1e-6


def test_padding_free_equals_padded(tok, tmp_path):
    losses = {}
    for name, extra in [("padded", {}), ("padding_free", {"padding_free": True, "max_length": None})]:
        model = make_model(tok)
        kwargs = dict(SFT_COMMON)
        kwargs.update(extra)
        cfg = FDivSFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                            divergence="alpha:1.5", **kwargs)
        tr = FDivSFTTrainer(model=model, args=cfg, train_dataset=text_dataset(8), processing_class=tok)
        batch = first_batch(tr)
        if name == "padding_free":
            assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
        model.eval()
        with torch.no_grad():
            losses[name] = float(tr.compute_loss(model, dict(batch)))
    assert abs(losses["padded"] - losses["padding_free"]) <= 1e-5


# --------------------------------------------------------------------------------- training + metrics


def test_alpha15_training_lowers_loss_and_logs_metrics(tok, tmp_path):
    corpus = Dataset.from_dict({"text": [s for s in text_dataset(12)["text"]] * 4})
    cfg = FDivSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3,
                        eval_strategy="no", **SFT_COMMON)

    def accuracy(pred):
        logits, labels = pred.predictions, pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
        return {"shifted_top1": float(hit.sum() / (labels[:, 1:] != -100).sum())}

    tr = FDivSFTTrainer(model=make_model(tok, hidden=32), args=cfg, train_dataset=corpus,
                        eval_dataset=text_dataset(8), processing_class=tok, compute_metrics=accuracy)
    tr.train()
    hist = [h for h in tr.state.log_history if "loss" in h]
    assert len(hist) == 30
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    for key in ("support_size", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in hist[-1], key
    assert hist[-1]["support_size"] >= 1 and hist[-1]["num_tokens"] > hist[0]["num_tokens"]
    assert hist[-1]["mean_token_accuracy"] > hist[0]["mean_token_accuracy"]
    metrics = tr.evaluate()
    for key in ("eval_loss", "eval_support_size", "eval_entropy", "eval_mean_token_accuracy", "eval_shifted_top1"):
        assert key in metrics, key
    assert math.isfinite(metrics["eval_loss"])
    # eval loss is the same f-divergence loss, recomputed by hand
    batch = next(iter(tr.get_eval_dataloader()))
    tr.model.eval()
    with torch.no_grad():
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert abs(metrics["eval_loss"] - float(causal_lm_fdiv_loss(logits, batch["labels"]))) <= 1e-5


# --------------------------------------------------------------------------------- drop-in swap


def sft_script(trainer_cls, out_dir, tok):
    """A script written for SFTTrainer/SFTConfig; the test swaps only ``trainer_cls``."""
    args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                     report_to="none", bf16=False, use_cpu=True, activation_checkpointing=False, max_length=64,
                     save_strategy="no", disable_tqdm=True)
    trainer = trainer_cls(model=make_model(tok), args=args, train_dataset=messages_dataset(8), processing_class=tok)
    trainer.train()
    trainer.save_model()
    return trainer


def test_swapping_the_class_in_an_sft_script_runs(tok, tmp_path):
    stock = sft_script(SFTTrainer, str(tmp_path / "stock"), tok)
    fdiv = sft_script(FDivSFTTrainer, str(tmp_path / "fdiv"), tok)
    assert fdiv.state.global_step == stock.state.global_step == 2
    assert fdiv.fdiv_divergence.name == "alpha:1.5"  # defaults apply to a plain SFTConfig
    assert (tmp_path / "fdiv" / "model.safetensors").exists()


def test_constructor_keywords_override_config(tok, tmp_path):
    cfg = FDivSFTConfig(output_dir=str(tmp_path), divergence="alpha:2", reference="uniform", **SFT_COMMON)
    tr = FDivSFTTrainer(model=make_model(tok), args=cfg, train_dataset=text_dataset(4), processing_class=tok,
                        divergence="js")
    assert tr.fdiv_divergence.name == "js" and tr.fdiv_reference == "uniform"
    prior = torch.rand(len(tok)) + 0.1
    tr = lm_trainer(FDivTrainer, tok, TrainingArguments(str(tmp_path), **COMMON), reference=prior)
    assert tr.fdiv_divergence.name == "alpha:1.5" and tr.fdiv_reference is prior
    batch = first_batch(tr)
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert abs(float(got) - float(causal_lm_fdiv_loss(logits, batch["labels"], reference=prior))) <= 1e-6


# --------------------------------------------------------------------------------- cards and configs


def test_model_card_parses_and_names_the_loss(tok, tmp_path):
    out = tmp_path / "card"
    model = make_model(tok)
    model.config._name_or_path = "hf-internal/tiny-qwen2"  # as if loaded from the Hub
    cfg = FDivSFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, divergence="alpha:1.25",
                        reference="uniform", **SFT_COMMON)
    tr = FDivSFTTrainer(model=model, args=cfg, train_dataset=text_dataset(8), processing_class=tok)
    tr.train()
    tr.save_model()
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.base_model == "hf-internal/tiny-qwen2"
    assert card.data.library_name == "transformers"
    assert "hf-fdiv" in card.data.tags and "fdiv-alpha-1.25" in card.data.tags
    assert "alpha = 1.25" in card.text and "uniform (q = 1/V)" in card.text
    assert "@inproceedings{roulet2025loss" in card.text and "2501.18537" in card.text
    assert "FDivSFTTrainer" in card.text

    # a model built in code: no base_model metadata, and the text never says "None"
    out2 = tmp_path / "card2"
    tr2 = lm_trainer(FDivTrainer, tok, FDivTrainingArguments(str(out2), divergence="kl", **COMMON))
    tr2.save_model()
    card2 = ModelCard.load(str(out2 / "README.md"))
    assert card2.data.base_model is None
    assert "initialised in code" in card2.text and "[None]" not in card2.text
    assert "cross-entropy" in card2.text

    # Trainer.create_model_card (what push_to_hub calls): the dataset and the Hub id reach the card
    tr2.args.hub_model_id = "someone/tiny-fdiv"
    tr2.create_model_card(dataset_name="my-corpus")
    card3 = ModelCard.load(str(out2 / "README.md"))
    assert "my-corpus" in str(card3.data.datasets) and "someone/tiny-fdiv" in card3.text
    tr2.create_model_card(dataset="other-corpus")  # transformers' keyword
    assert "other-corpus" in str(ModelCard.load(str(out2 / "README.md")).data.datasets)


def test_configs_validate_and_parse(tmp_path):
    with pytest.raises(ValueError, match="unknown divergence"):
        FDivSFTConfig(output_dir=str(tmp_path), divergence="alpha-1.5", **SFT_COMMON)
    with pytest.raises(ValueError, match="alpha > 0"):
        FDivTrainingArguments(output_dir=str(tmp_path), divergence="alpha:0", **COMMON)
    with pytest.raises(ValueError, match="reference"):
        FDivTrainingArguments(output_dir=str(tmp_path), reference="nonexistent.pt", **COMMON)
    parser = TrlParser((FDivSFTConfig,))
    text = parser.format_help()
    assert "--divergence" in text and "--reference" in text and "entmax15" in text
    (cfg,) = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--divergence", "alpha:2", "--reference", "uniform", "--bf16", "False"]
    )
    assert cfg.divergence == "alpha:2" and cfg.reference == "uniform"
    prior = tmp_path / "prior.pt"
    torch.save(torch.ones(7), prior)
    (cfg,) = TrlParser((FDivTrainingArguments,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--reference", str(prior)]
    )
    assert cfg.reference == str(prior)


@pytest.mark.parametrize("packing", [False, True])  # packed batches are padding-free: position_ids, no mask
def test_num_tokens_equals_stock_sft(tok, tmp_path, packing):
    # the token count rides in the same gather as the loss metrics: it must still equal TRL's own count
    def history(trainer_cls, config_cls, out):
        cfg = config_cls(output_dir=str(tmp_path / out), per_device_train_batch_size=3, max_steps=3,
                         packing=packing, **SFT_COMMON)
        tr = trainer_cls(model=make_model(tok), args=cfg, train_dataset=messages_dataset(9), processing_class=tok)
        tr.train()
        return [h["num_tokens"] for h in tr.state.log_history if "loss" in h]

    stock = history(SFTTrainer, SFTConfig, "stock")
    ours = history(FDivSFTTrainer, FDivSFTConfig, "fdiv")
    assert len(stock) == 3 and stock[0] > 0
    assert ours == stock


@pytest.mark.parametrize("ids", ["class ids", "none", "soft targets"])
def test_metric_sums_counts_correct_rows_only_for_class_ids(ids):
    """[support, entropy, correct, count, nonfinite] over the solved rows, by hand: a row's prediction is
    correct only against a class id; soft targets (distillation) and no targets (on-policy) count none."""
    from hf_fdiv.losses import RowStats
    from hf_fdiv.trainers.loss_path import metric_sums

    stats = RowStats(
        support=torch.tensor([2.0, 1.0, 3.0, 0.0]), entropy=torch.tensor([0.5, 0.0, 1.0, 0.0]),
        pred=torch.tensor([1, 0, 2, -1]), solved=torch.tensor([True, True, True, False]),
        skipped=torch.tensor([False, False, False, True]),
    )
    target = {"class ids": torch.tensor([1, 2, 2, 0]), "none": None, "soft targets": torch.full((4, 3), 1 / 3)}[ids]
    correct = 2.0 if ids == "class ids" else 0.0  # rows 0 and 2; row 3 is not solved
    expected = torch.tensor([6.0, 1.5, correct, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(metric_sums(stats, target), expected, rtol=0, atol=0)


def test_plain_training_arguments_get_the_fdiv_config_defaults(tok, tmp_path):
    """A stock TrainingArguments (no f-divergence fields) trains with FDivTrainingArguments' defaults."""
    defaults = FDivTrainingArguments(str(tmp_path), **COMMON)
    tr = lm_trainer(FDivTrainer, tok, TrainingArguments(str(tmp_path), **COMMON))
    assert tr.fdiv_divergence.name == defaults.divergence
    assert tr.fdiv_reference == defaults.reference
    assert (tr.fdiv_max_iter, tr.fdiv_fused, tr.fdiv_skip_nonfinite) == (
        defaults.fdiv_max_iter, defaults.fdiv_fused, defaults.fdiv_skip_nonfinite)


@pytest.mark.parametrize("use_cache", [False, True])
def test_kv_cache_follows_training_arguments_like_the_stock_trainer(tok, tmp_path, use_cache):
    """The stock Trainer sets the model config's use_cache from args.use_cache (False by default: training
    reads no cache; True for PEFT methods that use one); the loss's forward keeps that choice."""
    def outputs(cls, args_cls):
        model = make_model(tok)
        tr = lm_trainer(cls, tok, args_cls(str(tmp_path), use_cache=use_cache, **COMMON), model=model)
        with torch.no_grad():
            return tr.compute_loss(model, first_batch(tr), return_outputs=True)[1]

    stock = outputs(Trainer, TrainingArguments)
    ours = outputs(FDivTrainer, FDivTrainingArguments)
    assert (stock.past_key_values is not None) == use_cache
    assert (ours.past_key_values is not None) == use_cache
