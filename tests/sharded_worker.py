"""Worker for tests/test_sharded.py: a few SGD steps of the hf_fdiv trainers under a sharding engine.

    accelerate launch --config_file examples/accelerate_configs/cpu_<engine>.yaml tests/sharded_worker.py OUT ENGINE CASES
    python tests/sharded_worker.py OUT single CASES          # the 1-process reference, same global batch

ENGINE names the layout: ddp, fsdp1_orig, fsdp1_flat, fsdp2, fsdp2_manual (the model is sharded by hand
with ``fully_shard(..., reshard_after_forward=True)`` before the trainer sees it), zero2, zero3,
zero3_init (ZeRO-3 with ``zero3_init_flag``: the models are built from ``from_pretrained`` inside
``deepspeed.zero.Init``, partitioned as they load). CASES is a comma-separated list of
sft_alpha (FDivSFTTrainer, alpha:1.5, fused), sft_kl (kl, fused), distill_target, distill_reference
(FDivDistillationTrainer, js, fused, in each teacher mode), distill_topk (no teacher in memory: the
teacher's top-16 log-probabilities stored with hf_fdiv.add_teacher_topk, as `hf-fdiv teacher-topk` does).

accelerate 1.15 runs FSDP / DeepSpeed only on an accelerator: with ``use_cpu`` it silently falls back
to DDP, without it it stops ("There are currently no available devices found"). For ``fsdp*`` /
``zero*`` the worker therefore makes accelerate take gloo on CPU (``PartialState._prepare_backend``
patched to ``("gloo", MULTI_GPU)``, ``ACCELERATE_TORCH_DEVICE=cpu``): the engines then run for real,
and the worker checks that they did (the prepared model is an FSDP / FSDPModule / DeepSpeedEngine).

Each case writes ``OUT/<case>-<engine>.pt`` on rank 0: the losses logged at each step and the full
(gathered) parameters, or ``{"error": ...}`` when the case raised. A failing case does not stop the
next ones (every rank fails at the same point, so the collectives stay matched).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

ENGINES = ("single", "ddp", "fsdp1_orig", "fsdp1_flat", "fsdp2", "fsdp2_manual", "zero2", "zero3", "zero3_init")
CASES = ("sft_alpha", "sft_kl", "distill_target", "distill_reference", "distill_topk")
#: the global batch (both runs), the steps and the learning rate
GLOBAL_BATCH, STEPS, LR, N_ROWS = 8, 3, 0.5, 24


def force_engines_on_cpu() -> None:
    """Let accelerate run FSDP / DeepSpeed with gloo on CPU (see the module docstring)."""
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_GPU)


def check_engine(engine: str, model) -> None:
    """Fail loudly when accelerate did not wrap the model with the engine asked for (silent DDP)."""
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert isinstance(model, FSDP), f"{engine}: the prepared model is a {type(model).__name__}, not FSDP"
        assert model._use_orig_params is (engine == "fsdp1_orig"), "use_orig_params was not applied"
    elif engine.startswith("fsdp2"):
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(model, FSDPModule), f"{engine}: the prepared model is a {type(model).__name__}, not FSDP2"
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
        assert type(head.weight).__name__ == "DTensor", f"{engine}: the LM head is not sharded"
    elif engine.startswith("zero"):
        from deepspeed import DeepSpeedEngine

        assert isinstance(model, DeepSpeedEngine), f"{engine}: the prepared model is a {type(model).__name__}"
        stage = model.zero_optimization_stage()
        assert stage == (2 if engine == "zero2" else 3), f"{engine}: ZeRO stage {stage}"
        if engine != "zero2":
            head = model.module.get_output_embeddings().weight
            assert hasattr(head, "ds_id") and head.numel() == 0, f"{engine}: the LM head is not partitioned"
    elif engine == "ddp":
        assert isinstance(model, __import__("torch").nn.parallel.DistributedDataParallel)


def check_teacher(engine: str, teacher) -> None:
    """The teacher is sharded like the student (FSDP / ZeRO-3), not a full copy on every process."""
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert isinstance(teacher, FSDP), f"{engine}: the teacher is a {type(teacher).__name__}, not FSDP"
    elif engine.startswith("fsdp2"):
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(teacher, FSDPModule), f"{engine}: the teacher is a {type(teacher).__name__}, not FSDP2"
    elif engine.startswith("zero3"):
        from deepspeed import DeepSpeedEngine

        assert isinstance(teacher, DeepSpeedEngine), f"{engine}: the teacher is a {type(teacher).__name__}"
        head = teacher.module.get_output_embeddings().weight
        assert hasattr(head, "ds_id") and head.numel() == 0, f"{engine}: the teacher's head is not partitioned"
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher has trainable parameters"
    inner = teacher.module if hasattr(teacher, "module") else teacher
    assert not any(m.training for m in inner.modules()), "the teacher is in training mode (dropout on)"


class FusedSpy:
    """Counts the calls of hf_fdiv.fused.fused_linear_fdiv_loss (wherever hf_fdiv imported it), so that a
    silent fall-back to the materialised logits cannot pass for the fused loss."""

    _installed = None

    @classmethod
    def install(cls) -> "FusedSpy":
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def __init__(self):
        import hf_fdiv.fused
        import hf_fdiv.trainers.distillation_trainer  # noqa: F401  (every hf_fdiv module imported first)

        self.calls = 0
        original = hf_fdiv.fused.fused_linear_fdiv_loss

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        for name, module in list(sys.modules.items()):
            if name.startswith("hf_fdiv") and getattr(module, "fused_linear_fdiv_loss", None) is original:
                module.fused_linear_fdiv_loss = spy


def hand_sharded(model):
    """What a user does with FSDP2 by hand: each decoder layer, then the root, all resharded after
    forward (the root holds the embeddings, the final norm and the LM head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model


def full_state_dict(trainer, engine: str) -> dict:
    """The full parameters on rank 0 (a collective: every rank calls it)."""
    import torch

    model = trainer.model_wrapped
    if engine.startswith("fsdp"):
        # torch's own gathering for FSDP1 and FSDP2 (accelerate's get_state_dict offloads FSDP1's full
        # state dict to the CPU, which crashes when the parameters already live there)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    elif engine.startswith("zero3"):
        sd = trainer.accelerator.get_state_dict(model)  # gathered on rank 0 (zero3_save_16bit_model)
    else:
        sd = trainer.accelerator.unwrap_model(model).state_dict()
    if not trainer.accelerator.is_main_process:
        return {}
    return {k.replace("_orig_mod.", ""): v.detach().float().cpu().clone() for k, v in sd.items()
            if torch.is_tensor(v)}


def build_models(tok, engine: str, saved: str):
    """(student, teacher). Under zero3_init: their paths in ``saved`` (see :func:`save_models`), to be
    loaded with from_pretrained once the trainer config has made ZeRO-3 init active."""
    from tiny import make_model

    if engine == "zero3_init":
        return os.path.join(saved, "student"), os.path.join(saved, "teacher")
    return make_model(tok), make_model(tok, hidden=32, seed=1)


def save_models(saved: str) -> None:
    """The tiny student and teacher with save_pretrained, once per process and before anything
    distributed starts (later, with ZeRO-3 configured, only the main process would write them)."""
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    make_model(tok).save_pretrained(os.path.join(saved, "student"))
    make_model(tok, hidden=32, seed=1).save_pretrained(os.path.join(saved, "teacher"))


def load_partitioned(path: str):
    """from_pretrained inside deepspeed.zero.Init (transformers does it while the trainer config with
    ZeRO-3 and zero3_init_flag is alive): the weights are partitioned as they load."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert is_deepspeed_zero3_enabled(), "zero3_init: the HF DeepSpeed config is not active"
    model = AutoModelForCausalLM.from_pretrained(path)
    head = model.get_output_embeddings().weight
    assert hasattr(head, "ds_id") and head.numel() == 0, "zero3_init: from_pretrained did not partition"
    return model


def run_case(out: str, engine: str, case: str, saved: str) -> dict:
    from hf_fdiv import FDivDistillationConfig, FDivDistillationTrainer, FDivSFTConfig, FDivSFTTrainer
    from tiny import SFT_COMMON, make_tokenizer, messages_dataset

    single = engine == "single"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spy = FusedSpy.install()
    spy.calls = 0
    tok = make_tokenizer()
    common = dict(SFT_COMMON)
    common.update(
        output_dir=os.path.join(out, f"run-{case}-{engine}"), per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=1.0,
        use_cpu=single or engine == "ddp", ddp_timeout=300,
    )
    distill = case.startswith("distill")
    config_cls = FDivDistillationConfig if distill else FDivSFTConfig
    if distill:
        common.update(divergence="js", teacher_mode="reference" if case == "distill_reference" else "target")
    else:
        common.update(divergence="alpha:1.5" if case == "sft_alpha" else "kl")
    student, teacher = build_models(tok, engine, saved)
    if not distill:
        teacher = None
    data = messages_dataset(N_ROWS)
    if case == "distill_topk":  # computed under the engine (the teacher sharded like the student), as
        # `hf-fdiv teacher-topk` does under accelerate launch; the 1-process run uses the plain teacher
        from accelerate import Accelerator

        from hf_fdiv import add_teacher_topk
        from tiny import make_model, tokenized_lm_dataset

        topk_teacher = make_model(tok, hidden=32, seed=1)
        data = add_teacher_topk(tokenized_lm_dataset(tok, N_ROWS), topk_teacher, k=16, pad_token_id=tok.pad_token_id,
                                accelerator=None if single else Accelerator())
        teacher = None
    args = config_cls(**common)
    if engine == "zero3_init":
        student = load_partitioned(student)
        teacher = load_partitioned(teacher) if teacher is not None else None
    if engine == "fsdp2_manual":
        student = hand_sharded(student)
        if teacher is not None:
            teacher = hand_sharded(teacher)
    if distill:
        tr = FDivDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                     processing_class=tok)
    else:
        tr = FDivSFTTrainer(model=student, args=args, train_dataset=data, processing_class=tok)
    assert tr.args.fdiv_fused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train()
    check_engine(engine, tr.model_wrapped if engine != "single" else tr.model)
    if teacher is not None:
        check_teacher(engine, tr.teacher_model)
    elif distill:
        assert tr.teacher_model is None
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == STEPS, tr.state.log_history
    params = full_state_dict(tr, engine)
    return {"losses": losses, "params": params, "world": tr.accelerator.num_processes, "fused_calls": spy.calls,
            "hf_fdiv_warnings": sorted({str(w.message) for w in caught if "hf_fdiv" in str(w.message)}),
            "distributed_type": str(tr.accelerator.distributed_type)}


def main(out: str, engine: str, cases: str) -> None:
    from launch import arm_hang_dump

    arm_hang_dump()  # a hung rank prints its stacks and exits before the launcher's timeout
    if engine not in ENGINES:
        raise SystemExit(f"unknown engine {engine!r}; one of {ENGINES}")
    if engine not in ("single", "ddp"):
        force_engines_on_cpu()
    import torch

    rank = int(os.environ.get("RANK", "0"))
    unknown = set(cases.split(",")) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {CASES}")
    saved = tempfile.mkdtemp(prefix="sharded-models-")
    if engine == "zero3_init":
        save_models(saved)
    for case in cases.split(","):
        try:
            result = run_case(out, engine, case, saved)
        except Exception as err:  # noqa: BLE001 - recorded for the test, which fails with it
            tb = traceback.format_exc()
            print(f"[rank {rank}] {case}/{engine} FAILED:\n{tb}", file=sys.stderr, flush=True)
            result = {"error": f"{type(err).__name__}: {err}", "traceback": tb[-4000:]}
        if rank == 0:
            torch.save(result, os.path.join(out, f"{case}-{engine}.pt"))
        print(f"[rank {rank}] {case}/{engine}: {'error' if 'error' in result else 'ok'}", flush=True)
    shutil.rmtree(saved, ignore_errors=True)
    from hf_fdiv import finish_distributed

    finish_distributed()  # leave together, close the group safely (issue 26; the trainers are gone by now)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
