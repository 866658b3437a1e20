"""Tiny tokenizer, models and data built in code (no downloads)."""

from __future__ import annotations

import string

from datasets import Dataset

from tiny_assets import CHAT_TEMPLATE, SPECIALS  # noqa: F401  (examples/tiny_assets.py, shared with the examples)
from tiny_assets import model as _model
from tiny_assets import tokenizer as _tokenizer

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "the sun is warm today.",
    "we like to read books.",
    "rain falls on the roof.",
    "birds sing in the morning.",
    "the tea is hot and sweet.",
    "she walks to the old mill.",
    "he paints the blue door.",
    "the river runs to the sea.",
    "a small boat sails away.",
    "the moon lights the hill.",
]


def make_tokenizer():
    """Character-level tokenizer, 106 ids, EOS <eos>, with a ChatML template marking assistant turns."""
    return _tokenizer(eos_token="<eos>")


def make_model(tok, hidden=16, layers=2, seed=0, vocab_size=None):
    return _model(tok, hidden=hidden, seed=seed, layers=layers, vocab_size=vocab_size)


def text_dataset(n=8) -> Dataset:
    return Dataset.from_dict({"text": [SENTENCES[i % len(SENTENCES)] * (1 + i % 3) for i in range(n)]})


def prompt_completion_dataset(n=8) -> Dataset:
    rows = [{"prompt": SENTENCES[i % 12][:10], "completion": SENTENCES[i % 12][10:]} for i in range(n)]
    return Dataset.from_list(rows)


def messages_dataset(n=8) -> Dataset:
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": SENTENCES[i % 12]},
            {"role": "assistant", "content": SENTENCES[(i + 5) % 12]},
        ]})
    return Dataset.from_list(rows)


def tokenized_lm_dataset(tok, n=8, max_length=64) -> Dataset:
    ds = text_dataset(n)
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])


COMMON = dict(
    report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False, disable_tqdm=True,
    dataloader_num_workers=0, seed=0, logging_steps=1,
)
SFT_COMMON = dict(COMMON, activation_checkpointing=False, max_length=64)


def docstring_lines(min_len=30, max_len=90):
    """Real English text available offline: docstrings of the standard library."""
    import argparse
    import collections
    import email
    import json
    import logging
    import pathlib
    import re
    import socket
    import tempfile
    import textwrap
    import unittest

    out = []
    for module in (collections, email, json, logging, pathlib, re, string, textwrap, unittest, argparse, socket, tempfile):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if isinstance(doc, str):
                for line in doc.splitlines():
                    line = line.strip()
                    if min_len <= len(line) <= max_len and line.isascii():
                        out.append(line)
    return list(dict.fromkeys(out))
