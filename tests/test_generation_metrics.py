"""Decoding with f-softargmax, sparse-safe metrics, and the study's tiny mode."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, LogitsProcessorList

from hf_fdiv import f_softargmax
from hf_fdiv.generation import FSoftargmaxLogitsProcessor, TeacherReference
from hf_fdiv.metrics import jensen_shannon, make_compute_metrics, sparse_safe_metrics

from launch import launch
from tiny import make_model


@pytest.fixture(scope="module")
def peaked_model(tok):
    model = make_model(tok, hidden=32)
    with torch.no_grad():  # large logits: alpha = 1.5 keeps only a few tokens in the support
        model.lm_head.weight.mul_(60)
    return model.eval()


def support_of(model, ids, divergence, reference="unit"):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]
    return f_softargmax(logits, divergence, reference) > 0


@pytest.mark.parametrize("divergence", ["alpha:1.5", "alpha:2"])
def test_sampling_never_leaves_the_support(tok, peaked_model, divergence):
    prompt = tok(["the cat", "a dog r"], return_tensors="pt", padding=True)
    proc = LogitsProcessorList([FSoftargmaxLogitsProcessor(divergence)])
    sizes = []
    for seed in range(25):
        torch.manual_seed(seed)
        out = peaked_model.generate(**prompt, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0,
                                    logits_processor=proc, pad_token_id=tok.pad_token_id)
        L = prompt["input_ids"].shape[1]
        for step in range(out.shape[1] - L):
            prefix = out[:, : L + step]
            supp = support_of(peaked_model, prefix, divergence)
            sizes.append(float(supp.sum(-1).float().mean()))
            chosen = out[:, L + step]
            assert bool(supp.gather(1, chosen[:, None]).all()), (seed, step)
    assert 1 <= sum(sizes) / len(sizes) < len(tok) / 4  # sparse, so the check is not vacuous


def test_sampling_frequencies_match_p(tok):
    scores = torch.tensor([[3.0, 2.6, 2.0, -5.0, 1.0]])
    proc = FSoftargmaxLogitsProcessor("alpha:1.5")
    logp = proc(torch.zeros(1, 1, dtype=torch.long), scores)
    p = f_softargmax(scores, "alpha:1.5")
    torch.testing.assert_close(torch.softmax(logp, -1), p)  # generate's softmax of log p is p
    assert bool(torch.isinf(logp[p == 0]).all())
    draws = torch.multinomial(torch.softmax(logp, -1).expand(20000, -1), 1, replacement=True).flatten()
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert float((freq - p[0]).abs().max()) < 0.02
    assert bool((freq[p[0] == 0] == 0).all())


def test_greedy_equals_argmax(tok, peaked_model):
    prompt = tok(["the sun"], return_tensors="pt")
    plain = peaked_model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    fdiv = peaked_model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([FSoftargmaxLogitsProcessor("alpha:1.5")]))
    assert torch.equal(plain, fdiv)


def test_teacher_reference_decoding(tok, peaked_model):
    teacher = make_model(tok, hidden=32, seed=5).eval()
    ref = TeacherReference(teacher, temperature=1.0)
    proc = FSoftargmaxLogitsProcessor("alpha:1.5", reference=ref)
    ids = tok(["the cat"], return_tensors="pt")["input_ids"]
    scores = torch.randn(1, len(tok))
    q = torch.softmax(teacher(input_ids=ids).logits[:, -1], -1).clamp(min=1e-12)
    torch.testing.assert_close(torch.softmax(proc(ids, scores), -1), f_softargmax(scores, "alpha:1.5", q), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    out = peaked_model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, top_k=0, top_p=1.0,
                                logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def test_metrics_match_hand_computation():
    logits = torch.tensor([[[2.0, 1.0, -3.0], [0.0, 0.0, 5.0], [1.0, 1.2, 0.0]]])  # [1, 3, V=3]
    labels = torch.tensor([[-100, 1, 0]])  # shifted: targets 1 (for position 0), 0 (position 1)
    m = sparse_safe_metrics(logits, labels, "alpha:2", epsilon=1e-3)
    p0 = f_softargmax(logits[0, 0], "alpha:2")  # sparsemax(2, 1, -3) = (1, 0, 0)
    p1 = f_softargmax(logits[0, 1], "alpha:2")  # (0, 0, 1)
    assert torch.allclose(p0, torch.tensor([1.0, 0.0, 0.0])) and torch.allclose(p1, torch.tensor([0.0, 0.0, 1.0]))
    assert m["tokens"] == 2
    assert m["token_accuracy"] == 0.0  # argmax 0 vs target 1, argmax 2 vs target 0
    assert m["support_size"] == 1.0
    assert m["zero_prob_rate"] == 1.0
    eps_p = (0 + 1e-3) / (1 + 3e-3)
    assert m["eps_perplexity"] == pytest.approx(1 / eps_p, rel=1e-9)
    assert m["jsd_to_target"] == pytest.approx(math.log(2), rel=1e-9)  # disjoint supports
    # softmax model: eps-perplexity is close to the usual perplexity
    k = sparse_safe_metrics(logits, labels, "kl", epsilon=1e-9)
    ce = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([1, 0]))
    assert k["eps_perplexity"] == pytest.approx(float(torch.exp(ce)), rel=1e-6)
    # JSD against a teacher, and the closed form of jensen_shannon
    teacher = torch.softmax(torch.randn(1, 3, 3), -1)
    t = sparse_safe_metrics(logits, labels, "kl", teacher_probs=teacher)
    p = torch.softmax(logits[0, :2], -1).double()
    q = teacher[0, :2].double()
    m_ = (p + q) / 2
    jsd = 0.5 * (p * (p / m_).log()).sum(-1) + 0.5 * (q * (q / m_).log()).sum(-1)
    assert t["jsd_to_teacher"] == pytest.approx(float(jsd.mean()), rel=1e-6)  # fp32 softmax inside
    assert float(jensen_shannon(p, p).abs().max()) < 1e-12


def test_compute_metrics_hook():
    fn = make_compute_metrics("alpha:1.5")
    logits = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32) * 3
    labels = np.array([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    out = fn(EvalPrediction(predictions=logits, label_ids=labels))
    want = sparse_safe_metrics(torch.from_numpy(logits), torch.from_numpy(labels), "alpha:1.5")
    want.pop("tokens")
    assert out == pytest.approx(want)


@pytest.mark.slow
def test_study_tiny_mode(tmp_path):
    pytest.importorskip("chatterbot_corpus", reason="the study reads the chatterbot-corpus wheel")
    proc = launch([sys.executable, "examples/study.py", "--tiny", "--output_dir", tmp_path], timeout=600)
    assert proc.returncode == 0, proc.report(tail=2000)
    table = (tmp_path / "results.md").read_text()
    for name in ("SFT kl", "SFT alpha:1.5", "SFT chi2", "SFT js", "SFT reverse_kl", "teacher as reference",
                 "teacher as target"):
        assert name in table, name
    assert (tmp_path / "study.png").exists()
