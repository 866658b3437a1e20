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


# --------------------------------------------------------------------------------- tiny vision-language models
# Built in code (no download): a character-level tokenizer with the model family's image tokens, a chat
# template that renders TRL's multimodal messages, the family's processor, and a model from a small config.

VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}@IMAGE@{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vlm_tokenizer(image_specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIALS) + list(image_specials)
    vocab = {t: i for i, t in enumerate(specials + [c for c in string.printable])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:])


def _text_config(tok, hidden=16, **extra):
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra)


def _image_only_qwen_processor(processor_class):
    """A Qwen-VL processor (``processor_class``: Qwen2VLProcessor or Qwen3VLProcessor) for 32x32 images in
    8 px patches merged 2x2 (4 image tokens), built without a video processor: transformers' needs
    torchvision, so a subclass passes the image processor and the tokenizer only."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                                 temporal_patch_size=2),
        tokenizer=_vlm_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]),
        chat_template=VLM_CHAT_TEMPLATE.replace("@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>"),
    )


def make_qwen2_vl(seed=0):
    """(Qwen2VLForConditionalGeneration, processor): 32x32 images -> 4x4 patches of 8 px -> 4 image tokens
    (the processor: :func:`_image_only_qwen_processor`)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    processor = _image_only_qwen_processor(Qwen2VLProcessor)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=_text_config(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [1, 1, 0]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2VLForConditionalGeneration(config), processor


def make_llava(seed=0):
    """(LlavaForConditionalGeneration, processor): a CLIP vision tower (32x32 images, 8 px patches, the
    CLS feature dropped) and a Qwen2 text model; 16 image tokens per image."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _vlm_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=VLM_CHAT_TEMPLATE.replace("@IMAGE@", "<image>"),
    )
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=dict(model_type="qwen2", **_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config), processor


def vision_messages_dataset(n=4, size=32, seed=0) -> Dataset:
    """TRL's vision SFT format: ``messages`` (text content; TRL inserts the image in the first user turn)
    and ``images`` (one PIL image per row: a solid colour with noise, made in code)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rows = []
    for i in range(n):
        name = list(colours)[i % len(colours)]
        pixels = np.clip(np.array(colours[name]) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype("uint8")
        rows.append({
            "images": [Image.fromarray(pixels)],
            "messages": [{"role": "user", "content": "what colour is it?"},
                         {"role": "assistant", "content": f"it is {name}."}],
        })
    return Dataset.from_list(rows)


def make_qwen3_vl(seed=0):
    """(Qwen3VLForConditionalGeneration, processor): as :func:`make_qwen2_vl` (32x32 images, 8 px patches,
    4 image tokens), with Qwen3-VL's deepstack (vision features added to the first text layer)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    processor = _image_only_qwen_processor(Qwen3VLProcessor)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    text = _text_config(tok, head_dim=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [1, 1, 0], "mrope_interleaved": True})
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=16,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config), processor


def make_gemma3(seed=0):
    """(Gemma3ForConditionalGeneration, processor): a SigLIP vision tower (32x32 images, 8 px patches) pooled
    to 4 image tokens, bidirectional attention over them (``token_type_ids``), a Gemma 3 text model."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _vlm_tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    ids = tok.convert_tokens_to_ids
    tok.boi_token, tok.eoi_token, tok.image_token = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tok.boi_token_id, tok.image_token_id = ids("<start_of_image>"), ids("<image_soft_token>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                                chat_template=VLM_CHAT_TEMPLATE.replace("@IMAGE@", "<start_of_image>"),
                                image_seq_length=4)
    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config=_text_config(tok, head_dim=4, sliding_window=64, model_type="gemma3_text",
                                 layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False,
    )
    return Gemma3ForConditionalGeneration(config), processor


def params(model) -> dict:
    """A detached copy of every named parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(model) -> dict:
    """A detached copy of every parameter's gradient (parameters without one are left out)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two dicts of tensors with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def loss_and_grads(trainer, batch, **compute_loss_kwargs):
    """(the trainer's loss on ``batch``, its gradients), with the model's gradients zeroed before and after."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), **compute_loss_kwargs)
    loss.backward()
    gradients = grads(trainer.model)
    trainer.model.zero_grad()
    return float(loss.detach()), gradients


def first_batch_step(model, trainer, check_batch=None):
    """(loss of the first training batch, its gradients), then the parameters after one step of
    ``trainer.train()``: what the stock-oracle tests compare. ``check_batch(batch)`` may assert on it."""
    batch = next(iter(trainer.get_train_dataloader()))
    if check_batch is not None:
        check_batch(batch)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    gradients = grads(model)
    model.zero_grad()
    trainer.train()
    return float(loss.detach()), gradients, params(model)
