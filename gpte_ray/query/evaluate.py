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

from gpte_ray.config import ConfigError
from gpte_ray.query.beir import load_qrels, load_queries
from gpte_ray.query.encoder import OVERSAMPLE, collapse_to_docs, nearest_params
from gpte_ray.query.metrics import has_relevant, mean_metrics, metric_names
from gpte_ray.query.search import Searcher

__all__ = ["evaluate", "rank_docs"]

# a backend: (query vectors (n, dim), chunk rows wanted per query) -> per query, rows with doc_id and score
Backend = Callable[[np.ndarray, int], list[list[dict]]]


def rank_docs(search: Backend, vectors: np.ndarray, depth: int, n_rows: int) -> list[list[str]]:
    """For each query, at least `depth` distinct documents (when the table has them), best first.

    Fetches depth x OVERSAMPLE chunks; a query whose chunks covered fewer documents is fetched
    again with OVERSAMPLE times as many, until it fills or the table runs out."""
    if not n_rows:
        return [[] for _ in vectors]
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
        limit = min(limit * OVERSAMPLE, n_rows)
    return ranked  # type: ignore[return-value]


def evaluate(db: str, table: str, queries_path: str, qrels_path: str, k: int = 10, *,
             storage_options: dict | None = None, model_path: str | None = None,
             nprobes: int | None = None, refine_factor: int | None = None) -> dict:
    """recall@k, nDCG@10, MRR@10, recall@10 and recall@100 of exact and indexed search.

    Each metric comes from a search as deep as its cutoff (max(cutoff, 10) documents, fetched as
    OVERSAMPLE x that many chunks, more if a query's chunks cover too few documents).

    Queries are those of `queries_path` that have judgements in `qrels_path`; a query with no
    relevant document is skipped (counted in "skipped"). `indexed` is the table's default search
    path, with `gpte-ray search`'s `nearest` settings (its vector index, or the same exact scan
    when there is none or the table is int8: then "note" says so). `nprobes` / `refine_factor`
    override those settings for the indexed search.
    """
    if k < 1:
        raise ConfigError(f"config error: k: must be >= 1, got {k}")
    t0 = time.perf_counter()
    queries, qrels, qids, skipped = _judged_queries(queries_path, qrels_path)  # before a model load
    searcher = Searcher(db, table, storage_options, model_path)
    n_rows = searcher.ds.count_rows()
    index = searcher.vector_index()
    tune = {key: v for key, v in (("nprobes", nprobes), ("refine_factor", refine_factor)) if v is not None}

    t = time.perf_counter()
    vectors = searcher.embed([queries[q] for q in qids])
    seconds = {"embed": round(time.perf_counter() - t, 3)}
    result: dict = {"queries": len(qids), "k": k, "table_rows": n_rows, "version": searcher.ds.version,
                    "index": index or "none"}
    for mode, exact in [("exact", True)] + ([("indexed", False)] if index else []):
        t = time.perf_counter()

        def search(vecs: np.ndarray, limit: int, exact: bool = exact) -> list[list[dict]]:
            return searcher.search_vectors(vecs, limit, ["doc_id"], exact=exact, tune=tune)

        result[mode] = _metrics_by_depth(search, vectors, qids, qrels, metric_names(k), n_rows)
        seconds[mode] = round(time.perf_counter() - t, 3)
    if not index:
        result["indexed"] = dict(result["exact"])
        result["note"] = ("int8 table: search scores the dequantised codes exactly, no vector index" if searcher.int8
                          else "no vector index: indexed search is the exact scan")
    else:
        defaults = nearest_params(vectors[:1], 10, searcher.metric)
        result["search"] = {key: v for key, v in {**defaults, **tune}.items()
                            if key not in ("column", "q", "k", "metric", "ef", "use_index")}
    result["skipped"] = skipped
    seconds["total"] = round(time.perf_counter() - t0, 3)
    result["seconds"] = seconds
    return result


def _judged_queries(queries_path: str, qrels_path: str) -> tuple[dict, dict, list[str], dict]:
    """(queries, qrels, ids of the queries with a relevant document, counts of what was skipped)."""
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    qids = [q for q in queries if has_relevant(qrels.get(q, {}))]
    if not qids:  # every metric would be null
        raise ConfigError(f"input error: no query of {queries_path} has a relevant document in {qrels_path} "
                          "(query ids must match, and a relevant document has a score above 0)")
    judged = set(qids)
    skipped = {"no_relevant": sum(1 for q in queries if q in qrels and q not in judged),
               "qrels_without_query": sum(1 for q in qrels if q not in queries)}
    return queries, qrels, qids, skipped


def _metrics_by_depth(search: Backend, vectors: np.ndarray, qids: list[str], qrels: dict, names: list[str],
                      n_rows: int) -> dict:
    """{metric: mean}, each metric measured on a retrieval as deep as its cutoff needs (at least 10
    documents), as a user's query for that many would be: an IVF index probes fewer partitions for
    a small k."""
    passes: dict[int, list[str]] = {}
    for name in names:
        passes.setdefault(max(10, int(name.split("@")[1])), []).append(name)
    means: dict = {}
    for depth, group in sorted(passes.items()):
        runs = dict(zip(qids, rank_docs(search, vectors, depth, n_rows)))
        means.update({n: v for n, v in mean_metrics(runs, qrels, group).items() if n in group})
    return {n: means[n] for n in names}
