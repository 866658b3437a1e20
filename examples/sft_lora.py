"""LoRA fine-tuning with the alpha = 1.5 loss: FDivSFTTrainer + a peft LoraConfig.

    python examples/sft_lora.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset_name trl-lib/Capybara --output_dir smollm2-lora-fdiv --lora_r 16 --lora_target_modules all-linear

Tiny mode: python examples/tiny_assets.py /tmp/tiny && python examples/sft_lora.py \\
    --model_name_or_path /tmp/tiny/student --dataset_name /tmp/tiny/data --output_dir /tmp/tiny/lora \\
    --max_steps 2 --report_to none \\
    --lora_target_modules q_proj v_proj
"""

from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser

from hf_fdiv import FDivSFTConfig, FDivSFTTrainer, finish_distributed
from hf_fdiv.cli import load_any_dataset


def main(script_args, training_args, model_args):
    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    targets = model_args.lora_target_modules or "all-linear"
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    trainer = FDivSFTTrainer(model=model_args.model_name_or_path, args=training_args,
                             train_dataset=dataset[script_args.dataset_train_split], peft_config=lora)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    # The adapter reloads on top of the base model and generates.
    tok = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path),
                                      training_args.output_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    print("adapter saved to", training_args.output_dir, "| sample:",
          repr(tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)))
    finish_distributed(trainer)  # under `accelerate launch`: leave together, close the group (README, Multi-GPU)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, FDivSFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
