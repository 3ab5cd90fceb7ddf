"""The core job end to end on the session's local Ray: parity of stored vectors, reruns, search."""

from __future__ import annotations

import json
import subprocess
import sys

import lance
import numpy as np
import pytest

from gpte_ray.config import load_config
from gpte_ray.run.pipeline import run_index
from tests.support.tables import check_table

pytestmark = pytest.mark.ray


def _cfg(corpus, db, **over):
    return load_config(None, {"input.paths": [corpus], "output.db": db, "output.table": "docs", **over})


def test_index_parity_rerun_and_search(ray_session, corpus_dir, tmp_path, st_model, varied_docs):
    db = str(tmp_path / "db")
    report = run_index(_cfg(corpus_dir, db, **{"batch.window_rows": 128}))
    assert report.counts_add_up and report.rows_read == len(varied_docs)
    assert report.new == len(varied_docs) and report.quarantined == 0
    assert report.committed and report.version == lance.dataset(f"{db}/docs.lance").version

    table = check_table(db, "docs", [d["id"] for d in varied_docs], report.chunks_written)
    assert table.num_rows > report.docs_embedded  # some docs were chunked

    # every stored vector equals sentence-transformers' encode of the same chunk text
    ref = st_model.encode(table["text"].to_pylist(), batch_size=32)
    ours = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999

    meta = lance.dataset(f"{db}/docs.lance").schema.metadata
    fp = json.loads(meta[b"gpte_ray.fingerprint"])
    assert fp["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and fp["pooling"] == "mean"

    again = run_index(_cfg(corpus_dir, db, **{"batch.window_rows": 128}))
    assert not again.committed and again.version == report.version
    assert again.unchanged == len(varied_docs) and again.docs_embedded == 0

    out = subprocess.run(
        [sys.executable, "-m", "gpte_ray.cli", "search", "--db", db, "--table", "docs", "-k", "3",
         varied_docs[10]["text"]],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    hits = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(hits) == 3 and hits[0]["doc_id"] == varied_docs[10]["id"]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert {"doc_id", "chunk", "score", "text"} <= set(hits[0])

    from gpte_ray.query.search import search

    long_doc = max(varied_docs, key=lambda d: len(d["text"]))
    grouped = search(db, "docs", long_doc["text"][:400], k=5)
    assert grouped[0]["doc_id"] == long_doc["id"] and len({g["doc_id"] for g in grouped}) == 5
    per_chunk = search(db, "docs", long_doc["text"][:400], k=5, group=False)
    assert len(per_chunk) == 5 and per_chunk[0]["doc_id"] == long_doc["id"]
    hybrid = search(db, "docs", varied_docs[10]["text"], k=3, hybrid=True)
    assert hybrid[0]["doc_id"] == varied_docs[10]["id"]
    only = search(db, "docs", "anything", k=3, where=f"doc_id = '{varied_docs[3]['id']}'")
    assert {h["doc_id"] for h in only} == {varied_docs[3]["id"]}


def test_bad_config_is_one_line_and_nonzero(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model:\n  poolin: mean\n")
    out = subprocess.run(
        [sys.executable, "-m", "gpte_ray.cli", "index", "--config", str(cfg), "--input", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["gpte-ray: error: config error: model.poolin: unknown key"]
