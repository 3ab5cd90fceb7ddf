"""Tiny randomly initialised models saved as local folders (no download)."""

from __future__ import annotations

import json
import os


def save_tiny(folder: str, config, model_cls, tokenizer_src: str, st_pooling: dict | None = None) -> str:
    """Save `model_cls(config)` with the tokenizer of `tokenizer_src`; with `st_pooling`, as a
    sentence-transformers folder (Transformer, Pooling with these settings, Normalize)."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    if st_pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "modules.json"), "w") as f:
            json.dump(modules, f)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": config.hidden_size, **st_pooling}, f)
        with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": 128, "do_lower_case": False}, f)
    return folder


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128)


def save_multi_vector(folder: str, tokenizer_src: str, skiplist: list[str] | None = None) -> str:
    """A ColBERT-style sentence-transformers MultiVectorEncoder folder over a tiny random BERT:
    Transformer, Dense on the token embeddings (32 -> 16), MultiVectorMask, Normalize on the
    tokens, and the `[Q] ` / `[D] ` prompts."""
    import torch
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
    from transformers import BertModel

    base = save_tiny(os.path.join(folder, "_backbone"), _tiny_bert_config(), BertModel, tokenizer_src)
    torch.manual_seed(1)
    model = MultiVectorEncoder(modules=[
        Transformer(base, max_seq_length=64),
        Dense(32, 16, bias=False, activation_function=torch.nn.Identity(), module_input_name="token_embeddings"),
        MultiVectorMask(skiplist_words=skiplist),
        Normalize(module_input_name="token_embeddings"),
    ], prompts={"query": "[Q] ", "document": "[D] "}, device="cpu")
    model.save(os.path.join(folder, "model"))
    return os.path.join(folder, "model")


def save_splade(folder: str, tokenizer_src: str, legacy: bool = False) -> str:
    """A SPLADE sentence-transformers SparseEncoder folder over a tiny random BERT MLM: a
    Transformer with transformer_task fill-mask (or, `legacy`, the older MLMTransformer),
    then SpladePooling (max, relu)."""
    import logging

    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertForMaskedLM

    base = save_tiny(os.path.join(folder, "_backbone"), _tiny_bert_config(), BertForMaskedLM, tokenizer_src)
    mlm = BertForMaskedLM.from_pretrained(base)
    mlm.cls.predictions.bias.data.fill_(-0.3)  # few positive logits: a few hundred active terms, as trained SPLADE
    mlm.save_pretrained(base)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)  # MLMTransformer's deprecation note
    first = MLMTransformer(base, max_seq_length=64) if legacy else \
        Transformer(base, transformer_task="fill-mask", max_seq_length=64)
    model = SparseEncoder(modules=[first, SpladePooling("max")], device="cpu")
    model.save(os.path.join(folder, "model"))
    return os.path.join(folder, "model")


def save_sentence_t5(folder: str, tokenizer_src: str) -> str:
    """A sentence-t5 / GTR layout over a tiny random T5 encoder: Transformer (T5EncoderModel
    weights), mean Pooling, Dense without bias or activation, Normalize."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0)
    base = save_tiny(os.path.join(folder, "_backbone"), cfg, T5EncoderModel, tokenizer_src)
    torch.manual_seed(2)
    model = SentenceTransformer(modules=[
        Transformer(base, max_seq_length=64),
        Pooling(32, pooling_mode="mean"),
        Dense(32, 24, bias=False, activation_function=torch.nn.Identity()),
        Normalize(),
    ], device="cpu")
    model.save(os.path.join(folder, "model"))
    return os.path.join(folder, "model")
