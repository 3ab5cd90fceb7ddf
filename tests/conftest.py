"""Shared fixtures: offline models, small corpora, one session-scoped local Ray."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.corpus import docstring_docs, write_shards


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from gpte_ray.spec import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def varied_docs() -> list[dict]:
    """A few hundred real docstrings of varied length (a handful longer than 256 tokens)."""
    docs = list(docstring_docs(2000))
    docs.sort(key=lambda d: len(d["text"]))
    # every 7th doc: spreads over the whole length range
    return docs[::7][:300]


@pytest.fixture
def corpus_dir(tmp_path, varied_docs):
    out = tmp_path / "corpus"
    write_shards(iter(varied_docs), str(out), rows_per_shard=100)
    return str(out)


def write_parquet(path, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for all integration tests; never attaches to another cluster."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _save_tiny(folder: str, config, model_cls, tokenizer_src: str, st_pooling: dict | None = None) -> str:
    import json

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


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, minilm_path) -> str:
    """A 2-layer randomly initialised Qwen2 (no download), with a BERT tokenizer."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return _save_tiny(str(tmp_path_factory.mktemp("qwen2")), cfg, Qwen2Model, minilm_path)


@pytest.fixture(scope="session")
def tiny_llama_st(tmp_path_factory, minilm_path) -> str:
    """A 2-layer random Llama packaged as a sentence-transformers folder with last-token pooling."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return _save_tiny(str(tmp_path_factory.mktemp("llama")), cfg, LlamaModel, minilm_path,
                      {"pooling_mode_lasttoken": True, "include_prompt": True})
