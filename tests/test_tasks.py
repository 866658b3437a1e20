"""Every kind of model whose stock loss is a class cross-entropy trains with FDivTrainer /
FDivSeq2SeqTrainer / compute_loss_func (issue 21), on tiny in-code models (tests/tiny_tasks.py):

* divergence="kl" gives the stock Trainer's (Seq2SeqTrainer's) loss, gradients and SGD step;
* batch 8 x GA 1 = batch 4 x GA 2 (loss and parameters, SGD), which the stock trainers miss for most kinds;
* alpha = 1.5 trains; compute_loss_func on the stock Trainer = the subclass;
* what is not a class cross-entropy is refused in one line before training.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_fdiv import (
    FDivSeq2SeqTrainer,
    FDivSeq2SeqTrainingArguments,
    FDivTrainer,
    FDivTrainingArguments,
    compute_loss_func,
)
from hf_fdiv.trainers.checks import ConfigurationError

from tiny import COMMON, first_batch_step, max_diff, params
from tiny_tasks import KINDS, SEQ2SEQ, make_dataset, make_model

#: classes of each kind's head (the support of softmax)
CLASSES = {"sequence_classification": 3, "token_classification": 5, "masked_lm": 40, "question_answering": 10,
           "image_classification": 3, "audio_classification": 3, "semantic_segmentation": 3, "t5": 40, "bart": 40,
           "causal_lm": 40}


def trainer_for(kind, out, fdiv=True, model=None, dataset=None, seq2seq=None, **args):
    seq2seq = kind in SEQ2SEQ if seq2seq is None else seq2seq
    if fdiv:
        cls, args_cls = (FDivSeq2SeqTrainer, FDivSeq2SeqTrainingArguments) if seq2seq else (FDivTrainer,
                                                                                           FDivTrainingArguments)
    else:
        cls, args_cls = (Seq2SeqTrainer, Seq2SeqTrainingArguments) if seq2seq else (Trainer, TrainingArguments)
        args.pop("divergence", None)
    compute = args.pop("compute_loss_func", None)
    settings = dict(per_device_train_batch_size=8, max_steps=1, learning_rate=0.5, optim="sgd", **COMMON)
    settings.update(args)
    model = make_model(kind) if model is None else model
    extra = {"compute_loss_func": compute(model)} if compute is not None else {}
    trainer = cls(model=model, args=args_cls(output_dir=str(out), **settings),
                  train_dataset=make_dataset(kind) if dataset is None else dataset,
                  data_collator=default_data_collator, **extra)
    return model, trainer


def oracle_accuracy(kind, model, batch) -> float:
    """argmax accuracy of the model's own logits on ``batch``, with the stock loss's alignment (written
    here per kind, not through hf_fdiv's task code)."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
        if kind in SEQ2SEQ:
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        out = model(**inputs)
    if kind == "question_answering":
        pred = torch.stack([out.start_logits.argmax(-1), out.end_logits.argmax(-1)], 1)
        target = torch.stack([batch["start_positions"], batch["end_positions"]], 1)
        inside = target < out.start_logits.shape[1]  # answers outside the input are not targets
        return float((pred == target)[inside].double().mean())
    logits, labels = out.logits, batch["labels"]
    if kind == "semantic_segmentation":
        logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                                 align_corners=False).permute(0, 2, 3, 1)
        labels = labels.masked_fill(labels == 255, -100)
    if kind == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return float((logits.argmax(-1)[keep] == labels[keep]).double().mean())


# ----------------------------------------------------------------------------------- KL = stock


