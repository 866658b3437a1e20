"""Tiny in-code models and fixed batches for every kind of model whose stock loss is a class
cross-entropy (see hf_fdiv/trainers/tasks.py). Dropout is off so that the stock trainer and ours see the
same function; every example has the same length, so ``default_data_collator`` batches them."""

from __future__ import annotations

import torch
from datasets import Dataset

VOCAB = 40
SEQ = 10
N = 8
KINDS = ["sequence_classification", "token_classification", "masked_lm", "question_answering",
         "image_classification", "audio_classification", "semantic_segmentation", "t5", "bart", "causal_lm"]
SEQ2SEQ = ("t5", "bart")


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **extra)


def make_model(kind: str, seed: int = 0, **extra):
    """A tiny randomly initialised model of ``kind`` (seeded: the same weights for every call)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "sequence_classification":
        return tf.BertForSequenceClassification(_bert_config(num_labels=3, **extra))
    if kind == "token_classification":
        return tf.BertForTokenClassification(_bert_config(num_labels=5, **extra))
    if kind == "masked_lm":
        return tf.BertForMaskedLM(_bert_config(**extra))
    if kind == "question_answering":
        return tf.BertForQuestionAnswering(_bert_config(**extra))
    if kind == "causal_lm":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, **extra))
    if kind == "bert_lm_head":  # a causal LM whose head is not applied to the backbone's output directly
        return tf.BertLMHeadModel(_bert_config(is_decoder=True, **extra))
    if kind == "image_classification":
        return tf.ViTForImageClassification(tf.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, **extra))
    if kind == "audio_classification":
        return tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
            conv_stride=(4, 4), conv_kernel=(8, 8), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, classifier_proj_size=8, num_labels=3, hidden_dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
            layerdrop=0.0, mask_time_prob=0.0, **extra))
    if kind == "semantic_segmentation":
        model = tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
            num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
            patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
            drop_path_rate=0.0, num_labels=3, **extra))
        # the decode head's BatchNorm normalises over the micro-batch, so 4 x GA 2 cannot equal 8 x GA 1 whatever
        # the loss does: the accumulation tests need a model that is a function of each example alone
        model.decode_head.batch_norm = torch.nn.Identity()
        return model
    if kind == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra))
    if kind == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, **extra))
    raise ValueError(kind)


def make_dataset(kind: str, n: int = N, seed: int = 1, ignored: bool = True) -> Dataset:
    """``n`` examples of ``kind`` with some ignored targets (-100, or 255 pixels for segmentation when
    ``ignored``), so that the micro-batches of an accumulated batch hold different target counts."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    if kind in ("sequence_classification", "token_classification", "masked_lm", "question_answering", "causal_lm",
                "bert_lm_head", "t5", "bart"):
        rows["input_ids"] = ids
        rows["attention_mask"] = torch.ones(n, SEQ, dtype=torch.long)
    if kind in ("sequence_classification", "image_classification", "audio_classification"):
        rows["labels"] = torch.randint(0, 3, (n,), generator=g)
    if kind == "token_classification":
        labels = torch.randint(0, 5, (n, SEQ), generator=g)
        rows["labels"] = _ignore_some(labels, g, ignored)
    if kind in ("masked_lm", "causal_lm", "bert_lm_head"):
        rows["labels"] = _ignore_some(ids.clone(), g, ignored)
    if kind in SEQ2SEQ:
        rows["labels"] = _ignore_some(torch.randint(3, VOCAB, (n, 6), generator=g), g, ignored)
    if kind == "question_answering":
        rows["start_positions"] = torch.randint(0, SEQ, (n,), generator=g)
        rows["end_positions"] = torch.randint(0, SEQ, (n,), generator=g)
        if ignored:  # answers outside the input: the stock loss clamps them to T and ignores them
            rows["start_positions"][3::4] = SEQ + 5
            rows["end_positions"][3::4] = SEQ + 5
    if kind == "image_classification":
        rows["pixel_values"] = torch.randn(n, 3, 8, 8, generator=g)
    if kind == "audio_classification":
        rows["input_values"] = torch.randn(n, 200, generator=g)
    if kind == "semantic_segmentation":
        rows["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g)
        labels = torch.randint(0, 3, (n, 16, 16), generator=g)
        if ignored:
            labels[torch.rand(n, 16, 16, generator=g) < 0.3] = 255
        rows["labels"] = labels
    return Dataset.from_dict({k: v.tolist() for k, v in rows.items()}).with_format("torch")


def _ignore_some(labels, g, ignored: bool):
    if ignored:
        # a different number of ignored targets per example: GA must weight by targets, not micro-batches
        for i in range(labels.shape[0]):
            labels[i, : (i % 4)] = -100
    return labels
