"""Write tiny offline assets for the task examples' tiny mode (what CI runs):

    python examples/tasks/task_assets.py /tmp/tiny_tasks
    # -> bert/ (a BERT masked LM + WordPiece-free character tokenizer with [CLS] [SEP] [MASK]),
    #    vit/ (a ViT backbone + image processor), t5/ (a T5 + character tokenizer),
    #    data/ (sentiment.csv, ner.jsonl, images/<class>/*.png, text.txt, translation.jsonl)

Every model is built in code with random weights (nothing is downloaded): the scripts load them with
the Auto classes and ``from_pretrained`` as they would load a Hub checkpoint.
"""

import json
import os
import random
import string
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (BertConfig, BertForMaskedLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration,
                          ViTConfig, ViTImageProcessor, ViTModel)

SENTENCES = ["the film was great fun", "a dull and slow story", "i loved every minute", "the plot made no sense",
             "brilliant acting all round", "boring from start to end", "a warm and funny film", "too long and flat"]
FRENCH = {"the cat": "le chat", "the dog": "le chien", "a red house": "une maison rouge", "good night": "bonne nuit",
          "the sea": "la mer", "a small boat": "un petit bateau", "hot tea": "du the chaud", "the moon": "la lune"}


def char_tokenizer(specials, bert_style: bool) -> PreTrainedTokenizerFast:
    chars = [c for c in string.ascii_lowercase + string.digits + " .,!?'-"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]" if bert_style else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bert_style:  # [CLS] text [SEP], like BERT's tokenizer
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def main(out: str) -> None:
    torch.manual_seed(0)
    random.seed(0)
    bert_tok = char_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], bert_style=True)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      pad_token_id=bert_tok.pad_token_id))
    bert.save_pretrained(os.path.join(out, "bert"))
    bert_tok.save_pretrained(os.path.join(out, "bert"))
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(os.path.join(out, "vit"))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(os.path.join(out, "vit"))
    t5_tok = char_tokenizer(["<pad>", "</s>", "<unk>"], bert_style=False)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                             num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    t5.save_pretrained(os.path.join(out, "t5"))
    t5_tok.save_pretrained(os.path.join(out, "t5"))

    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "sentiment.csv"), "w") as fh:
        fh.write("sentence,label\n")
        for i in range(32):
            s = SENTENCES[i % len(SENTENCES)]
            fh.write(f"{s},{'positive' if (i % len(SENTENCES)) % 2 == 0 else 'negative'}\n")
    with open(os.path.join(data, "ner.jsonl"), "w") as fh:
        names, places = ["ada", "alan", "grace"], ["london", "paris", "rome"]
        for i in range(32):
            words = [names[i % 3], "lives", "in", places[(i // 3) % 3]]
            fh.write(json.dumps({"tokens": words, "ner_tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n")
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        folder = os.path.join(data, "images", label)
        os.makedirs(folder, exist_ok=True)
        for i in range(12):
            noise = np.random.default_rng(i).integers(0, 40, (16, 16, 3))
            Image.fromarray((np.array(colour) + noise).clip(0, 255).astype("uint8")).save(
                os.path.join(folder, f"{i}.png"))
    with open(os.path.join(data, "text.txt"), "w") as fh:
        for i in range(32):
            fh.write(SENTENCES[i % len(SENTENCES)] + "\n")
    with open(os.path.join(data, "translation.jsonl"), "w") as fh:
        for i in range(32):
            en, fr = list(FRENCH.items())[i % len(FRENCH)]
            fh.write(json.dumps({"translation": {"en": en, "fr": fr}}) + "\n")
    print(f"tiny task assets in {out}: bert/, vit/, t5/, data/")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny_tasks")
