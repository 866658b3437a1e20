"""Distil a teacher into a student with an f-divergence loss, save it with its model card, and push
it to the Hub with --push_to_hub. The push needs the Hub: offline, --push_to_hub stops the script before
training (HubUnavailableError, naming the flag); without the flag the student is only saved locally.

    python examples/distill_and_push.py --model_name_or_path <student> \\
        --teacher_model_name_or_path <teacher> --dataset_name <data> --output_dir my-student \\
        --divergence alpha:1.5 --teacher_mode target --temperature 1.0 [--push_to_hub --hub_model_id me/my-student]

Tiny mode: python examples/tiny_assets.py /tmp/tiny && python examples/distill_and_push.py \\
    --model_name_or_path /tmp/tiny/student --teacher_model_name_or_path /tmp/tiny/teacher \\
    --dataset_name /tmp/tiny/data --output_dir /tmp/tiny/distilled --max_steps 2 --report_to none
"""

from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from hf_fdiv import FDivDistillationConfig, FDivDistillationTrainer, finish_distributed
from hf_fdiv.cli import load_any_dataset


def main(script_args, training_args, model_args):
    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_config)
    trainer = FDivDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path),
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        processing_class=AutoTokenizer.from_pretrained(model_args.model_name_or_path, padding_side="left"),
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    card = ModelCard.load(f"{training_args.output_dir}/README.md")
    print(f"saved to {training_args.output_dir}; card: teacher={training_args.teacher_model_name_or_path}, "
          f"mode={training_args.teacher_mode}, divergence={training_args.divergence}, tags={card.data.tags}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    finish_distributed(trainer)  # under `accelerate launch`: leave together, close the group (README, Multi-GPU)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, FDivDistillationConfig, ModelConfig))
    main(*parser.parse_args_and_config())
