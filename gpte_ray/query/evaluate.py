"""Retrieval evaluation of a table on a BEIR-layout set: exact and indexed search, side by side.

The table holds chunks, so retrieval results are chunk rows; they collapse to documents by
`gpte_ray.query.encoder.collapse_to_docs` (a document's score is its best chunk's, ties by doc_id),
the rule `search` groups by too. Metrics: `gpte_ray.query.metrics`; files: `gpte_ray.query.beir`; the
docstring set: `gpte_ray.demo.evalset`; the command line: `gpte-ray eval` in `gpte_ray.cli`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gpte_ray.query.beir import load_qrels, load_queries
from gpte_ray.query.encoder import collapse_to_docs, int8_search, nearest_params, query_encoder, vector_search
from gpte_ray.query.metrics import has_relevant, mean_metrics, metric_names
from gpte_ray.store.indexes import index_on

__all__ = ["evaluate", "rank_docs"]

# chunks fetched per wanted document on the first try (a document may have several chunks)
OVERSAMPLE = 4
# queries searched per call of a backend
QUERY_BATCH = 256

# a backend: (query vectors (n, dim), chunk rows wanted per query) -> per query, rows with doc_id and score
Backend = Callable[[np.ndarray, int], list[list[dict]]]


def rank_docs(search: Backend, vectors: np.ndarray, depth: int, n_rows: int) -> list[list[str]]:
    """For each query, at least `depth` distinct documents (when the table has them), best first.

    Fetches depth x OVERSAMPLE chunks; a query whose chunks covered fewer documents is fetched
    again with 4x the chunks, until it fills or the table runs out."""
    limit = min(depth * OVERSAMPLE, n_rows)
    ranked: list[list[str] | None] = [None] * len(vectors)
    todo = list(range(len(vectors)))
    while todo:
        hits = search(vectors[todo], limit)
        again = []
        for q, rows in zip(todo, hits):
            docs = collapse_to_docs(rows)
            if len(docs) >= depth or len(rows) < limit or limit >= n_rows:
                ranked[q] = [d for d, _ in docs]
            else:
                again.append(q)
        todo = again
        limit = min(limit * 4, n_rows)
    return ranked  # type: ignore[return-value]


def evaluate(db: str, table: str, queries_path: str, qrels_path: str, k: int = 10,
             storage_options: dict | None = None, model_path: str | None = None,
             nprobes: int | None = None, refine_factor: int | None = None) -> dict:
    """recall@k, nDCG@10, MRR@10, recall@10 and recall@100 of exact and indexed search.

    Each metric comes from a search as deep as its cutoff (max(cutoff, 10) documents, fetched as
    4x that many chunks, more if a query's chunks cover too few documents).

    Queries are those of `queries_path` that have judgements in `qrels_path`; a query with no
    relevant document is skipped (counted in "skipped"). `indexed` is the table's default search
    path, with `gpte-ray search`'s `nearest` settings (its vector index, or the same exact scan
    when there is none or the table is int8: then "note" says so). `nprobes` / `refine_factor`
    override those settings for the indexed search.
    """
    from gpte_ray.config import ConfigError
    from gpte_ray.query.search import open_embedded_table
    from gpte_ray.store.indexes import vector_metric

    if k < 1:
        raise ConfigError(f"config error: k: must be >= 1, got {k}")
    t0 = time.perf_counter()
    store, ds, fp = open_embedded_table(db, table, storage_options)
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    qids = [q for q in queries if has_relevant(qrels.get(q, {}))]
    if not qids:  # every metric would be null
        raise ConfigError(f"input error: no query of {queries_path} has a relevant document in {qrels_path} "
                          "(query ids must match, and a relevant document has a score above 0)")
    no_relevant = sum(1 for q in queries if q in qrels and q not in set(qids))
    missing = sum(1 for q in qrels if q not in queries)

    names = metric_names(k)
    # each metric is measured on a retrieval as deep as its cutoff needs (at least 10 documents),
    # as a user's query for that many would be: an IVF index probes fewer partitions for a small k
    passes: dict[int, list[str]] = {}
    for name in names:
        passes.setdefault(max(10, int(name.split("@")[1])), []).append(name)
    metric = vector_metric(fp)
    int8 = fp["precision"] == "int8"
    calibration = store.calibration(ds)
    n_rows = ds.count_rows()
    index = None if int8 else index_on(ds, "vector")
    tune: dict = {}
    if nprobes is not None:
        tune["nprobes"] = nprobes
    if refine_factor is not None:
        tune["refine_factor"] = refine_factor

    t = time.perf_counter()
    vectors = query_encoder(fp, model_path).encode([queries[q] for q in qids], calibration, quantize=not int8)
    embed_s = time.perf_counter() - t

    result: dict = {"queries": len(qids), "k": k, "table_rows": n_rows, "version": ds.version,
                    "index": index or "none"}
    seconds = {"embed": round(embed_s, 3)}
    modes = [("exact", False)] + ([("indexed", True)] if index else [])
    for mode, use_index in modes:
        t = time.perf_counter()

        def search(vecs: np.ndarray, limit: int, use_index: bool = use_index) -> list[list[dict]]:
            if int8:
                return int8_search(ds, vecs, calibration, limit, ["doc_id"])
            return vector_search(ds, vecs, limit, metric, ["doc_id"], exact=not use_index, tune=tune)

        means: dict = {}
        for depth, group in sorted(passes.items()):
            runs: dict[str, list[str]] = {q: [] for q in qids}
            for start in range(0, len(qids) if n_rows else 0, QUERY_BATCH):
                ranked = rank_docs(search, vectors[start : start + QUERY_BATCH], depth, n_rows)
                runs.update(zip(qids[start : start + QUERY_BATCH], ranked))
            means.update({n: v for n, v in mean_metrics(runs, qrels, group).items() if n in group})
        result[mode] = {n: means[n] for n in names}
        seconds[mode] = round(time.perf_counter() - t, 3)
    if not index:
        result["indexed"] = dict(result["exact"])
        result["note"] = ("int8 table: search scores the dequantised codes exactly, no vector index" if int8
                          else "no vector index: indexed search is the exact scan")
    else:
        defaults = nearest_params(vectors[:1], 10, metric)
        result["search"] = {key: v for key, v in {**defaults, **tune}.items()
                            if key not in ("column", "q", "k", "metric", "ef", "use_index")}
    result["skipped"] = {"no_relevant": no_relevant, "qrels_without_query": missing}
    seconds["total"] = round(time.perf_counter() - t0, 3)
    result["seconds"] = seconds
    return result
