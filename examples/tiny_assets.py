"""Write tiny offline assets for the examples' tiny mode (what CI runs):

    python examples/tiny_assets.py /tmp/tiny
    # -> /tmp/tiny/student, /tmp/tiny/teacher (models + tokenizer), /tmp/tiny/data/train.jsonl (messages),
    #    /tmp/tiny/prompts/train.jsonl (prompts only)

Everything is built in code (a character-level tokenizer with a ChatML template, Qwen2 models with
hidden sizes 16 and 32): nothing is downloaded.
"""

import json
import os
import string
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAIRS = [
    ("hello", "hi there, how are you?"), ("what is the sun?", "a star close to us."),
    ("do you like tea?", "yes, hot and sweet."), ("where is the river?", "it runs to the sea."),
    ("what do birds do?", "they sing in the morning."), ("is it raining?", "rain falls on the roof."),
    ("tell me a joke", "a small boat sails away."), ("good night", "sleep well, friend."),
]


def tokenizer(eos_token: str = "<|im_end|>"):
    """Character-level tokenizer (106 ids) with a ChatML template that marks assistant turns."""
    chars = [c for c in string.printable if c not in SPECIALS]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos_token, bos_token="<bos>",
                                 unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def model(tok, hidden=16, seed=0, layers=2, vocab_size=None):
    """A tiny Qwen2 causal LM (untied head) for ``tok``."""
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    ))
    m.generation_config.pad_token_id = tok.pad_token_id
    m.generation_config.eos_token_id = tok.eos_token_id
    return m


def main(out: str) -> None:
    tok = tokenizer()
    for name, hidden, seed in (("student", 16, 0), ("teacher", 32, 1)):
        path = os.path.join(out, name)
        model(tok, hidden, seed).save_pretrained(path)
        tok.save_pretrained(path)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    with open(os.path.join(out, "data", "train.jsonl"), "w") as fh:
        for i in range(32):
            q, a = PAIRS[i % len(PAIRS)]
            fh.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    # prompts only, for on-policy distillation (the student writes the completions)
    os.makedirs(os.path.join(out, "prompts"), exist_ok=True)
    with open(os.path.join(out, "prompts", "train.jsonl"), "w") as fh:
        for i in range(32):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": PAIRS[i % len(PAIRS)][0]}]}) + "\n")
    print(f"tiny assets in {out}: student/, teacher/, data/train.jsonl, prompts/train.jsonl")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny_assets")
