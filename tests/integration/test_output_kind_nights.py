"""Nights on a multi-vector and on a sparse table (issue 22): build, a night that edits 10% of
the documents and the kept values of a few more (killed before its commit once, then resumed),
a quiet night; after each, the table equals a fresh index of the corpus, and search ranks as
brute force over it."""

from __future__ import annotations

import random
import shutil

import lance
import numpy as np
import pyarrow as pa
import pytest

from gpte_ray.config import ModelConfig, load_config
from gpte_ray.model.spec import resolve_model
from gpte_ray.run.pipeline import run_index
from gpte_ray.store.table import TableStore
from tests.support.files import write_parquet
from tests.support.models import save_multi_vector, save_splade
from tests.support.tables import killed_before_the_commit

pytestmark = pytest.mark.ray


def _write(folder, docs: list[dict]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(0, len(docs), 20):
        write_parquet(f"{folder}/part-{i // 20:03d}.parquet", docs[i : i + 20])


def _fresh(folder: str, docs: list[dict]) -> dict:
    """(doc_id, chunk) -> the row's outputs, as the job's stages compute them for these documents."""
    from gpte_ray.run.stages import EmbedOptions, EmbedStage, TokenizeStage

    spec = resolve_model(ModelConfig(path=folder))
    batch = pa.table({"doc_id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                      "content_hash": ["-"] * len(docs)})
    out, _ = EmbedStage(spec, EmbedOptions(device="cpu", token_budget=2048)).embed(TokenizeStage(spec)(batch))
    return _rows(out, spec.output)


def _rows(t: pa.Table, kind: str) -> dict:
    names = ["vector"] if kind == "multi-vector" else ["sparse_indices", "sparse_values"]
    cols = [t[n].to_pylist() for n in names]
    return {(d, c): [np.asarray(x[i], dtype=np.float64) for x in cols]
            for i, (d, c) in enumerate(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))}


def _check_table(db: str, folder: str, docs: list[dict], kind: str) -> pa.Table:
    table = lance.dataset(f"{db}/docs.lance").to_table()
    got, want = _rows(table, kind), _fresh(folder, docs)
    assert set(got) == set(want), "the table's (doc_id, chunk) keys differ from a fresh index"
    for key, parts in want.items():
        for a, b in zip(got[key], parts):
            assert a.shape == b.shape and np.abs(a - b).max(initial=0) <= 1e-5, key
    tags = dict(zip(table["doc_id"].to_pylist(), table["tag"].to_pylist()))
    assert tags == {d["id"]: d["tag"] for d in docs}
    return table


def _brute_force(table: pa.Table, kind: str, q, k: int) -> list[tuple[str, float]]:
    if kind == "multi-vector":
        scores = [float((q @ np.asarray(v, np.float64).T).max(1).sum()) for v in table["vector"].to_pylist()]
    else:
        dense = np.zeros(30522)
        dense[q[0]] = q[1]
        scores = [float(dense[np.asarray(i, int)] @ np.asarray(w)) if i else 0.0
                  for i, w in zip(table["sparse_indices"].to_pylist(), table["sparse_values"].to_pylist())]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return [(table["doc_id"][i].as_py(), scores[i]) for i in order]


def _check_search(db: str, folder: str, table: pa.Table, kind: str, query: str) -> None:
    from gpte_ray.query.search import Searcher

    searcher = Searcher(db, "docs", model_path=folder)
    ref = _brute_force(table, kind, searcher.embed([query])[0], 3)
    for exact in (True, False):
        hits = searcher.search(query, k=3, exact=exact, group=False)
        assert [h["doc_id"] for h in hits] == [d for d, _ in ref], (exact, hits, ref)
        assert np.allclose([h["score"] for h in hits], [s for _, s in ref], atol=1e-4)


@pytest.mark.parametrize("kind", ["multi-vector", "sparse"])
def test_three_nights_on_an_output_kind(ray_session, tmp_path, minilm_path, varied_docs, monkeypatch, kind):
    models = str(tmp_path / "model")
    folder = save_multi_vector(models, minilm_path) if kind == "multi-vector" else save_splade(models, minilm_path)
    rng = random.Random(22)
    docs = [{"id": d["id"], "text": d["text"][:400], "tag": f"t{i % 3}"} for i, d in enumerate(varied_docs[:60])]
    corpus, db = str(tmp_path / "corpus"), str(tmp_path / "db")
    cfg = load_config(None, {"input.paths": [corpus], "output.db": db, "output.table": "docs",
                             "model.path": folder, "input.keep_columns": ["tag"], "batch.window_rows": 16,
                             "output.max_fragments": 3, "output.index_min_rows": 50, "output.index_type": "IVF_PQ"})

    _write(corpus, docs)  # night 1: the build
    first = run_index(cfg)
    assert first.committed and first.new == len(docs)
    assert TableStore.fingerprint(lance.dataset(f"{db}/docs.lance"))["output"] == kind
    _check_search(db, folder, _check_table(db, folder, docs, kind), kind, docs[11]["text"][:80])

    for i in rng.sample(range(len(docs)), 6):  # night 2: 10% of the texts and 3 kept values change
        docs[i] = docs[i] | {"text": docs[i]["text"][::-1]}
    for i in rng.sample(range(len(docs)), 3):
        docs[i] = docs[i] | {"tag": "edited"}
    _write(corpus, docs)
    killed_before_the_commit(monkeypatch, cfg)
    second = run_index(cfg)
    assert second.committed and second.changed == 6 and second.chunks_resumed > 0
    table = _check_table(db, folder, docs, kind)
    _check_search(db, folder, table, kind, docs[23]["text"][:80])

    third = run_index(cfg)  # night 3: nothing changed
    assert not third.committed and third.docs_embedded == 0 and third.unchanged == len(docs)
    _check_table(db, folder, docs, kind)
    if kind == "multi-vector":
        from gpte_ray.store.indexes import index_on

        assert index_on(lance.dataset(f"{db}/docs.lance"), "vector") == "IVF_PQ"  # searched above when not exact
