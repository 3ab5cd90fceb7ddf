"""Query a table with the model, prompt, dimension and precision it was embedded with.

`Searcher(db, table)` opens the table and its query model once, for programs that search many
times; `search(...)` is one call of it (the model stays cached for the process).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpte_ray.config import ConfigError
from gpte_ray.query.encoder import (
    OVERSAMPLE,
    QUERY_BATCH,
    collapse_to_docs,
    int8_search,
    multivector_search,
    nearest_params,
    query_encoder,
    vector_search,
)
from gpte_ray.query.sparse import sparse_search
from gpte_ray.store.indexes import index_on
from gpte_ray.store.table import TableStore, kept_fields

__all__ = ["Searcher", "fuse_rankings", "group_by_document", "nearest_params", "open_embedded_table", "search"]

SNIPPET_CHARS = 200


def open_embedded_table(db: str, table: str, storage_options: dict | None = None):
    """(store, dataset, fingerprint) of a table gpte-ray wrote; one-line errors otherwise."""
    store = TableStore(db, table, storage_options)
    ds = store.open()
    if ds is None:
        raise ConfigError(f"config error: output.table: no table {table!r} in {db}")
    fp = store.fingerprint(ds)
    if fp is None:
        raise ConfigError(f"config error: output.table: {table!r} was not written by gpte-ray")
    return store, ds, fp


class Searcher:
    """One table, opened once, with its query model loaded once.

    Reads the table version it opened; `refresh()` moves to the latest one. Scores are cosine
    similarity (binary tables: the share of equal bits; multi-vector tables: MaxSim, the sum
    over query tokens of the best cosine; sparse tables: the dot product of the weights, rows
    sharing no term with the query left out); with `hybrid`, reciprocal-rank-fusion scores (see
    `fuse_rankings`), which rank but are not similarities.
    """

    def __init__(self, db: str, table: str, storage_options: dict | None = None, model_path: str | None = None):
        self.db, self.table = db, table
        self.storage_options = storage_options
        self.model_path = model_path
        self.refresh()

    def refresh(self) -> None:
        """Open the table's latest version (and its model, if that changed)."""
        from gpte_ray.store.indexes import vector_metric

        self.store, self.ds, self.fp = open_embedded_table(self.db, self.table, self.storage_options)
        self.calibration = self.store.calibration(self.ds)
        self.metric = vector_metric(self.fp)
        # int8 tables are searched asymmetrically: float32 queries, an exact scan of the dequantised
        # codes (Lance's ANN search takes float vectors only)
        self.int8 = self.fp["precision"] == "int8"
        self.output = self.fp.get("output", "dense")  # dense, multi-vector (MaxSim) or sparse (dot product)
        self.encoder = query_encoder(self.fp, self.model_path)
        # kept source columns (input.keep_columns) come with every result
        self.kept = kept_fields(self.ds.schema).names
        self.columns = [c for c in ("doc_id", "chunk", "text") if c in self.ds.schema.names] + self.kept

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        """Query vectors as `search_vectors` takes them: the table's precision, float32 for int8 tables."""
        return self.encoder.encode(list(queries), self.calibration, quantize=not self.int8)

    def vector_index(self) -> str | None:
        """The vector index `search_vectors` uses when not exact (None: none, or an int8 or sparse table)."""
        return None if self.int8 or self.output == "sparse" else index_on(self.ds, "vector")

    def search_vectors(self, vectors: np.ndarray, k: int, columns: Sequence[str] | None = None, *,
                       where: str | None = None, exact: bool = False, tune: dict | None = None) -> list[list[dict]]:
        """The table's search: the k nearest chunk rows to each query vector (n, dim), best first,
        with `columns` (default: those `search_many` returns) and a `score`. `tune` overrides
        Lance's `nearest` settings for indexed search."""
        columns = self.columns if columns is None else list(columns)
        out: list[list[dict]] = []
        for start in range(0, len(vectors), QUERY_BATCH):
            batch = vectors[start : start + QUERY_BATCH]
            if self.output == "sparse":
                out += sparse_search(self.ds, batch, self.fp["dim"], k, columns, where=where)
            elif self.output == "multi-vector":
                out += multivector_search(self.ds, batch, k, columns, where=where, exact=exact, tune=tune)
            elif self.int8:
                out += int8_search(self.ds, batch, self.calibration, k, columns, where=where)
            else:
                out += vector_search(self.ds, batch, k, self.metric, columns, where=where, exact=exact, tune=tune)
        return out

    def search(self, query: str, k: int = 10, *, where: str | None = None, exact: bool = False,
               hybrid: bool = False, group: bool = True) -> list[dict]:
        """The best k results for one query, best first (see `search_many`)."""
        return self.search_many([query], k, where=where, exact=exact, hybrid=hybrid, group=group)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, *, where: str | None = None, exact: bool = False,
                    hybrid: bool = False, group: bool = True) -> list[list[dict]]:
        """The best k results per query, best first: doc_id, chunk, score, a text snippet and the
        table's kept source columns.

        With `group`, results are documents: a document's score is its best chunk's (ties by
        doc_id), and its matching chunks are listed under `chunks`. With `hybrid`, the vector
        ranking is fused with a full-text (BM25) ranking of the chunk texts by reciprocal rank.
        `where` is a SQL filter on the table's columns.
        """
        depth = k * OVERSAMPLE if group else k  # enough chunks to fill k documents in the usual case
        hits = self.search_vectors(self.embed(queries), depth, where=where, exact=exact)
        out = []
        for query, rows in zip(queries, hits):
            if hybrid:
                rows = fuse_rankings(rows, self._text_search(query, depth, where))
            rows = [{"doc_id": r["doc_id"], "chunk": r["chunk"], "score": round(float(r["score"]), 6),
                     "text": (r.get("text") or "")[:SNIPPET_CHARS], **{c: r[c] for c in self.kept}} for r in rows]
            out.append(group_by_document(rows)[:k] if group else rows[:k])
        return out

    def _text_search(self, query: str, k: int, where: str | None) -> list[dict]:
        """BM25 full-text ranking over the chunk texts (needs the table's text column and index)."""
        if "text" not in self.ds.schema.names:
            raise ConfigError("config error: search --hybrid: the table stores no text (output.store_text)")
        if index_on(self.ds, "text") is None:
            raise ConfigError("config error: search --hybrid: the table has no full-text index on text "
                              "(set output.fts_index: true and run index)")
        result = self.ds.to_table(columns=[*self.columns, "_score"], full_text_query=query, limit=k, filter=where,
                                  disable_scoring_autoprojection=True)
        return [r | {"score": float(r.pop("_score"))} for r in result.to_pylist()]