@pytest.mark.parametrize("kind", KINDS)
def test_kl_is_the_stock_loss_gradients_and_step(kind, tmp_path):
    stock_model, stock = trainer_for(kind, tmp_path / "stock", fdiv=False)
    ours_model, ours = trainer_for(kind, tmp_path / "fdiv", divergence="kl")
    accuracy = oracle_accuracy(kind, ours_model, next(iter(ours.get_train_dataloader())))
    a, b = first_batch_step(stock_model, stock), first_batch_step(ours_model, ours)
    assert abs(a[0] - b[0]) <= 1e-5, (a[0], b[0])
    assert max_diff(a[1], b[1]) <= 1e-5
    assert max_diff(a[2], b[2]) <= 1e-5
    assert abs(stock.state.log_history[0]["loss"] - ours.state.log_history[0]["loss"]) <= 1e-5
    # metrics for every kind: softmax has full support; accuracy is the argmax accuracy of the logits
    logged = ours.state.log_history[0]
    key = "mean_token_accuracy" if kind in ("token_classification", "masked_lm", "t5", "bart", "causal_lm") else "accuracy"
    assert logged["support_size"] == pytest.approx(CLASSES[kind])
    assert 0 < logged["entropy"] <= math.log(CLASSES[kind]) + 1e-6
    assert logged[key] == pytest.approx(accuracy, abs=1e-9)


def test_fdiv_trainer_trains_t5_from_labels_alone(tmp_path):
    """The plain FDivTrainer makes the decoder inputs from the labels as T5 does (issue 21's first failure:
    'You must specify exactly one of input_ids or inputs_embeds'), fused on or off."""
    stock_model, stock = trainer_for("t5", tmp_path / "stock", fdiv=False)
    a = first_batch_step(stock_model, stock)
    for fused in (True, False):
        model, ours = trainer_for("t5", tmp_path / f"fdiv{fused}", seq2seq=False, divergence="kl", fdiv_fused=fused)
        b = first_batch_step(model, ours)
        assert abs(a[0] - b[0]) <= 1e-5 and max_diff(a[2], b[2]) <= 1e-5


