"""Stages called directly (no Ray): OOM back-off, tokenize skipping staged chunks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gpte_ray.config import ModelConfig
from gpte_ray.spec import resolve_model
from gpte_ray.stages import EmbedStage, OutOfMemory, TokenizeStage


def _chunks(texts):
    spec = resolve_model(ModelConfig())
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts,
                     "content_hash": ["h"] * len(texts)})
    return spec, TokenizeStage(spec)(docs)


def test_oom_halves_the_budget_and_keeps_every_row_once():
    texts = [("word " * n).strip() for n in (3, 50, 120, 7, 90, 15, 200, 33)]
    spec, chunks = _chunks(texts)
    ref = EmbedStage(spec, "cpu", 1, 1, 0.0, 1, None)(chunks)  # one row at a time: the reference

    stage = EmbedStage(spec, "cpu", 100_000, 256, 0.0, 1, None)
    real = stage.embedder.embed
    calls = []

    def flaky(ids, plens):
        calls.append(len(ids))
        if sum(len(x) for x in ids) > 300:  # "device memory" holds 300 tokens
            raise OutOfMemory("injected")
        return real(ids, plens)

    stage.embedder.embed = flaky
    out = stage(chunks)
    assert out["doc_id"].to_pylist() == chunks["doc_id"].to_pylist()  # ids travel with rows
    a = np.stack(out["vector"].to_numpy(zero_copy_only=False))
    b = np.stack(ref["vector"].to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() <= 1e-5
    assert sum(out["oom_retries"].to_pylist()) > 0
    assert min(out["token_budget"].to_pylist()) < 100_000
    assert stage.budget < 100_000  # the reduced budget sticks for the next windows


def test_tokenize_skips_chunks_already_staged():
    spec = resolve_model(ModelConfig(max_length=32, chunk_overlap=4))
    docs = pa.table({"doc_id": ["a", "b"], "text": ["short", "long " * 100], "content_hash": ["x", "y"]})
    full = TokenizeStage(spec)(docs)
    n_b = full["doc_id"].to_pylist().count("b")
    assert n_b > 2 and set(full["n_chunks"].to_pylist()) == {1, n_b}
    part = TokenizeStage(spec, frozenset({("b", 0), ("b", 1), ("a", 0)}))(docs)
    assert list(zip(part["doc_id"].to_pylist(), part["chunk"].to_pylist())) == [("b", c) for c in range(2, n_b)]
