"""A small paper-style study: which f-divergence loss trains a small LM best on real shipped text?

    python examples/study.py                      # default mode (< 15 min on 2 CPU cores)
    python examples/study.py --tiny               # seconds; what CI runs
    python examples/study.py --steps 600 --seeds 3 --output_dir study_output

Data: the English conversations of the ``chatterbot-corpus`` wheel (user turn -> assistant turn),
split into train / held-out conversations; a byte-level BPE tokenizer (vocabulary 1024) is trained
in-process on the training split. Every run uses the same model (a small Qwen2 trained from
scratch), initialisation, data order, budget and seeds; only the loss changes:

* SFT with ``kl`` (cross-entropy), ``alpha:1.5``, ``chi2``, ``js`` and ``reverse_kl`` (unit reference);
* distillation from a larger teacher trained with KL on the same data: the teacher as target
  (``alpha:1.5``, and ``kl`` = classic KD) and the teacher as reference measure (``alpha:1.5``).

Held-out metrics on the assistant tokens (:mod:`hf_fdiv.metrics`): token accuracy, epsilon-perplexity
(eps = 1e-6), support size of the model's own f-softargmax, and the rate of targets it gives p = 0.
Writes ``results.json``, ``results.md`` and ``study.png`` in ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_fdiv import FDivDistillationConfig, FDivDistillationTrainer, FDivSFTConfig, FDivSFTTrainer  # noqa: E402
from hf_fdiv.assets import chatterbot_conversations  # noqa: E402
from hf_fdiv.metrics import sparse_safe_metrics  # noqa: E402

SFT_LOSSES = ["kl", "alpha:1.5", "chi2", "js", "reverse_kl"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_for(texts, vocab_size):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def model_for(tok, hidden, layers, seed):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    ))


def rows(conversations):
    return [{"prompt": [{"role": "user", "content": c[0]}], "completion": [{"role": "assistant", "content": c[1]}]}
            for c in conversations]


def common_args(args, out, seed):
    return dict(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
                logging_steps=max(1, args.steps // 20), save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                activation_checkpointing=False, disable_tqdm=not args.progress, max_length=96, seed=seed)


def evaluate(model, eval_ds, divergence, teacher=None, batch_size=32):
    """Held-out sparse-safe metrics; with ``teacher`` the predictor is f-softargmax(student; q_teacher)."""
    model.eval()
    logits_all, labels_all, refs = [], [], []
    for a in range(0, len(eval_ds), batch_size):
        batch = eval_ds[a : a + batch_size]
        L = max(len(x) for x in batch["input_ids"])
        ids = torch.zeros((len(batch["input_ids"]), L), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch["input_ids"]):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(x)] = torch.tensor(batch["labels"][i])
            mask[i, : len(x)] = 1
        with torch.no_grad():
            s = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            valid = target != -100
            logits_all.append(s[valid])
            labels_all.append(target[valid])
            if teacher is not None:
                t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                refs.append(torch.softmax(t[valid], -1).clamp(min=1e-12))
    x, y = torch.cat(logits_all), torch.cat(labels_all)
    reference = torch.cat(refs) if refs else "unit"
    return sparse_safe_metrics(x, y, divergence, reference, shift=False)


def run_study(args):
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    conversations = chatterbot_conversations()
    random.Random(0).shuffle(conversations)
    n_eval = args.eval_conversations
    train_conv, eval_conv = conversations[n_eval : n_eval + args.train_conversations], conversations[:n_eval]
    tok = tokenizer_for([t for c in train_conv for t in c[:2]], args.vocab_size)
    results = {}
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        prep = FDivSFTTrainer(model=model_for(tok, 16, 1, 0), processing_class=tok,
                              train_dataset=Dataset.from_list(rows(train_conv)),
                              eval_dataset=Dataset.from_list(rows(eval_conv)),
                              args=FDivSFTConfig(**common_args(args, tmp, 0)))
        train_ds, eval_ds = prep.train_dataset, prep.eval_dataset
        for seed in range(args.seeds):
            for name in SFT_LOSSES:
                tr = FDivSFTTrainer(model=model_for(tok, args.hidden, args.layers, seed), processing_class=tok,
                                    train_dataset=train_ds, args=FDivSFTConfig(divergence=name, **common_args(args, tmp, seed)))
                tr.train()
                results.setdefault(f"SFT {name}", []).append(evaluate(tr.model, eval_ds, name))
                curves.setdefault(f"SFT {name}", [h["loss"] for h in tr.state.log_history if "loss" in h])
                print(f"  seed {seed} SFT {name}: {results[f'SFT {name}'][-1]}", flush=True)
            # distillation variant: a larger teacher trained with KL on the same data and budget
            teacher_tr = FDivSFTTrainer(model=model_for(tok, 2 * args.hidden, args.layers, 100 + seed),
                                        processing_class=tok, train_dataset=train_ds,
                                        args=FDivSFTConfig(divergence="kl", **common_args(args, tmp, seed)))
            teacher_tr.train()
            teacher = teacher_tr.model.eval()
            results.setdefault("teacher (KL, 2x wider)", []).append(evaluate(teacher, eval_ds, "kl"))
            for label, name, mode in [("distil alpha:1.5, teacher as target", "alpha:1.5", "target"),
                                      ("distil kl, teacher as target (KD)", "kl", "target"),
                                      ("distil alpha:1.5, teacher as reference", "alpha:1.5", "reference")]:
                tr = FDivDistillationTrainer(
                    model=model_for(tok, args.hidden, args.layers, seed), teacher_model=teacher, processing_class=tok,
                    train_dataset=train_ds, args=FDivDistillationConfig(divergence=name, teacher_mode=mode,
                                                                        **common_args(args, tmp, seed)))
                tr.train()
                res = evaluate(tr.model, eval_ds, name, teacher if mode == "reference" else None)
                results.setdefault(label, []).append(res)
                curves.setdefault(label, [h["loss"] for h in tr.state.log_history if "loss" in h])
                print(f"  seed {seed} {label}: {res}", flush=True)
    wall = time.perf_counter() - t0
    return summarise(results, curves, args, wall, len(train_conv), len(eval_conv), len(tok))


def summarise(results, curves, args, wall, n_train, n_eval, vocab):
    def agg(key, name):
        vals = [r[key] for r in results[name]]
        mean = statistics.fmean(vals)
        spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
        return mean, spread

    lines = ["| run | token accuracy | eps-perplexity | support size | targets with p = 0 |", "|---|---:|---:|---:|---:|"]
    for name in results:
        acc, pm = agg("token_accuracy", name)
        ppl, ppl_pm = agg("eps_perplexity", name)
        sup, _ = agg("support_size", name)
        zero, _ = agg("zero_prob_rate", name)
        lines.append(f"| {name} | {acc:.3f} ± {pm:.3f} | {ppl:.1f} ± {ppl_pm:.1f} | {sup:.1f} | {zero:.3f} |")
    table = "\n".join(lines)
    os.makedirs(args.output_dir, exist_ok=True)
    header = (f"{n_train} train / {n_eval} held-out conversations, BPE vocabulary {vocab}, Qwen2 {args.layers} layers x "
              f"{args.hidden} hidden, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds} "
              f"(mean ± half-range), wall time {wall:.0f} s")
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(header + "\n\n" + table + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump({"results": results, "args": vars(args), "wall_seconds": wall}, fh, indent=2)
    plot(results, curves, os.path.join(args.output_dir, "study.png"))
    print(header)
    print(table)
    return {"table": table, "results": results, "wall_seconds": wall}


def plot(results, curves, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results)
    accs = [statistics.fmean(r["token_accuracy"] for r in results[n]) for n in names]
    axes[0].barh(range(len(names)), accs)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].set_xlabel("held-out token accuracy")
    for name, ys in curves.items():
        axes[1].plot(ys, label=name)
    axes[1].set_xlabel("logging step")
    axes[1].set_ylabel("training loss (own divergence)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few steps on a few conversations (CI)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab_size", type=int, default=1024)
    ap.add_argument("--train_conversations", type=int, default=1600)
    ap.add_argument("--eval_conversations", type=int, default=300)
    ap.add_argument("--output_dir", default="study_output")
    ap.add_argument("--progress", action="store_true", help="show the trainers' progress bars")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.seeds, args.train_conversations, args.eval_conversations = 4, 1, 64, 16
        args.hidden, args.vocab_size, args.batch_size = 16, 300, 8
    return run_study(args)


if __name__ == "__main__":
    main()
    sys.exit(0)