def test_a_head_inside_a_prediction_head_is_not_fused(tmp_path):
    """BertLMHeadModel's decoder reads cls.predictions.transform(hidden), not the backbone's output: the fused
    loss must not skip the transform (it did: no gradient reached transform.dense)."""
    model = make_model("bert_lm_head")
    stock = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "s"), **COMMON),
                    train_dataset=make_dataset("bert_lm_head"), data_collator=default_data_collator)
    batch = next(iter(stock.get_train_dataloader()))
    stock.compute_loss(model, dict(batch)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = FDivTrainer(model=model, args=FDivTrainingArguments(output_dir=str(tmp_path / "o"), divergence="kl",
                                                               fdiv_fused=True, **COMMON),
                       train_dataset=make_dataset("bert_lm_head"), data_collator=default_data_collator)
    ours.compute_loss(model, dict(batch)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert max_diff(expected, got) <= 1e-6


@pytest.mark.parametrize("kind", ["masked_lm", "t5"])
def test_large_vocabulary_heads_are_fused_and_equal_the_materialised_loss(kind, tmp_path):
    """Masked LMs and encoder-decoders with a plain linear head take the fused LM-head loss (the head's forward
    is stood in for: the model's logits are a zero-stride view, never [tokens x V]); the loss and gradients
    equal those of the materialised logits."""
    runs = []
    for fused in (True, False):
        model, trainer = trainer_for(kind, tmp_path / str(fused), divergence="alpha:1.5", fdiv_fused=fused)
        assert (trainer._fdiv_fused_parts(model) is not None) == fused
        batch = next(iter(trainer.get_train_dataloader()))
        seen = []
        head = model.get_output_embeddings()
        handle = model.register_forward_hook(lambda m, a, out: seen.append((out.logits.stride(), out.logits.shape)))
        loss = trainer.compute_loss(model, dict(batch))
        handle.remove()
        loss.backward()
        runs.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert (seen[0][0][-1] == 0) == fused and head.forward.__self__ is head  # the stand-in is gone
        # the stand-in's logits keep the model's shape (outputs.logits of a returned output stay [..., T, V])
        assert seen[0][1][-1] == head.out_features and len(seen[0][1]) == 3
    assert abs(runs[0][0] - runs[1][0]) <= 1e-5
    assert max_diff(runs[0][1], runs[1][1]) <= 1e-5


def test_classification_and_bart_heads_use_the_logits(tmp_path):
    for kind in ("sequence_classification", "token_classification", "bart"):
        model, trainer = trainer_for(kind, tmp_path / kind, divergence="alpha:1.5", fdiv_fused=True)
        assert trainer._fdiv_fused_parts(model) is None


# ----------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("kind", KINDS)
def test_accumulated_batch_equals_one_big_batch(kind, tmp_path):
    runs = []
    for bs, ga in ((8, 1), (4, 2)):
        model, trainer = trainer_for(kind, tmp_path / f"{bs}x{ga}", divergence="alpha:1.5",
                                     per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        trainer.train()
        runs.append((trainer.state.log_history[0]["loss"], params(model)))
    assert abs(runs[0][0] - runs[1][0]) <= 1e-5 * max(1.0, abs(runs[0][0]))
    assert max_diff(runs[0][1], params(make_model(kind))) > 1e-4  # the step moved the model
    assert max_diff(runs[0][1], runs[1][1]) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_alpha15_trains(kind, tmp_path):
    model, trainer = trainer_for(kind, tmp_path, divergence="alpha:1.5", max_steps=6, optim="adamw_torch",
                                 learning_rate=2e-2)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------- compute_loss_func


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "question_answering"])
def test_compute_loss_func_on_the_stock_trainer_equals_the_subclass(kind, tmp_path):
    dataset = make_dataset(kind, ignored=kind != "semantic_segmentation")
    if kind in SEQ2SEQ:  # the Trainer takes labels away before the forward: the batch carries the decoder inputs
        model = make_model(kind)
        dataset = dataset.map(lambda row: {"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(
            labels=row["labels"][None])[0]})
    runs = []
    for how in ("hook", "subclass"):
        extra = {"compute_loss_func": lambda m: compute_loss_func(m, divergence="alpha:1.5")} if how == "hook" else {
            "divergence": "alpha:1.5"}
        model, trainer = trainer_for(kind, tmp_path / how, fdiv=how == "subclass", dataset=dataset,
                                     per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                                     **extra)
        trainer.train()
        runs.append(([e["loss"] for e in trainer.state.log_history if "loss" in e], params(model)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert max_diff(runs[0][1], runs[1][1]) <= 1e-5


def test_compute_loss_func_refuses_question_answering():
    with pytest.raises(ConfigurationError, match="start_positions / end_positions.*FDivTrainer"):
        compute_loss_func(make_model("question_answering"))


# ----------------------------------------------------------------------------------- refusals


def _refused(model, tmp_path, dataset=None, seq2seq=False, kind="sequence_classification"):
    with pytest.raises(ConfigurationError) as err:
        trainer_for(kind, tmp_path, model=model, dataset=dataset, seq2seq=seq2seq)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_not_a_class_cross_entropy_is_refused_before_training(tmp_path):
    import transformers as tf

    from tiny_tasks import _bert_config

    assert "mean squared error" in _refused(tf.BertForSequenceClassification(_bert_config(num_labels=1)), tmp_path)
    multi = tf.BertForSequenceClassification(_bert_config(num_labels=3, problem_type="multi_label_classification"))
    assert "binary cross-entropy" in _refused(multi, tmp_path)
    ctc = tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, conv_dim=(8,), conv_stride=(4,), conv_kernel=(8,),
                                             num_feat_extract_layers=1, vocab_size=8))
    assert "CTC" in _refused(ctc, tmp_path)
    detr = tf.YolosForObjectDetection(tf.YolosConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, image_size=[16, 16], patch_size=8,
                                                    num_detection_tokens=2))
    assert "ForObjectDetectionLoss" in _refused(detr, tmp_path)
    assert "encoder-decoder" in _refused(make_model("sequence_classification"), tmp_path, seq2seq=True)
    assert "encoder-decoder" in _refused(make_model("causal_lm"), tmp_path, seq2seq=True)


