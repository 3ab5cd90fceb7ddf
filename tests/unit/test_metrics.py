"""Retrieval metrics against figures worked out by hand on a toy BEIR qrels file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpte_ray.demo.evalset import split_first_sentence
from gpte_ray.query.beir import load_qrels, load_queries
from gpte_ray.query.encoder import collapse_to_docs
from gpte_ray.query.metrics import mean_metrics, metric_names, mrr_at_k, ndcg_at_k, recall_at_k

QRELS = """query-id\tcorpus-id\tscore
q1\td1\t2
q1\td2\t1
q1\td3\t0
q2\td4\t1
q3\td5\t0
"""


@pytest.fixture
def beir(tmp_path):
    (tmp_path / "qrels.tsv").write_text(QRELS)
    with open(tmp_path / "queries.jsonl", "w") as f:
        for qid, text in [("q1", "one"), ("q2", "two"), ("q3", "three"), ("q4", "four")]:
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    return load_queries(str(tmp_path / "queries.jsonl")), load_qrels(str(tmp_path / "qrels.tsv"))


def test_files_load(beir):
    queries, qrels = beir
    assert list(queries) == ["q1", "q2", "q3", "q4"] and queries["q2"] == "two"
    assert qrels == {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d4": 1}, "q3": {"d5": 0}}


def test_bad_qrels_header_is_one_line(tmp_path):
    from gpte_ray.config import ConfigError  # the CLI's exit 2

    (tmp_path / "q.tsv").write_text("qid\tdid\trel\nq1\td1\t1\n")
    with pytest.raises(ConfigError, match="^input error: .*header must be query-id"):
        load_qrels(str(tmp_path / "q.tsv"))
    with pytest.raises(ConfigError, match="^input error: .*gone.tsv: No such file or directory$"):
        load_qrels(str(tmp_path / "gone.tsv"))
    (tmp_path / "q.jsonl").write_text('{"_id": "q1"}\n')
    with pytest.raises(ConfigError, match="^input error: .*q.jsonl:1: not a query line with _id and text"):
        load_queries(str(tmp_path / "q.jsonl"))


def test_graded_query_by_hand(beir):
    _, qrels = beir
    q1 = qrels["q1"]
    ranked = ["d3", "d1", "d9", "d2", "d8"]  # d3 judged but grade 0
    # relevant: d1 (2) and d2 (1), both in the top 10; only d1 in the top 2
    assert recall_at_k(ranked, q1, 10) == 1.0
    assert recall_at_k(ranked, q1, 2) == 0.5
    assert recall_at_k(ranked, q1, 1) == 0.0
    # linear gain: DCG = 0/log2(2) + 2/log2(3) + 0/log2(4) + 1/log2(5); ideal = 2/log2(2) + 1/log2(3)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / 1 + 1 / math.log2(3)
    assert ndcg_at_k(ranked, q1, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, q1, 10) == pytest.approx(0.643322, abs=1e-6)
    assert ndcg_at_k(ranked, q1, 3) == pytest.approx((2 / math.log2(3)) / idcg)
    assert mrr_at_k(ranked, q1, 10) == 0.5
    assert mrr_at_k(ranked, q1, 1) == 0.0
    # the grades matter: the same ranking with grades swapped scores lower
    swapped = {"d1": 1, "d2": 2}
    assert ndcg_at_k(ranked, swapped, 10) == pytest.approx(
        (1 / math.log2(3) + 2 / math.log2(5)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(["d1", "d2"], q1, 10) == pytest.approx(1.0)


def test_relevant_beyond_the_cutoff(beir):
    _, qrels = beir
    ranked = [f"x{i}" for i in range(10)] + ["d4"]  # the one relevant doc at rank 11
    assert recall_at_k(ranked, qrels["q2"], 10) == 0.0
    assert ndcg_at_k(ranked, qrels["q2"], 10) == 0.0
    assert mrr_at_k(ranked, qrels["q2"], 10) == 0.0
    assert recall_at_k(ranked, qrels["q2"], 100) == 1.0
    assert mrr_at_k(ranked, qrels["q2"], 11) == pytest.approx(1 / 11)


def test_query_without_relevant_docs_is_undefined_and_skipped(beir):
    _, qrels = beir
    # q3 has only a grade-0 judgement, q4 has none: no metric is defined for them
    for judged in (qrels["q3"], qrels.get("q4", {})):
        assert recall_at_k(["d5"], judged, 10) is None
        assert ndcg_at_k(["d5"], judged, 10) is None
        assert mrr_at_k(["d5"], judged, 10) is None
    runs = {"q1": ["d3", "d1", "d9", "d2"], "q2": ["d4"], "q3": ["d5"], "q4": []}
    means = mean_metrics(runs, qrels, ["recall@10", "ndcg@10", "mrr@10", "recall@1"])
    assert means["evaluated"] == 2 and means["skipped"] == 2
    # averages over q1 and q2 only (q2: d4 first -> 1, 1, 1, 1)
    assert means["recall@10"] == pytest.approx((1.0 + 1.0) / 2)
    assert means["recall@1"] == pytest.approx((0.0 + 1.0) / 2)
    assert means["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert means["ndcg@10"] == pytest.approx((0.643322 + 1.0) / 2, abs=1e-6)
    assert mean_metrics({"q3": ["d5"]}, qrels, ["mrr@10"]) == {"mrr@10": None, "evaluated": 0, "skipped": 1}


def test_chunks_collapse_to_best_chunk_and_ties_break_by_doc_id():
    rows = [("b", 0.9), ("a", 0.9), ("a", 0.5), ("c", 0.95), ("b", 0.2), ("d", 0.1), ("d", 0.7)]
    assert collapse_to_docs(rows) == [("c", 0.95), ("a", 0.9), ("b", 0.9), ("d", 0.7)]
    # same hits in another order (as an index may return them): same ranking
    assert collapse_to_docs(reversed(rows)) == collapse_to_docs(rows)
    assert collapse_to_docs([{"doc_id": "x", "chunk": 1, "score": 0.3},
                             {"doc_id": "x", "chunk": 0, "score": 0.6}]) == [("x", 0.6)]
    # a doc's many chunks do not push others out: metrics see distinct documents
    ranked = [d for d, _ in collapse_to_docs(rows)]
    assert mrr_at_k(ranked, {"b": 1}, 10) == pytest.approx(1 / 3)


def test_repeated_ids_count_once():
    assert recall_at_k(["a", "a", "a", "b"], {"b": 1}, 2) == 1.0
    assert ndcg_at_k(["a", "a", "b"], {"a": 1}, 10) == pytest.approx(1.0)


def test_metric_names():
    assert metric_names(10) == ["recall@10", "ndcg@10", "mrr@10", "recall@100"]
    assert metric_names(5) == ["recall@5", "ndcg@10", "mrr@10", "recall@10", "recall@100"]
    assert metric_names(100) == ["recall@100", "ndcg@10", "mrr@10", "recall@10"]


@given(
    st.lists(st.sampled_from("abcdefgh"), max_size=12),
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 3), max_size=8),
    st.integers(1, 12),
)
def test_metrics_bounded_and_ideal_is_one(ranked, qrels, k):
    values = [recall_at_k(ranked, qrels, k), ndcg_at_k(ranked, qrels, k), mrr_at_k(ranked, qrels, k)]
    if not any(g > 0 for g in qrels.values()):
        assert values == [None, None, None]
        return
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in values)
    ideal = sorted(qrels, key=lambda d: -qrels[d])
    assert ndcg_at_k(ideal, qrels, k) == pytest.approx(1.0)


@pytest.mark.parametrize("doc, first, rest", [
    ("Read a file.  More words here.", "Read a file.", "More words here."),
    ("Summary line without a stop\n\nBody. Two.", "Summary line without a stop", "Body. Two."),
    ("Wrapped summary\nover two lines. Rest", "Wrapped summary over two lines.", "Rest"),
    ("Version 1.2 is here! Yes", "Version 1.2 is here!", "Yes"),
])
def test_split_first_sentence(doc, first, rest):
    assert split_first_sentence(doc) == (first, rest)


# ---- the search helpers, on small hand-made Lance tables (no model, no Ray) --------------------
def _table(tmp_path, ids, vectors, typ):
    import lance
    import pyarrow as pa

    flat = pa.array(np.asarray(vectors).reshape(-1), type=typ)
    arr = pa.FixedSizeListArray.from_arrays(flat, len(vectors[0]))
    lance.write_dataset(pa.table({"doc_id": ids, "vector": arr}), str(tmp_path / "t.lance"))
    return lance.dataset(str(tmp_path / "t.lance"))


def test_rank_docs_fetches_more_chunks_when_one_doc_crowds_the_top(tmp_path):
    import pyarrow as pa

    from gpte_ray.query.encoder import vector_search
    from gpte_ray.query.evaluate import rank_docs

    rng = np.random.default_rng(0)
    q = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    # doc "big" has 45 chunks, all closer to q than any other doc; then 12 one-chunk docs
    big = q + 0.01 * rng.standard_normal((45, 4))
    others = np.array([[1.0, 0.2 + 0.1 * i, 0.0, 0.0] for i in range(12)])
    ids = ["big"] * 45 + [f"d{i:02d}" for i in range(12)]
    ds = _table(tmp_path, ids, np.vstack([big, others]).astype(np.float32), pa.float32())
    calls = []

    def search(vectors, limit):
        calls.append(limit)
        return vector_search(ds, vectors, limit, "cosine", ["doc_id"], exact=True)

    # depth 5 -> 20 chunks, all of "big": fetched again with 80 (all 57 rows)
    assert rank_docs(search, q[None, :], depth=5, n_rows=57) == [["big"] + [f"d{i:02d}" for i in range(12)]]
    assert calls == [20, 57]
    calls.clear()
    # depth 1: the first 4 chunks are enough
    assert rank_docs(search, q[None, :], depth=1, n_rows=57) == [["big"]] and calls == [4]


def test_int8_search_matches_brute_force(tmp_path):
    import pyarrow as pa

    from gpte_ray.model.quantize import calibrate_int8, quantize_int8
    from gpte_ray.query.encoder import int8_search

    rng = np.random.default_rng(1)
    floats = rng.standard_normal((300, 16)).astype(np.float32)
    low, high = calibrate_int8(floats)
    codes = quantize_int8(floats, np.asarray(low), np.asarray(high))
    ds = _table(tmp_path, [f"d{i}" for i in range(300)], codes, pa.int8())
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    hits = [[(r["doc_id"], r["score"]) for r in rows]
            for rows in int8_search(ds, queries, {"low": low, "high": high}, 7, ["doc_id"])]
    deq = np.asarray(low) + (codes.astype(np.float64) + 128.0) / 255.0 * (np.asarray(high) - np.asarray(low))
    deq /= np.linalg.norm(deq, axis=1, keepdims=True)
    for qv, got in zip(queries, hits):
        want = np.argsort(-(deq @ (qv / np.linalg.norm(qv))))[:7]
        assert [d for d, _ in got] == [f"d{i}" for i in want]
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def test_search_grouping_and_rank_fusion_by_hand():
    from gpte_ray.query.search import fuse_rankings, group_by_document

    hits = [{"doc_id": "a", "chunk": 2, "score": 0.9}, {"doc_id": "b", "chunk": 0, "score": 0.8},
            {"doc_id": "a", "chunk": 0, "score": 0.7}]
    grouped = group_by_document(hits)
    assert [g["doc_id"] for g in grouped] == ["a", "b"]
    assert grouped[0]["chunk"] == 2 and [c["chunk"] for c in grouped[0]["chunks"]] == [2, 0]

    vector = [{"doc_id": "a", "chunk": 0}, {"doc_id": "b", "chunk": 0}]
    text = [{"doc_id": "b", "chunk": 0}, {"doc_id": "c", "chunk": 0}]
    fused = fuse_rankings(vector, text)
    # b: 1/62 + 1/61 beats a: 1/61 beats c: 1/62
    assert [r["doc_id"] for r in fused] == ["b", "a", "c"]
    assert abs(fused[0]["score"] - (1 / 62 + 1 / 61)) < 1e-12


def test_search_groups_documents_by_the_rule_eval_ranks_them():
    from gpte_ray.query.search import group_by_document

    # a tie between b and a, listed b first (as an index may return it): both rank a first
    hits = [{"doc_id": "b", "chunk": 0, "score": 0.5}, {"doc_id": "a", "chunk": 3, "score": 0.5},
            {"doc_id": "c", "chunk": 1, "score": 0.4}, {"doc_id": "c", "chunk": 0, "score": 0.9}]
    grouped = group_by_document(hits)
    assert [g["doc_id"] for g in grouped] == [d for d, _ in collapse_to_docs(hits)] == ["c", "a", "b"]
    assert grouped[0]["chunk"] == 0 and [c["chunk"] for c in grouped[0]["chunks"]] == [0, 1]
    assert group_by_document(list(reversed(hits))) == grouped


def test_rank_docs_on_an_empty_table_searches_nothing():
    from gpte_ray.query.evaluate import rank_docs

    def search(vectors, limit):
        raise AssertionError("no search on an empty table")

    assert rank_docs(search, np.zeros((3, 4), dtype=np.float32), depth=10, n_rows=0) == [[], [], []]


@pytest.mark.parametrize("int8", [False, True])
def test_searcher_search_vectors_picks_the_backend_and_batches(tmp_path, monkeypatch, int8):
    """The one choice of backend (int8: exact scan of dequantised codes; else Lance's nearest),
    with queries searched QUERY_BATCH at a time: the same rows as one call of the backend."""
    import pyarrow as pa

    from gpte_ray.model.quantize import calibrate_int8, quantize_int8
    from gpte_ray.query import search as search_module
    from gpte_ray.query.encoder import int8_search, vector_search

    rng = np.random.default_rng(2)
    floats = rng.standard_normal((40, 8)).astype(np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    low, high = calibrate_int8(floats)
    calibration = {"low": low, "high": high}
    vectors = quantize_int8(floats, np.asarray(low), np.asarray(high)) if int8 else floats
    ds = _table(tmp_path, [f"d{i}" for i in range(40)], vectors, pa.int8() if int8 else pa.float32())
    searcher = search_module.Searcher.__new__(search_module.Searcher)  # the table's state, no model
    searcher.ds, searcher.int8, searcher.calibration, searcher.metric = ds, int8, calibration, "cosine"
    searcher.columns, searcher.output = ["doc_id"], "dense"
    queries = rng.standard_normal((5, 8)).astype(np.float32)

    if int8:
        want = int8_search(ds, queries, calibration, 6, ["doc_id"])
    else:
        want = vector_search(ds, queries, 6, "cosine", ["doc_id"], exact=True)
    monkeypatch.setattr(search_module, "QUERY_BATCH", 2)
    got = searcher.search_vectors(queries, 6, exact=True)
    assert [[r["doc_id"] for r in rows] for rows in got] == [[r["doc_id"] for r in rows] for rows in want]
    assert searcher.search_vectors(queries[:0], 6) == []
    if int8:
        assert searcher.vector_index() is None
