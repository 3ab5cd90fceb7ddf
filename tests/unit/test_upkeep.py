"""Table upkeep without Ray: compaction bound, indexes, ANN recall against exact search."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest

from gpte_ray.config import OutputConfig
from gpte_ray.query.search import nearest_params
from gpte_ray.store.table import FINGERPRINT_KEY, vectors_to_arrow
from gpte_ray.store.upkeep import finish_table

DIM = 128


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, DIM))
    v = centers[rng.integers(0, 64, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("index_type,min_recall", [("IVF_HNSW_SQ", 0.95), ("IVF_PQ", 0.8)])
def test_compaction_indexes_and_ann_recall(tmp_path, index_type, min_recall):
    fp = {"precision": "float32", "dim": DIM, "normalize": True}
    schema = pa.schema([("doc_id", pa.string()), ("chunk", pa.int32()), ("vector", pa.list_(pa.float32(), DIM))],
                       metadata={FINGERPRINT_KEY: json.dumps(fp)})
    vectors = _clustered(20_000, 0)
    uri = str(tmp_path / "docs.lance")
    for i in range(0, 20_000, 500):  # 40 small fragments, as 40 small runs would leave
        t = pa.table({"doc_id": [f"d{j}" for j in range(i, i + 500)], "chunk": pa.array([0] * 500, pa.int32()),
                      "vector": vectors_to_arrow(vectors[i:i + 500], schema.field("vector").type)}, schema=schema)
        lance.write_dataset(t, uri, mode="append" if i else "create")
    ds = lance.dataset(uri)
    assert len(ds.get_fragments()) == 40
    out = OutputConfig(max_fragments=16, index_min_rows=20_000, index_type=index_type, retention_hours=0)
    done = finish_table(ds, out, "r1", fp, committed=True)
    ds = lance.dataset(uri)
    assert done["fragments"] <= 16 and len(ds.get_fragments()) <= 16
    assert ds.count_rows() == 20_000
    names = {f for idx in ds.describe_indices() for f in idx.field_names}
    assert names == {"doc_id", "vector"}

    queries = _clustered(50, 1)
    recall = []
    for q in queries:
        exact = ds.to_table(columns=["doc_id"], nearest={"column": "vector", "q": q, "k": 10, "metric": "cosine",
                                                          "use_index": False})["doc_id"].to_pylist()
        ann = ds.to_table(columns=["doc_id"], nearest=nearest_params(q, 10, "cosine"))["doc_id"].to_pylist()
        recall.append(len(set(exact) & set(ann)) / 10)
    assert np.mean(recall) >= min_recall, np.mean(recall)  # the default index type: >= 0.95


def _table(uri, n, start=0, mode="create"):
    fp = {"precision": "float32", "dim": 16, "normalize": True}
    schema = pa.schema([("doc_id", pa.string()), ("chunk", pa.int32()), ("vector", pa.list_(pa.float32(), 16))],
                       metadata={FINGERPRINT_KEY: json.dumps(fp)})
    v = np.random.default_rng(start).normal(size=(n, 16)).astype(np.float32)
    t = pa.table({"doc_id": [f"d{i}" for i in range(start, start + n)], "chunk": pa.array([0] * n, pa.int32()),
                  "vector": vectors_to_arrow(v, schema.field("vector").type)}, schema=schema)
    return lance.write_dataset(t, uri, mode=mode), fp


def test_upkeep_follows_the_change(tmp_path):
    """A small change joins each index as a delta segment; merges and retraining wait for their
    thresholds and are announced; every step is timed."""
    from gpte_ray.store.upkeep import UpkeepPolicy

    uri = str(tmp_path / "t.lance")
    ds, fp = _table(uri, 3000)
    out = OutputConfig(index_min_rows=1000, retention_hours=0, fts_index=False)
    done = finish_table(ds, out, "r0", fp, committed=True)
    assert done["vector_index"].startswith("created") and "vector_index" in done["seconds"]
    policy = UpkeepPolicy(max_small_fragments=100, max_index_segments=3, retrain_fraction=1.0)
    for run in (1, 2):
        ds, _ = _table(uri, 50, start=10_000 * run, mode="append")
        done = finish_table(ds, out, f"r{run}", fp, committed=True, policy=policy)
        assert done["indexes"] == "delta" and "heavy" not in done, done
        assert "index_delta" in done["seconds"] and "cleanup" in done["seconds"]
        stats = lance.dataset(uri).stats.index_stats("vector_idx")
        assert stats["num_unindexed_rows"] == 0 and stats["num_indexed_rows_per_delta"][0] == 3000
    # a third delta passes max_index_segments: merged, and said so
    ds, _ = _table(uri, 50, start=30_000, mode="append")
    done = finish_table(ds, out, "r3", fp, committed=True, policy=policy)
    assert any(h.startswith("merged") for h in done["heavy"]), done
    # rows added since training past retrain_fraction: retrained, and said so
    ds, _ = _table(uri, 4000, start=40_000, mode="append")
    done = finish_table(ds, out, "r4", fp, committed=True, policy=policy)
    assert any(h.startswith("retrained vector_idx") for h in done["heavy"]), done
    assert lance.dataset(uri).count_rows() == 3000 + 150 + 4000


def test_rows_whose_upkeep_did_not_finish_are_indexed_by_the_next_run(tmp_path):
    """A run committed, then died before upkeep: the next run changes nothing (committed=False)
    but still adds those rows to the indexes."""
    uri = str(tmp_path / "docs.lance")
    t = pa.table({"doc_id": [f"d{i}" for i in range(100)], "chunk": pa.array([0] * 100, pa.int32())})
    lance.write_dataset(t, uri)
    out = OutputConfig(fts_index=False, retention_hours=0)
    fp = {"precision": "int8", "dim": 4}  # no vector index: doc_id's alone
    assert finish_table(lance.dataset(uri), out, "a" * 16, fp, True)["doc_id_index"] == "created"
    assert "indexes" not in finish_table(lance.dataset(uri), out, "b" * 16, fp, False)  # nothing to do
    more = pa.table({"doc_id": [f"e{i}" for i in range(10)], "chunk": pa.array([0] * 10, pa.int32())})
    lance.write_dataset(more, uri, mode="append")  # committed; its upkeep never ran
    done = finish_table(lance.dataset(uri), out, "c" * 16, fp, False)
    assert done["indexes"] == "delta"
    assert lance.dataset(uri).stats.index_stats("doc_id_idx")["num_unindexed_rows"] == 0
