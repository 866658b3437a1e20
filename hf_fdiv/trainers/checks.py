"""Checks run when a trainer is built, before any data preparation or training, so that a wrong
input stops at once with a message that says what was wrong and how to fix it.

* :func:`check_causal_lm`: the model must be a causal (next-token) language model;
* :func:`check_sft_columns`: the dataset must be in one of the formats SFT prepares;
* :func:`init_hub_repo`: ``push_to_hub`` needs the Hub reachable (checked when the trainer is built).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["ConfigurationError", "HubUnavailableError", "check_causal_lm", "check_sft_columns", "init_hub_repo"]


class ConfigurationError(ValueError):
    """A user input that cannot work (the message says what to change). The CLI prints it in one line."""


class HubUnavailableError(ConfigurationError):
    """``push_to_hub=True`` but the Hub cannot be reached: raised before training."""


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_causal_lm(model: Any, trainer_name: str) -> None:
    """Raise when ``model`` (a loaded transformers model) has no next-token LM head.

    Models that are not ``PreTrainedModel`` (a user's own ``nn.Module``) and names/paths (loaded by
    the trainer with ``AutoModelForCausalLM``) are not checked here."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = _base(model)
    if not isinstance(base, PreTrainedModel):
        return
    head = base.get_output_embeddings()
    if head is not None and base.can_generate():
        return
    arch = type(base).__name__
    if head is None:
        what = "it has no LM head (a bare backbone returns hidden states, not next-token logits)"
    else:
        what = "its head is not a next-token head (a masked-LM or classification head cannot generate)"
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    hint = ""
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        hint = f" For this architecture that is {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}."
    raise ConfigurationError(
        f"{trainer_name} trains causal language models, but got a {arch}: {what}. Load the model with "
        f"AutoModelForCausalLM.from_pretrained(...) (a decoder such as Llama, Qwen2 or SmolLM2), or pass its name or "
        f"path as `model=`.{hint}"
    )


def check_sft_columns(dataset: Any, args: Any, which: str, formatting_func=None) -> None:
    """Raise when a dataset given to an SFT-style trainer has none of the formats TRL prepares.

    Accepted: tokenized ``input_ids``; ``text`` (``dataset_text_field``); ``messages``;
    ``conversations`` (ShareGPT style, converted by TRL); ``prompt`` + ``completion``. Any columns are
    fine with a ``formatting_func`` or ``dataset_kwargs={"skip_prepare_dataset": True}``."""
    if dataset is None or formatting_func is not None:
        return
    if isinstance(dataset, dict):  # several eval datasets
        for name, part in dataset.items():
            check_sft_columns(part, args, f"{which}[{name!r}]", formatting_func)
        return
    if (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"):
        return
    columns = getattr(dataset, "column_names", None)
    if not columns:  # an IterableDataset whose features are unknown: TRL will tell
        return
    columns = list(columns)
    text_field = getattr(args, "dataset_text_field", "text") or "text"
    if {"input_ids", text_field, "messages", "conversations"} & set(columns):
        return
    if "prompt" in columns and "completion" in columns:
        return
    if "prompt" in columns:
        problem = "it has `prompt` but no `completion`"
    elif "completion" in columns:
        problem = "it has `completion` but no `prompt`"
    else:
        problem = "none of them is a format SFT prepares"
    example = ""
    if len(columns) >= 2:
        example = (f" For instance, if `{columns[0]}` is the input and `{columns[1]}` the answer: "
                   f"dataset.rename_columns({{'{columns[0]}': 'prompt', '{columns[1]}': 'completion'}}).")
    raise ConfigurationError(
        f"{which} has columns {columns}: {problem}. The accepted formats are `{text_field}` (plain text; set "
        f"dataset_text_field for another column name), `messages` (a list of {{'role', 'content'}} turns), `prompt` + "
        f"`completion` (the loss is on the completion), or tokenized `input_ids`. Rename or map your columns, or pass "
        f"formatting_func=.{example}"
    )


def _hub_reason(err: Optional[BaseException]) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    if err is None:
        return "unknown reason"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {text[:200]}"


def hub_unavailable(args: Any, err: Optional[BaseException] = None) -> HubUnavailableError:
    return HubUnavailableError(
        f"push_to_hub=True (--push_to_hub) but the Hugging Face Hub cannot be reached ({_hub_reason(err)}); stopped "
        f"before training, nothing was trained. Either drop --push_to_hub: the model and its card are saved to "
        f"{args.output_dir!r}, and you can upload them later with `hf upload <user>/<repo> {args.output_dir}`; or go "
        "online, log in (`hf auth login` or HF_TOKEN) and run again."
    )


def init_hub_repo(trainer, init_repo, *args, **kwargs) -> None:
    """Run the Trainer's ``init_hf_repo`` (called when the trainer is built with ``push_to_hub=True``),
    turning an offline Hub or a failed repository creation into one clear error."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise hub_unavailable(trainer.args)
    try:
        init_repo(*args, **kwargs)
    except Exception as err:  # network, authentication, permissions: all stop before training
        raise hub_unavailable(trainer.args, err) from err