def search(db: str, table: str, query: str, k: int = 10, *, storage_options: dict | None = None,
           model_path: str | None = None, where: str | None = None, exact: bool = False,
           hybrid: bool = False, group: bool = True) -> list[dict]:
    """The best k results for `query`, best first (`Searcher.search_many` describes them)."""
    searcher = Searcher(db, table, storage_options, model_path)
    return searcher.search(query, k, where=where, exact=exact, hybrid=hybrid, group=group)


def group_by_document(rows: list[dict]) -> list[dict]:
    """Chunk hits -> one entry per document (its best chunk's row, plus `chunks`: each of its
    hit chunks with its score, best first), ranked as `collapse_to_docs` ranks documents."""
    docs: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: -r["score"]):
        entry = {"chunk": r["chunk"], "score": r["score"]}
        if r["doc_id"] in docs:
            docs[r["doc_id"]]["chunks"].append(entry)
        else:
            docs[r["doc_id"]] = r | {"chunks": [entry]}
    return [docs[d] for d, _ in collapse_to_docs(rows)]


def fuse_rankings(*rankings: list[dict], k0: int = 60) -> list[dict]:
    """Reciprocal rank fusion of ranked chunk lists: score = sum over lists of 1 / (k0 + rank).

    A fused score is at most (number of lists) / (k0 + 1), about 0.033 for two lists: it orders
    results, it is not a similarity."""
    fused: dict[tuple, dict] = {}
    for ranking in rankings:
        for rank, r in enumerate(ranking, start=1):
            key = (r["doc_id"], r["chunk"])
            entry = fused.setdefault(key, r | {"score": 0.0})
            entry["score"] += 1.0 / (k0 + rank)
    return sorted(fused.values(), key=lambda r: -r["score"])
