"""Shared fixtures: offline models, small corpora, one session-scoped local Ray.

Helpers that tests call directly live in `tests/support/`."""

from __future__ import annotations

import os

import pytest

from gpte_ray.demo.corpus import docstring_docs, write_shards
from tests.support.models import save_tiny


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from gpte_ray.model.spec import default_model_path

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


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, minilm_path) -> str:
    """A 2-layer randomly initialised Qwen2 (no download), with a BERT tokenizer."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return save_tiny(str(tmp_path_factory.mktemp("qwen2")), cfg, Qwen2Model, minilm_path)


@pytest.fixture(scope="session")
def tiny_llama_st(tmp_path_factory, minilm_path) -> str:
    """A 2-layer random Llama packaged as a sentence-transformers folder with last-token pooling."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return save_tiny(str(tmp_path_factory.mktemp("llama")), cfg, LlamaModel, minilm_path,
                      {"pooling_mode_lasttoken": True, "include_prompt": True})
