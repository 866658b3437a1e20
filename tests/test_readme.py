"""The README's runnable Python examples (```python blocks; ```py marks fragments) run as written and
do what their comments claim: each block is exec'd into a namespace (an ``assert`` inside a block fails
the test), then its variables are checked against independent computations."""

import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(source: str, name: str, seed: int = 0) -> dict:
    """exec one block in a fresh namespace (seeded, so that its random inputs can be replayed)."""
    namespace = {"__name__": f"readme_{name}"}
    torch.manual_seed(seed)
    exec(compile(source, f"README.md[{name}]", "exec"), namespace)
    return namespace


def block_with(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one ```python block containing {marker!r} in README.md, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def quick_start():
    return run_block(block_with("f_softargmax(logits"), "quick start")


def test_every_python_block_runs():
    assert len(BLOCKS) >= 2
    for index, block in enumerate(BLOCKS):
        run_block(block, f"python block {index}")


def test_a_failing_assert_in_a_block_fails_the_test():
    with pytest.raises(AssertionError):
        run_block("assert 1 == 2", "deliberately false")
    # the quick start's own check: with a divergence other than KL the allclose is false and raises
    original = block_with("f_softargmax(logits")
    broken = original.replace('fdiv_loss(logits, labels, "kl")', 'fdiv_loss(logits, labels, "chi2")')
    assert broken != original
    with pytest.raises(AssertionError):
        run_block(broken, "quick start, broken")


def test_quick_start_operator_is_sparse_entmax15(quick_start):
    from entmax import entmax15

    logits, p = quick_start["logits"], quick_start["p"]
    assert p.shape == logits.shape == (4, 10, 32000)
    torch.testing.assert_close(p, entmax15(logits, dim=-1), atol=1e-5, rtol=0)  # "= entmax15(logits)"
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 10), atol=1e-5, rtol=0)
    support = (p > 0).sum(-1)  # "support size per token": exact zeros, a small support
    assert bool((support >= 1).all()) and int(support.max()) < 32000 // 100
    reference_support = (entmax15(logits.double(), dim=-1) > 0).sum(-1)
    assert bool(((support - reference_support).abs() <= 1).all())


def test_quick_start_losses(quick_start):
    from entmax import Entmax15Loss

    from hf_fdiv import FDivLoss, causal_lm_fdiv_loss, f_softmax, fdiv_loss

    ns = quick_start
    logits, labels = ns["logits"], ns["labels"]
    flat, flat_labels = logits.flatten(0, 1), labels.flatten()
    # alpha = 1.5 with unit q is the entmax-1.5 Fenchel-Young loss
    expected = Entmax15Loss(k=None, reduction="elementwise_mean")(flat, flat_labels)
    torch.testing.assert_close(ns["loss"], expected, atol=1e-4, rtol=1e-5)
    # KL is cross-entropy (the block asserts it; checked here once more, outside the block)
    kl = fdiv_loss(logits, labels, "kl")
    torch.testing.assert_close(kl, F.cross_entropy(flat, flat_labels), atol=1e-5, rtol=1e-5)
    # causal LM convention: shifted labels, sum / num_items_in_batch
    shifted = fdiv_loss(logits[:, :-1], labels[:, 1:], "js", reduction="sum") / 37
    torch.testing.assert_close(causal_lm_fdiv_loss(logits, labels, num_items_in_batch=37, divergence="js"), shifted)
    # a [V] prior with KL: "= CE(logits + log prior)" (shifted, mean over the tokens)
    prior = ns["prior"]
    ce = F.cross_entropy((logits[:, :-1] + prior.log()).flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(ns["lm_loss"], ce, atol=1e-5, rtol=1e-5)
    # the nn.Module wrapper is fdiv_loss
    criterion = ns["criterion"]
    assert isinstance(criterion, FDivLoss) and isinstance(criterion, torch.nn.Module)
    torch.testing.assert_close(criterion(logits, labels), fdiv_loss(logits, labels, "chi2", reduction="sum"))
    # f_softmax: one value per token, and "its gradient is p"
    assert ns["value"].shape == (4, 10)
    a = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f_softmax(a, "alpha:1.5").sum(), a)
    torch.testing.assert_close(grad, ns["p"], atol=1e-6, rtol=0)


def test_custom_divergence_is_softmax():
    from hf_fdiv import FDivergence

    ns = run_block(block_with("from_functions"), "custom divergence", seed=0)
    assert isinstance(ns["my_kl"], FDivergence)
    torch.manual_seed(0)
    x = torch.randn(2, 5)  # the block's inline torch.randn(2, 5), replayed from the same seed
    torch.testing.assert_close(ns["p"], torch.softmax(x, -1), atol=1e-6, rtol=0)  # "= softmax"
