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
