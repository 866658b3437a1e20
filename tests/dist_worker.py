"""Worker for the 2-process test and `make test-soak`: one optimizer step of FDivSFTTrainer or
FDivDistillationTrainer, launched by accelerate (2 CPU processes, gloo) or run alone; rank 0 saves the
parameters. It ends as the README's multi-process recipe says: ``finish_distributed(trainer)``."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import torch  # noqa: E402

from hf_fdiv import (  # noqa: E402
    FDivDistillationConfig,
    FDivDistillationTrainer,
    FDivSFTConfig,
    FDivSFTTrainer,
    finish_distributed,
)
from launch import arm_hang_dump  # noqa: E402
from tiny import SFT_COMMON, make_model, make_tokenizer, messages_dataset  # noqa: E402


def main(out: str, which: str, per_device: int) -> None:
    arm_hang_dump()  # a hung rank prints its stacks and exits before the launcher's timeout
    tok = make_tokenizer()
    common = dict(SFT_COMMON)
    common.update(output_dir=out, per_device_train_batch_size=per_device, max_steps=1, learning_rate=0.5,
                  optim="sgd", use_cpu=True)
    if which == "sft":
        tr = FDivSFTTrainer(model=make_model(tok), args=FDivSFTConfig(divergence="alpha:1.5", **common),
                            train_dataset=messages_dataset(16), processing_class=tok)
    else:
        tr = FDivDistillationTrainer(model=make_model(tok), teacher_model=make_model(tok, hidden=32, seed=1),
                                     args=FDivDistillationConfig(divergence="js", **common),
                                     train_dataset=messages_dataset(16), processing_class=tok)
    tr.train()
    if tr.accelerator.is_main_process:
        model = tr.accelerator.unwrap_model(tr.model)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(out, f"params-{tr.accelerator.num_processes}.pt"))
    finish_distributed(tr)  # the README's last line of a multi-process script (issue 26)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
