"""Search over a sparse table: rows ranked by the dot product of their vocabulary weights with
the query's.

Lance has no sparse vector type or index, so this is a columnar scan: each batch of rows comes
as two flat Arrow buffers (ids and weights) with offsets, a query's weights are looked up for
every stored id at once (a dense vocabulary-sized array, one gather), and the products are
summed per row by `np.bincount`. No Python runs per row; the cost is one pass over the stored
non-zeros (benchmarks/sparse_search.py measures it against a per-row loop). Only the k best
rows of each query keep their row ids, and only those rows' columns are read at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["SCAN_ROWS", "dot_scores", "sparse_search", "top_k"]

SCAN_ROWS = 65536  # rows per scanned batch: ids and weights of ~100 terms a row, ~50 MB


def dot_scores(query: np.ndarray, indices: pa.ListArray, values: pa.ListArray) -> np.ndarray:
    """Dot products (n_rows,) of a dense query (vocab,) with sparse rows (Arrow lists of ids
    and of weights, the same offsets)."""
    offsets = indices.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    ids = indices.values.to_numpy()[start:end]
    weights = values.values.to_numpy()[start:end]
    row = np.repeat(np.arange(len(indices)), np.diff(offsets))  # each stored term's row
    return np.bincount(row, weights=query[ids] * weights, minlength=len(indices))


def top_k(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, row_ids: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of (scores, row ids) so far and a new batch's, best first; rows that share no
    term with the query (score 0) are never results."""
    keep = scores > 0
    s = np.concatenate([best[0], scores[keep]])
    r = np.concatenate([best[1], row_ids[keep]])
    if len(s) > k:
        part = np.argpartition(-s, k - 1)[:k]
        s, r = s[part], r[part]
    order = np.lexsort((r, -s))  # best first, ties by row id: the same order on every run
    return s[order], r[order]


def sparse_search(ds, queries: Sequence[tuple[np.ndarray, np.ndarray]], vocab: int, k: int,
                  columns: Sequence[str], *, where: str | None = None) -> list[list[dict]]:
    """For each query (ids, weights), the k rows of the highest dot product, best first, with
    `columns` and `score`; the table is scanned once for all of them."""
    dense = np.zeros((len(queries), vocab), dtype=np.float64)
    for i, (ids, weights) in enumerate(queries):
        dense[i, np.asarray(ids, dtype=np.int64)] = weights
    empty = (np.empty(0, np.float64), np.empty(0, np.uint64))
    best = [empty] * len(queries)
    for batch in ds.to_batches(columns=["sparse_indices", "sparse_values"], filter=where, with_row_id=True,
                               batch_size=SCAN_ROWS):
        indices, values = batch.column("sparse_indices"), batch.column("sparse_values")
        row_ids = batch.column("_rowid").to_numpy()
        for i in range(len(queries)):
            best[i] = top_k(best[i], dot_scores(dense[i], indices, values), row_ids, k)
    wanted = np.unique(np.concatenate([r for _, r in best])) if best else np.empty(0, np.uint64)
    rows = ds._take_rows(wanted.tolist(), columns=list(columns)).to_pylist() if len(wanted) else []
    by_id = dict(zip(wanted.tolist(), rows))
    return [[by_id[r] | {"score": float(s)} for s, r in zip(*b)] for b in best]
