"""TRL's own SFT script, run with hf_fdiv's trainer: the only difference is the class swap below.

This file does not copy TRL's script: it imports ``trl/scripts/sft.py`` (its ``make_parser`` and
``main``) and runs it with ``FDivSFTTrainer`` / ``FDivSFTConfig`` in place of ``SFTTrainer`` /
``SFTConfig``, so every flag of TRL's script works, plus ``--divergence`` / ``--reference``.

    python examples/sft.py --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir Qwen2-0.5B-fdiv --divergence alpha:1.5 --learning_rate 2e-5 --push_to_hub
    # LoRA: add --use_peft --lora_r 32 --lora_alpha 16

Tiny mode (offline, what CI runs):

    python examples/tiny_assets.py /tmp/tiny
    python examples/sft.py --model_name_or_path /tmp/tiny/student --dataset_name /tmp/tiny/data \\
        --output_dir /tmp/tiny/sft --max_steps 2 --per_device_train_batch_size 4 --report_to none
"""

import trl

from hf_fdiv import FDivSFTConfig, FDivSFTTrainer

trl.SFTTrainer, trl.SFTConfig = FDivSFTTrainer, FDivSFTConfig  # the only change

from trl.scripts import sft  # noqa: E402

if __name__ == "__main__":
    parser = sft.make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    sft.main(script_args, training_args, model_args, dataset_args)
