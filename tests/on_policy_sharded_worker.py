"""Worker for tests/test_on_policy_sharded.py: FDivOnPolicyDistillationTrainer (alpha:1.5, greedy
completions) for a few SGD steps under an engine, or in one process on the same global batch.

    accelerate launch --config_file examples/accelerate_configs/cpu_fsdp2.yaml tests/on_policy_sharded_worker.py OUT fsdp2
    python tests/on_policy_sharded_worker.py OUT single

FSDP runs on CPU with gloo the way tests/sharded_worker.py makes it (``force_engines_on_cpu``). Rank 0
writes ``OUT/on_policy-<engine>.pt``: the losses logged at each step and the full parameters.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

GLOBAL_BATCH, STEPS, LR = 8, 2, 0.5


def main(out: str, engine: str) -> None:
    from sharded_worker import check_engine, force_engines_on_cpu, full_state_dict

    if engine != "single":
        force_engines_on_cpu()
    import torch
    from datasets import Dataset

    from hf_fdiv import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer
    from tiny import COMMON, SENTENCES, make_model, make_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = make_tokenizer()
    args = FDivOnPolicyDistillationConfig(
        **dict(COMMON, output_dir=tempfile.mkdtemp(prefix="on-policy-"),
               per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS, learning_rate=LR, optim="sgd",
               lr_scheduler_type="constant", max_completion_length=8,
               activation_checkpointing=False, generation_kwargs={"do_sample": False}, divergence="alpha:1.5",
               use_cpu=engine == "single", shuffle_dataset=False),
    )
    trainer = FDivOnPolicyDistillationTrainer(
        model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1), args=args,
        train_dataset=Dataset.from_dict({"prompt": [s[:9] for s in SENTENCES[:8]]}), processing_class=tok)
    trainer.train()
    if engine != "single":
        check_engine(engine, trainer.model_wrapped)  # the student is sharded (TRL keeps a whole teacher per process)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = full_state_dict(trainer, engine)
    if trainer.accelerator.is_main_process:
        torch.save({"losses": losses, "params": params, "world": trainer.accelerator.num_processes},
                   os.path.join(out, f"on_policy-{engine}.pt"))
    from hf_fdiv import finish_distributed

    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
