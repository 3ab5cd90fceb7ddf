"""Evaluation end to end: a docstring retrieval set, indexed by the job, scored exact and indexed."""

from __future__ import annotations

import json

import lance
import pytest

from gpte_ray.cli import main
from gpte_ray.config import load_config
from gpte_ray.demo.evalset import build_docstring_retrieval_set
from gpte_ray.query.evaluate import evaluate
from gpte_ray.run.pipeline import run_index

pytestmark = pytest.mark.ray

METRICS = {"recall@10", "ndcg@10", "mrr@10", "recall@100"}


@pytest.fixture(scope="module")
def retrieval_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalset")
    return build_docstring_retrieval_set(str(out), 150, rows_per_shard=75, max_chars=600)


def test_retrieval_set_layout(retrieval_set):
    queries = [json.loads(x) for x in open(retrieval_set["queries"])]
    qrels = open(retrieval_set["qrels"]).read().splitlines()
    assert retrieval_set["docs"] == len(queries) == len(qrels) - 1 == 150
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    assert len(retrieval_set["shards"]) == 2
    import pyarrow.parquet as pq

    corpus = pq.read_table(retrieval_set["corpus"]).to_pylist()
    by_id = {d["id"]: d["text"] for d in corpus}
    assert all(80 <= len(t) <= 600 for t in by_id.values())
    for q, line in zip(queries, qrels[1:]):
        qid, doc, grade = line.split("\t")
        assert qid == q["_id"] and grade == "1"
        assert q["text"] not in by_id[doc]  # the query sentence is not in the indexed text


def test_eval_exact_and_indexed(ray_session, retrieval_set, tmp_path, capsys):
    db = str(tmp_path / "db")
    report = run_index(load_config(None, {"input.paths": [retrieval_set["corpus"]], "output.db": db,
                                          "output.table": "docs", "batch.window_rows": 256}))
    assert report.committed and report.rows_read == 150

    res = evaluate(db, "docs", retrieval_set["queries"], retrieval_set["qrels"], k=10)
    assert res["queries"] == 150 and res["index"] == "none" and "no vector index" in res["note"]
    assert set(res["exact"]) == METRICS and res["indexed"] == res["exact"]
    assert all(0.0 <= v <= 1.0 for v in res["exact"].values())
    ex = res["exact"]
    assert ex["recall@10"] >= 0.6, ex  # MiniLM finds most docstrings from their first sentence
    assert ex["recall@100"] >= ex["recall@10"] >= ex["mrr@10"] and ex["ndcg@10"] >= ex["mrr@10"]

    # with a vector index: the indexed path is really taken; probing every partition it is exact
    ds = lance.dataset(f"{db}/docs.lance")
    ds.create_index("vector", index_type="IVF_FLAT", metric="cosine", num_partitions=2)
    capsys.readouterr()
    assert main(["eval", "--db", db, "--table", "docs", "--queries", retrieval_set["queries"],
                 "--qrels", retrieval_set["qrels"], "-k", "10", "--nprobes", "2", "-v"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["index"] == "IVF_FLAT" and "note" not in out
    assert set(out["indexed"]) == METRICS and out["exact"] == ex
    for name in METRICS:
        assert out["indexed"][name] == pytest.approx(ex[name], abs=1e-6)

    # qrels of other query ids: nothing to score is a one-line input error, exit 2 (not nulls)
    other = tmp_path / "other.tsv"
    other.write_text("query-id\tcorpus-id\tscore\nnot-a-query\tx\t1\n")
    capsys.readouterr()
    assert main(["eval", "--db", db, "--table", "docs", "--queries", retrieval_set["queries"],
                 "--qrels", str(other), "-v"]) == 2
    assert "input error: no query of" in capsys.readouterr().err


def test_searcher_answers_many_queries_with_one_model(ray_session, retrieval_set, tmp_path, monkeypatch):
    from gpte_ray import Searcher
    from gpte_ray.query import encoder as query_module
    from gpte_ray.query.search import search

    db = str(tmp_path / "db")
    run_index(load_config(None, {"input.paths": [retrieval_set["corpus"]], "output.db": db,
                                 "output.table": "docs", "batch.window_rows": 256}))
    queries = [json.loads(x) for x in open(retrieval_set["queries"])][:20]
    qrels = dict(line.split("\t")[:2] for line in open(retrieval_set["qrels"]).read().splitlines()[1:])
    loads = []
    real = query_module.QueryEncoder.__init__

    def counting(self, *a, **kw):
        loads.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(query_module.QueryEncoder, "__init__", counting)
    monkeypatch.setattr(query_module, "_encoders", {})
    s = Searcher(db, "docs")
    one_by_one = [s.search(q["text"], k=5) for q in queries]
    together = s.search_many([q["text"] for q in queries], k=5)
    assert search(db, "docs", queries[0]["text"], 5) == one_by_one[0]  # the module function shares the model
    assert len(loads) == 1
    assert [[r["doc_id"] for r in rows] for rows in together] == [[r["doc_id"] for r in rows] for rows in one_by_one]
    for rows in together:
        assert len(rows) == 5 and [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    hits = sum(qrels[q["_id"]] in {r["doc_id"] for r in rows} for q, rows in zip(queries, together))
    assert hits >= 10  # MiniLM finds most docstrings (in the top 5) from their first sentence

    # several queries from stdin, one per line, each result line tagged with its query
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "search", "--db", db, "--table", "docs", "-k", "2",
                          "-"], input="\n".join(q["text"] for q in queries[:3]) + "\n\n", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["query"] for x in lines] == [q["text"] for q in queries[:3] for _ in range(2)]
    assert [x["doc_id"] for x in lines] == [r["doc_id"] for rows in together[:3] for r in rows[:2]]