def test_labels_that_do_not_fit_the_head_are_refused(tmp_path):
    from datasets import ClassLabel, Value

    data = make_dataset("sequence_classification").with_format(None)
    four = data.cast_column("labels", ClassLabel(num_classes=4))
    assert "4 classes but the model's head has num_labels=3" in _refused(make_model("sequence_classification"),
                                                                         tmp_path, dataset=four.with_format("torch"))
    outside = data.map(lambda row, i: {"labels": 7 if i == 2 else row["labels"]}, with_indices=True)
    message = _refused(make_model("sequence_classification"), tmp_path, dataset=outside.with_format("torch"))
    assert "label 7" in message and "outside [0, 3)" in message
    # a token-classification label out of range stops the first step, saying where and what
    tokens = make_dataset("token_classification").with_format(None)
    tokens = tokens.map(lambda row: {"labels": [9] + row["labels"][1:]})
    model, trainer = trainer_for("token_classification", tmp_path / "tok", dataset=tokens.with_format("torch"))
    with pytest.raises(ValueError, match="training step 1: target id 9 is out of range for V=5"):
        trainer.train()
    # float labels are a regression / multi-label target, not class ids
    floats = data.cast_column("labels", Value("float32"))
    assert "holds floats" in _refused(make_model("sequence_classification"), tmp_path,
                                      dataset=floats.with_format("torch"))
    # ... also when the data has no declared features (a plain torch dataset): stopped at the first step
    plain = [{k: v for k, v in row.items()} for row in floats.with_format("torch")]
    model, trainer = trainer_for("sequence_classification", tmp_path / "f", dataset=plain)
    with pytest.raises(ConfigurationError, match="labels are floats"):
        trainer.train()


# ----------------------------------------------------------------------------------- seq2seq generation


def test_seq2seq_generates_with_the_f_softargmax(tmp_path):
    from hf_fdiv import f_softargmax
    from hf_fdiv.generation import FSoftargmaxLogitsProcessor

    model, trainer = trainer_for("t5", tmp_path, divergence="alpha:1.5", max_steps=2, predict_with_generate=True,
                                 generation_max_length=6, per_device_eval_batch_size=8)
    trainer.train()
    with_generate = trainer.evaluate(make_dataset("t5"))
    trainer.args.predict_with_generate = False
    plain = trainer.evaluate(make_dataset("t5"))
    assert with_generate["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)  # the f-divergence loss
    batch = next(iter(trainer.get_train_dataloader()))
    processor = FSoftargmaxLogitsProcessor("alpha:1.5")
    torch.manual_seed(0)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                         do_sample=True, top_k=0, top_p=1.0, logits_processor=[processor], output_scores=True,
                         output_logits=True, return_dict_in_generate=True)
    sampled = 0
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        token = out.sequences[:, step + 1]
        alive = ~(out.sequences[:, 1:step + 1] == model.generation_config.eos_token_id).any(1)  # after EOS: padding
        p = f_softargmax(logits.float(), "alpha:1.5")
        assert torch.allclose(scores.exp(), p, atol=1e-6)
        assert bool((p.gather(1, token[:, None])[alive] > 0).all())  # never a token outside the support
        sampled += int(alive.sum())
    assert sampled >= 8


# ----------------------------------------------------------------------------------- stats


def test_row_stats_are_those_of_the_softmax_when_the_gradient_is_kept():
    """The loss's metric stats were read after p - y overwrote p in the gradient buffer (support V - 1,
    entropy NaN under KL): compare with torch's softmax."""
    from hf_fdiv.divergences import get_divergence
    from hf_fdiv.losses import fdiv_loss_rows
    from hf_fdiv.solver import flatten_reference, prepare_reference

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    q = flatten_reference(prepare_reference("unit", x), x.shape)
    _, stats = fdiv_loss_rows(x, target, q, get_divergence("kl"), return_stats=True)
    p = torch.softmax(x.detach().double(), -1)
    assert torch.equal(stats.support, torch.full((8,), 5.0))
    assert torch.allclose(stats.entropy.double(), -(p * p.log()).sum(-1), atol=1e-6)
    assert torch.equal(stats.pred, p.argmax(-1))


