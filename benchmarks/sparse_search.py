"""Sparse search at scale: the columnar scan `gpte_ray.query.sparse.sparse_search` against a
naive per-row Python loop, on a synthetic sparse table (SPLADE-like: a Zipf vocabulary).

    python benchmarks/sparse_search.py --rows 1000000 --terms 100 --queries 5 --naive-rows 100000

Writes the table once under --out (reused when it holds --rows rows), times --queries queries
through `sparse_search` over every row, and the naive loop (each row's ids and weights as
Python lists, a dict of the query's weights) over the first --naive-rows rows, then prints one
line per method with rows, seconds per query and rows/s, and checks both rank alike there.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VOCAB = 30522


def synthetic(rows: int, terms: int, seed: int, batch: int = 100_000):
    """Batches of rows with ~`terms` distinct ascending ids (Zipf-distributed) and weights."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        lengths = rng.integers(terms // 2, terms * 3 // 2, n)
        ids = (rng.zipf(1.3, int(lengths.sum())) % VOCAB).astype(np.int32)
        row = np.repeat(np.arange(n), lengths)
        key = np.unique(row.astype(np.int64) * VOCAB + ids)  # distinct ids per row, ascending
        row, ids = key // VOCAB, (key % VOCAB).astype(np.int32)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(row, minlength=n), out=offsets[1:])
        weights = rng.gamma(2.0, 0.5, len(ids)).astype(np.float32)
        yield pa.table({
            "doc_id": pa.array([f"d{start + i}" for i in range(n)]),
            "chunk": pa.array(np.zeros(n, np.int32)),
            "row": pa.array(np.arange(start, start + n)),  # for a filter to the naive loop's rows
            "sparse_indices": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            "sparse_values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights)),
        })


def table(path: str, rows: int, terms: int):
    import lance

    if os.path.exists(path):
        ds = lance.dataset(path)
        if ds.count_rows() == rows:
            return ds
    first, *rest = list(synthetic(rows, terms, seed=0))
    ds = lance.write_dataset(first, path, mode="overwrite", max_rows_per_file=250_000)
    for t in rest:
        ds = lance.write_dataset(t, path, mode="append", max_rows_per_file=250_000)
    return ds


def naive(ds, query: tuple[np.ndarray, np.ndarray], k: int, rows: int) -> list[tuple[str, float]]:
    """What a first version would write: a Python loop over rows and their terms."""
    weights = dict(zip(query[0].tolist(), query[1].tolist()))
    scored = []
    for batch in ds.to_batches(columns=["doc_id", "sparse_indices", "sparse_values"], filter=f"row < {rows}"):
        for doc, ids, vals in zip(batch["doc_id"].to_pylist(), batch["sparse_indices"].to_pylist(),
                                  batch["sparse_values"].to_pylist()):
            s = sum(weights.get(i, 0.0) * v for i, v in zip(ids, vals))
            if s > 0:
                scored.append((doc, s))
    scored.sort(key=lambda x: -x[1])
    return scored[:k]


def main() -> None:
    from gpte_ray.query.sparse import sparse_search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--terms", type=int, default=100, help="mean stored terms per row")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--naive-rows", type=int, default=100_000, help="rows the naive loop scans (it is slow)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="/tmp/gpte-sparse-bench")
    args = ap.parse_args()

    t = time.perf_counter()
    ds = table(os.path.join(args.out, f"sparse-{args.rows}.lance"), args.rows, args.terms)
    nnz = sum(pc.sum(pc.list_value_length(b["sparse_indices"])).as_py() for b in
              ds.to_batches(columns=["sparse_indices"]))
    print(f"table: {ds.count_rows():,} rows, {nnz:,} stored terms ({nnz / ds.count_rows():.0f} per row), "
          f"ready in {time.perf_counter() - t:.1f} s")
    qt = next(synthetic(args.queries, 20, seed=1))  # queries: ~20 terms each, from the same vocabulary
    queries = [(np.asarray(i, np.int32), np.asarray(v, np.float32))
               for i, v in zip(qt["sparse_indices"].to_pylist(), qt["sparse_values"].to_pylist())]

    t = time.perf_counter()
    sparse_search(ds, queries, VOCAB, args.k, ["doc_id"])
    both = time.perf_counter() - t
    t = time.perf_counter()
    for q in queries:
        sparse_search(ds, [q], VOCAB, args.k, ["doc_id"])
    each = (time.perf_counter() - t) / len(queries)
    print(f"columnar scan : {args.rows:>9,} rows  {each:8.3f} s/query  {args.rows / each:>12,.0f} rows/s  "
          f"({len(queries)} queries in one scan: {both:.3f} s)")

    small = min(args.naive_rows, args.rows)
    t = time.perf_counter()
    slow = [naive(ds, q, args.k, small) for q in queries]
    per = (time.perf_counter() - t) / len(queries)
    print(f"naive Python  : {small:>9,} rows  {per:8.3f} s/query  {small / per:>12,.0f} rows/s  "
          f"(at {args.rows:,} rows: ~{per * args.rows / small:.1f} s/query)")
    fast = sparse_search(ds, queries, VOCAB, args.k, ["doc_id"], where=f"row < {small}")
    same = all([h["doc_id"] for h in f] == [d for d, _ in s] for f, s in zip(fast, slow))
    print(f"same top-{args.k} on the first {small:,} rows: {same}")


if __name__ == "__main__":
    main()
