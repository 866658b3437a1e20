"""The paper's first domain, small: which f-divergence loss trains a classifier best, and what a class
prior as reference measure does on imbalanced labels.

    pip install --no-deps -r requirements-study.txt    # scikit-learn's wheel, for its bundled digits
    python examples/classification_study.py                 # 3 seeds, both datasets (48 runs of 150 steps)
    python examples/classification_study.py --tiny          # seconds; what CI runs

Data that ships inside packages, nothing downloaded:

* **digits**: the 1,797 8x8 handwritten digits in scikit-learn's wheel (``sklearn/datasets/data/digits.csv.gz``,
  read as a file: scikit-learn itself is never imported). A held-out test set of 30 % of every class;
  the training split keeps every image of digits 0-4 and 10 % of digits 5-9 (the rare classes). Model: a
  ResNet built in code (widths 16-32-64, two basic blocks).
* **topics**: the first turn of every chatterbot-corpus conversation labelled with its file's category
  (tech support, trivia, coding, AI, ...; categories with fewer than 15 conversations dropped), naturally
  imbalanced; 25 % of every class held out; the 5 smallest classes are the rare ones. Model: a BERT built
  in code (width 32, 2 layers) over a word-level tokenizer fitted on the training split.

Every run uses the same model, initialisation, data order and budget; only the loss changes:
``divergence`` in kl (cross-entropy), alpha:1.5, chi2, js, each with ``reference="unit"`` and
``reference="label_prior"``. Test metrics from p = f-softargmax(logits; q): accuracy (argmax p),
epsilon-NLL (eps = 1e-6), mean support size, recall on the rare classes (argmax p) and the same with the
prior taken out (argmax of the logits; with KL and the label prior this is logit adjustment).
Writes ``results.json``, ``results.md`` and ``study.png`` in ``--output_dir``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification
from transformers.utils import logging as hf_logging

from hf_fdiv import FDivTrainer, FDivTrainingArguments, f_softargmax
from hf_fdiv.assets import package_dir

DIVERGENCES = ["kl", "alpha:1.5", "chi2", "js"]
REFERENCES = ["unit", "label_prior"]
EPS = 1e-6


# ----------------------------------------------------------------------------------------------- data


def digits_data(seed: int = 0):
    """(train, test, rare classes): digits 5-9 keep 10 % of their training images."""
    root = package_dir("sklearn")
    path = os.path.join(root or "", "datasets", "data", "digits.csv.gz")
    if root is None or not os.path.exists(path):
        raise SystemExit("the digits ship in scikit-learn's wheel: pip install --no-deps -r requirements-study.txt")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    images, labels = table[:, :64].reshape(-1, 1, 8, 8) / 16.0, table[:, 64].astype(int)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(0.3 * len(idx)))
        test += list(idx[:n_test])
        keep = idx[n_test:]
        train += list(keep if c < 5 else keep[: max(1, len(keep) // 10)])

    def rows(idx):
        return Dataset.from_dict({"pixel_values": images[idx].astype("float32").tolist(),
                                  "labels": labels[idx].tolist()}).with_format("torch")

    return rows(np.array(train)), rows(np.array(test)), list(range(5, 10)), 10


def topics_data(seed: int = 0, max_len: int = 24):
    """(train, test, rare classes, C, vocabulary size) of chatterbot topic classification."""
    import yaml

    root = package_dir("chatterbot_corpus")
    if root is None:
        raise SystemExit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    texts = collections.defaultdict(list)
    for path in sorted(os.listdir(os.path.join(root, "data", "english"))):
        with open(os.path.join(root, "data", "english", path), encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        for conv in data.get("conversations") or []:
            if conv and isinstance(conv[0], str) and conv[0].strip():
                texts[os.path.splitext(path)[0]].append(conv[0].strip().lower())
    names = sorted(n for n, rows in texts.items() if len(rows) >= 15)
    rng = random.Random(seed)
    train, test = [], []
    for c, name in enumerate(names):
        rows = texts[name][:]
        rng.shuffle(rows)
        n_test = max(2, int(round(0.25 * len(rows))))
        test += [(t, c) for t in rows[:n_test]]
        train += [(t, c) for t in rows[n_test:]]
    words = collections.Counter(w for t, _ in train for w in re.findall(r"[a-z0-9']+", t))
    vocab = {w: i + 2 for i, (w, _) in enumerate(words.most_common(3000))}  # 0 pad, 1 unknown

    def encode(pairs):
        ids, masks = [], []
        for t, _ in pairs:
            row = [vocab.get(w, 1) for w in re.findall(r"[a-z0-9']+", t)][:max_len] or [1]
            ids.append(row + [0] * (max_len - len(row)))
            masks.append([1] * len(row) + [0] * (max_len - len(row)))
        return Dataset.from_dict({"input_ids": ids, "attention_mask": masks,
                                  "labels": [c for _, c in pairs]}).with_format("torch")

    counts = collections.Counter(c for _, c in train)
    rare = sorted(counts, key=lambda c: counts[c])[:5]
    return encode(train), encode(test), rare, len(names), len(vocab) + 2


def make_model(dataset: str, num_classes: int, vocab_size: int = 0):
    torch.manual_seed(0)  # the same initialisation for every loss and seed: only the data order varies
    if dataset == "digits":
        return ResNetForImageClassification(ResNetConfig(
            num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
            downsample_in_first_stage=False, num_labels=num_classes))
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_classes))


# ----------------------------------------------------------------------------------------------- runs


def evaluate(model, trainer, test, rare, divergence: str) -> dict:
    model.eval()
    batch = {k: v for k, v in test[:].items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits.double()
    y = test[:]["labels"]
    q = trainer.fdiv_reference
    p = f_softargmax(logits, divergence, q.double() if isinstance(q, torch.Tensor) else q)
    pred, pred_logits = p.argmax(-1), logits.argmax(-1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    is_rare = torch.isin(y, torch.tensor(rare))
    C = logits.shape[-1]
    return {
        "accuracy": float((pred == y).double().mean()),
        "eps_nll": float(-torch.log((p_y + EPS) / (1 + EPS * C)).mean()),
        "support": float((p > 0).double().sum(-1).mean()),
        "rare_recall": float((pred == y)[is_rare].double().mean()),
        "rare_recall_prior_removed": float((pred_logits == y)[is_rare].double().mean()),
    }


def run(dataset, data, divergence, reference, seed, steps, out_dir) -> dict:
    train, test, rare, C, vocab = data
    model = make_model(dataset, C, vocab)
    args = FDivTrainingArguments(
        output_dir=out_dir, divergence=divergence, reference=reference, max_steps=steps, learning_rate=3e-3,
        per_device_train_batch_size=32, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=seed,
        data_seed=seed, report_to="none", save_strategy="no", logging_steps=max(1, steps), disable_tqdm=True,
        use_cpu=True, bf16=False, dataloader_num_workers=0)
    trainer = FDivTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    return evaluate(model, trainer, test, rare, divergence)


def summarise(results: list) -> dict:
    table = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        for key, value in r["metrics"].items():
            table[(r["dataset"], r["divergence"], r["reference"])][key].append(value)
    return {k: {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in ms.items()}
            for k, ms in table.items()}


def write_markdown(summary: dict, path: str, seeds: int, steps: dict, seconds: float) -> None:
    cols = ["accuracy", "eps_nll", "support", "rare_recall", "rare_recall_prior_removed"]
    lines = [f"Mean ± std over {seeds} seed(s); {steps} optimizer steps; {seconds:.0f} s on "
             f"{torch.get_num_threads()} torch thread(s).", "",
             "| data | divergence | reference | accuracy | eps-NLL | support | rare recall | rare recall, prior removed |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (dataset, div, ref), ms in sorted(summary.items(), key=lambda kv: (kv[0][0], DIVERGENCES.index(kv[0][1]),
                                                                           kv[0][2] != "unit")):
        cells = [f"{ms[c][0]:.3f} ± {ms[c][1]:.3f}" if c != "support" else f"{ms[c][0]:.2f}" for c in cols]
        lines.append(f"| {dataset} | `{div}` | {ref} | " + " | ".join(cells) + " |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.2 * len(datasets)), squeeze=False)
    x = np.arange(len(DIVERGENCES))
    for row, dataset in enumerate(datasets):
        for col, metric in enumerate(["accuracy", "rare_recall"]):
            ax = axes[row][col]
            for i, ref in enumerate(REFERENCES):
                vals = [summary.get((dataset, d, ref), {}).get(metric, (float("nan"), 0.0)) for d in DIVERGENCES]
                ax.bar(x + (i - 0.5) * 0.38, [v[0] for v in vals], 0.38, yerr=[v[1] for v in vals], label=ref)
            ax.set_xticks(x, DIVERGENCES)
            ax.set_title(f"{dataset}: {metric.replace('_', ' ')} (test)")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="1 seed, alpha:1.5 with both references, 3 steps (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["digits", "topics"])
    parser.add_argument("--digits_steps", type=int, default=150)
    parser.add_argument("--topics_steps", type=int, default=150)
    parser.add_argument("--output_dir", default="classification_study")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    divergences, seeds = (["alpha:1.5"], 1) if args.tiny else (DIVERGENCES, args.seeds)
    steps = {"digits": 3 if args.tiny else args.digits_steps, "topics": 3 if args.tiny else args.topics_steps}
    os.makedirs(args.output_dir, exist_ok=True)
    start, results = time.time(), []
    loaders = {"digits": digits_data, "topics": topics_data}
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            for seed in range(seeds):
                data = loaders[dataset](seed)
                data = data if len(data) == 5 else (*data, 0)
                for div in divergences:
                    for ref in REFERENCES:
                        metrics = run(dataset, data, div, ref, seed, steps[dataset], scratch)
                        results.append({"dataset": dataset, "divergence": div, "reference": ref, "seed": seed,
                                        "metrics": metrics})
                        print(f"{dataset:7s} {div:10s} {ref:12s} seed {seed}: " + ", ".join(
                            f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    seconds = time.time() - start
    summary = summarise(results)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump({"results": results, "seconds": seconds, "steps": steps, "seeds": seeds,
                   "torch": torch.__version__}, fh, indent=1)
    write_markdown(summary, os.path.join(args.output_dir, "results.md"), seeds, steps, seconds)
    plot(summary, os.path.join(args.output_dir, "study.png"))
    print(open(os.path.join(args.output_dir, "results.md")).read())
    return summary


if __name__ == "__main__":
    main()
