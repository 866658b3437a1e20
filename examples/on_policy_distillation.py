"""On-policy distillation with an f-divergence loss: TRL's own recipe (``trl/scripts/distillation.py``,
``trl distillation``) with two names changed, ``DistillationTrainer`` -> ``FDivOnPolicyDistillationTrainer``
and ``DistillationConfig`` -> ``FDivOnPolicyDistillationConfig``. The same flags work (``beta`` now
defaults to 0 and the loss is chosen with ``--divergence``, default ``alpha:1.5``; ``kl`` is TRL's
``--beta 0``).

    python examples/on_policy_distillation.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name trl-lib/ultrafeedback-prompt \\
        --learning_rate 2e-5 --output_dir Qwen2.5-0.5B-FDivDistillation [--divergence alpha:1.5] [--use_peft]

Tiny mode: python examples/tiny_assets.py /tmp/tiny && python examples/on_policy_distillation.py \\
    --model_name_or_path /tmp/tiny/student --teacher_model_name_or_path /tmp/tiny/teacher \\
    --dataset_name /tmp/tiny/prompts --output_dir /tmp/tiny/on-policy --max_steps 2 \\
    --max_completion_length 8 --report_to none
"""

from datasets import load_dataset
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset, get_peft_config
from trl import get_quantization_config

from hf_fdiv import FDivOnPolicyDistillationConfig, FDivOnPolicyDistillationTrainer


def init_kwargs(model_args, training_args, revision, extra):
    """``from_pretrained`` keywords from the model flags, then the config's own dict on top (as TRL's script)."""
    kwargs = dict(revision=revision, trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs.update(extra or {})
    return kwargs


def main(script_args, training_args, model_args, dataset_args):
    if training_args.teacher_model_name_or_path is None:
        raise SystemExit("on-policy distillation needs a teacher: pass --teacher_model_name_or_path.")
    # the student's quantization goes to the trainer (not model_init_kwargs); the teacher stays unquantized
    training_args.model_init_kwargs = init_kwargs(
        model_args, training_args, model_args.model_revision, training_args.model_init_kwargs)
    training_args.teacher_model_init_kwargs = init_kwargs(
        model_args, training_args, training_args.teacher_model_revision, training_args.teacher_model_init_kwargs)
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                               streaming=script_args.dataset_streaming)
    else:
        raise SystemExit("give the prompts with --dataset_name (or a --datasets mixture).")
    evaluating = training_args.eval_strategy != "no"
    trainer = FDivOnPolicyDistillationTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluating else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model and card saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # finish the trackers, leave together, close the process group (transformers >= 5.18)


def make_parser():
    return TrlParser((ScriptArguments, FDivOnPolicyDistillationConfig, ModelConfig, DatasetMixtureConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config(fail_with_unknown_args=False))