# ----------------------------------------------------------------------------------- label prior


def test_label_prior_is_counted_once_and_is_logit_adjustment_under_kl(tmp_path):
    """reference='label_prior': q_c = (n_c + 1) / (N + C) from the training labels (numpy oracle); under KL the
    f-softargmax with q is softmax(logits + log q), so the loss is torch's cross-entropy of the adjusted logits."""
    import numpy as np
    from huggingface_hub import ModelCard

    dataset = make_dataset("sequence_classification", n=8)
    counts = np.bincount(np.asarray(dataset["labels"]), minlength=3)
    expected = torch.tensor((counts + 1.0) / (counts.sum() + 3.0), dtype=torch.float32)
    model, trainer = trainer_for("sequence_classification", tmp_path, divergence="kl", reference="label_prior",
                                 dataset=dataset)
    assert torch.allclose(trainer.fdiv_reference, expected, atol=1e-7)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    oracle = torch.nn.functional.cross_entropy(logits + expected.log(), batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(oracle), rel=1e-5)
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert "label prior: class frequencies of the 8 training targets over 3 classes" in card.text
    assert torch.equal(torch.load(tmp_path / "reference.pt"), trainer.fdiv_reference)


def test_label_prior_smoothing_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="label_prior_smoothing must be > 0"):
        FDivTrainingArguments(output_dir=str(tmp_path), reference="label_prior", label_prior_smoothing=0.0, **COMMON)


# ----------------------------------------------------------------------------------- cards and metrics


def test_card_names_the_task_pipeline_and_its_snippet_runs(tok, tmp_path):
    """A text classifier's card: pipeline_tag text-classification, and its quick start (run here on the saved
    model) gives p = f-softargmax(logits) with the trained divergence."""
    import re
    import transformers as tf
    from huggingface_hub import ModelCard

    from hf_fdiv import f_softargmax
    from tiny_tasks import _bert_config

    config = _bert_config(num_labels=3)
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config)
    dataset = make_dataset("sequence_classification")
    trainer = FDivTrainer(model=model, processing_class=tok, train_dataset=dataset, data_collator=default_data_collator,
                          args=FDivTrainingArguments(output_dir=str(tmp_path / "clf"), divergence="alpha:1.5",
                                                     max_steps=1, **COMMON))
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "clf" / "README.md"))
    assert card.data.pipeline_tag == "text-classification"
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1).replace('"clf"', repr(str(tmp_path / "clf")))
    assert "AutoModelForSequenceClassification" in code and "f_softargmax(logits, \"alpha:1.5\"" in code
    scope = {}
    exec(code, scope)
    with torch.no_grad():
        expected = f_softargmax(model(**tok("I loved this film.", return_tensors="pt")).logits, "alpha:1.5")
    assert torch.allclose(scope["p"], expected, atol=1e-6)
    # a causal LM keeps the text-generation card
    lm_model, lm = trainer_for("causal_lm", tmp_path / "lm", divergence="alpha:1.5")
    lm.save_model()
    assert ModelCard.load(str(tmp_path / "lm" / "README.md")).data.pipeline_tag == "text-generation"


@pytest.mark.parametrize("kind", ["sequence_classification", "token_classification"])
def test_compute_metrics_takes_class_logits(kind, tmp_path):
    """make_compute_metrics on [B, C] classification logits and [B, T, C] token logits (shift=False): accuracy
    and support size against the argmax and f_softargmax of the model's logits."""
    from hf_fdiv import f_softargmax
    from hf_fdiv.metrics import make_compute_metrics

    model, trainer = trainer_for(kind, tmp_path, divergence="alpha:1.5")
    trainer.compute_metrics = make_compute_metrics("alpha:1.5", shift=False)
    metrics = trainer.evaluate(make_dataset(kind))
    batch = next(iter(trainer.get_eval_dataloader(make_dataset(kind))))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"] != -100
    x, y = logits[keep], batch["labels"][keep]
    assert metrics["eval_token_accuracy"] == pytest.approx(float((x.argmax(-1) == y).double().mean()), abs=1e-9)
    support = (f_softargmax(x, "alpha:1.5") > 0).double().sum(-1).mean()
    assert metrics["eval_support_size"] == pytest.approx(float(support), rel=1e-6)


def test_fused_head_input_only_for_a_plain_linear_head_without_a_logit_transform():
    """A masked LM's output layer is fused at its input only when the logits are exactly head(x) for a plain
    nn.Linear: not with a logit scale, a soft-cap, or a head that is some other module with a weight."""
    from hf_fdiv.trainers.loss_path import fused_head_input

    model = make_model("masked_lm")
    found = fused_head_input(model)
    assert found is not None and found[1] is model.get_output_embeddings()
    for key, value in [("logit_scale", 0.5), ("final_logit_softcapping", 30.0)]:
        other = make_model("masked_lm")
        setattr(other.config, key, value)
        assert fused_head_input(other) is None, key

    class ScaledHead(torch.nn.Module):  # has a weight, but its output is not x W^T + b
        def __init__(self, linear):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return 2 * torch.nn.functional.linear(x, self.weight, self.bias)

    other = make_model("masked_lm")
    other.set_output_embeddings(ScaledHead(other.get_output_embeddings()))
    assert fused_head_input(other) is None


def test_virtual_tokens_and_label_alignment_of_prompt_learning_adapters():
    """Positions a prompt-learning adapter prepends (read from PEFT's active config): prompt tuning's
    num_virtual_tokens; 0 for prefix tuning (keys/values, not positions), for other adapters and for plain
    models; labels are left-padded with -100 by exactly that many positions."""
    from types import SimpleNamespace

    from hf_fdiv.trainers.loss_path import align_to_virtual_tokens, virtual_tokens

    def adapted(**config):
        return SimpleNamespace(active_peft_config=SimpleNamespace(**config))

    prompt = adapted(is_prompt_learning=True, peft_type="PROMPT_TUNING", num_virtual_tokens=5)
    assert virtual_tokens(prompt) == 5
    assert virtual_tokens(adapted(is_prompt_learning=True, peft_type="PeftType.PREFIX_TUNING", num_virtual_tokens=5)) == 0
    assert virtual_tokens(adapted(is_prompt_learning=False, peft_type="LORA", num_virtual_tokens=4)) == 0
    assert virtual_tokens(adapted(peft_type="LORA", num_virtual_tokens=3)) == 0  # no is_prompt_learning: not one
    assert virtual_tokens(adapted(is_prompt_learning=True, peft_type="P_TUNING", num_virtual_tokens=None)) == 0
    assert virtual_tokens(SimpleNamespace()) == 0
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert align_to_virtual_tokens(labels, None) is labels and align_to_virtual_tokens(labels, SimpleNamespace()) is labels
    torch.testing.assert_close(align_to_virtual_tokens(labels, prompt)[:, :5], torch.full((2, 5), -100))
    torch.testing.assert_close(align_to_virtual_tokens(labels, prompt)[:, 5:], labels)


def test_fused_head_needs_a_separate_backbone_with_the_head_beside_it():
    """The causal-LM fused path needs a backbone that is not the model itself and a head that is one of the
    model's own children (BERT's decoder inside cls.predictions is not)."""
    from hf_fdiv.trainers.loss_path import fused_head

    causal = make_model("causal_lm")
    found = fused_head(causal)
    assert found is not None and found[1] is causal.get_output_embeddings()
    assert fused_head(make_model("bert_lm_head")) is None

    class Itself(torch.nn.Module):  # base_model is the model: no separate backbone
        def __init__(self):
            super().__init__()
            self.lm_head, self.config = torch.nn.Linear(4, 6), causal.config

        @property
        def base_model(self):
            return self

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, logits_to_keep=0):  # what a causal LM's forward accepts
            raise NotImplementedError

    assert fused_head(Itself()) is None
