"""The query side, written once for `search` and `eval`: the query model, the vector search
backends (Lance's `nearest`, exact int8; `Searcher.search_vectors` picks one per table), scores,
and the one ranking rule for documents.

The query model is loaded once per process and table model (`query_encoder` caches it), so a
program or an evaluation that searches many times pays for the weights once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "OVERSAMPLE",
    "QUERY_BATCH",
    "QueryEncoder",
    "collapse_to_docs",
    "dequantize_int8",
    "int8_search",
    "multivector_search",
    "nearest_params",
    "query_encoder",
    "vector_search",
]

# queries per forward pass (sorted by length, so little padding) and per search call (an int8
# search holds a (queries, 16384 rows) score block)
QUERY_BATCH = 256
# chunks fetched per wanted document: a document may have several chunks among the nearest
OVERSAMPLE = 4
# up to this many queries embed on one torch thread (see _threads)
FEW_QUERIES = 16

_encoders: dict[tuple[str, str | None], QueryEncoder] = {}
_encoders_lock = threading.Lock()


class QueryEncoder:
    """A table's model, prompt, dimension and precision, applied to queries."""

    def __init__(self, fp: dict, model_path: str | None = None):
        from gpte_ray.config import ConfigError
        from gpte_ray.model.embedder import Embedder
        from gpte_ray.model.source import ModelUnavailable
        from gpte_ray.model.spec import spec_from_fingerprint
        from gpte_ray.model.tokenize import TextTokenizer

        try:
            self.spec = spec_from_fingerprint(fp, model_path)  # checks the weights are the table's
        except ModelUnavailable as e:
            if model_path is not None:
                raise
            # the fingerprint keeps a local folder's name only: say how to point at it
            raise ConfigError(f"{e}; a table built from a local model folder needs --model FOLDER") from None
        self.tokenizer = TextTokenizer(self.spec)
        self.embedder = Embedder(self.spec, "cpu", role="query")

    def encode(self, queries: Sequence[str], calibration: dict | None, quantize: bool = True) -> np.ndarray:
        """Query vectors (n, dim) exactly as the table's documents were embedded, with the
        query prompt; left in float32 when `quantize` is false (asymmetric search over codes).
        Multi-vector and sparse tables: an object array of n entries, each query's (tokens, dim)
        vectors or its (ids, weights)."""
        from gpte_ray.model.embedder import postprocess

        if self.spec.output != "dense":
            return self._encode_rows(queries)
        spec = self.spec if quantize else dataclasses.replace(self.spec, precision="float32")
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        out: np.ndarray | None = None
        with _threads(1 if len(queries) <= FEW_QUERIES else None):
            for start in range(0, len(order), QUERY_BATCH):
                idx = order[start : start + QUERY_BATCH]
                chunks = self.tokenizer.encode([queries[i] for i in idx], role="query")
                pooled = self.embedder.embed([c.input_ids for c in chunks], [c.prompt_len for c in chunks])
                vec = postprocess(pooled, spec, calibration)
                if out is None:
                    out = np.empty((len(queries), *vec.shape[1:]), dtype=vec.dtype)
                out[idx] = vec
        return out if out is not None else np.empty((0, self.spec.dim), dtype=np.float32)

    def _encode_rows(self, queries: Sequence[str]) -> np.ndarray:
        out = np.empty(len(queries), dtype=object)
        with _threads(1 if len(queries) <= FEW_QUERIES else None):
            for start in range(0, len(queries), QUERY_BATCH):
                chunks = self.tokenizer.encode(list(queries[start : start + QUERY_BATCH]), role="query")
                emb = self.embedder.embed_outputs([c.input_ids for c in chunks], [c.prompt_len for c in chunks])
                for i in range(len(chunks)):
                    out[start + i] = emb.row(i)
        return out


@contextlib.contextmanager
def _threads(n: int | None):
    """Torch's intra-op threads set to `n` for a while (None: unchanged).

    A few short queries are milliseconds of work: split across threads they spend more on
    synchronisation than they save, and on a busy machine the threads wait for each other
    (MiniLM, one query, 2 busy CPUs: 40 ms on one thread, 0.8-1.9 s on two).
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def query_encoder(fp: dict, model_path: str | None = None) -> QueryEncoder:
    """The process's encoder for this table model (loaded, and its weights checked, once)."""
    key = (json.dumps(fp, sort_keys=True), model_path)
    with _encoders_lock:
        if key not in _encoders:
            _encoders[key] = QueryEncoder(fp, model_path)
        return _encoders[key]


def nearest_params(q: np.ndarray, k: int, metric: str, exact: bool = False) -> dict:
    """Lance `nearest` settings: enough IVF partitions probed, and candidates re-ranked on the
    full vectors, so indexed recall stays close to exact search."""
    params = {"column": "vector", "q": q, "k": k, "metric": metric}
    if exact:
        params["use_index"] = False
    else:
        # HNSW must explore at least the k x refine candidates it is asked for
        params.update(nprobes=64, refine_factor=10, ef=max(200, 2 * k * 10))
    return params


def vector_search(ds, vectors: np.ndarray, k: int, metric: str, columns: Sequence[str], *, where: str | None = None,
                  exact: bool = False, tune: Mapping | None = None) -> list[list[dict]]:
    """The k nearest rows to each query vector (n, dim), best first, with a `score`:
    cosine similarity, or for binary vectors the share of equal bits."""
    vectors = np.atleast_2d(vectors)
    nearest = nearest_params(vectors if len(vectors) > 1 else vectors[0], k, metric, exact)
    if not exact and tune:
        nearest.update(tune)
        if "refine_factor" in tune:  # HNSW must explore k x refine candidates
            nearest["ef"] = max(nearest["ef"], 2 * k * tune["refine_factor"])
    table = ds.to_table(columns=[*columns, "_distance"], nearest=nearest, filter=where,
                        prefilter=where is not None, disable_scoring_autoprojection=True)
    qi = (table.column("query_index").to_numpy() if "query_index" in table.column_names
          else np.zeros(table.num_rows, dtype=np.int64))
    dist = table.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
    scores = 1.0 - dist if metric == "cosine" else 1.0 - dist / (8 * vectors.shape[1])
    out: list[list[dict]] = [[] for _ in range(len(vectors))]
    for q, row, s in zip(qi.tolist(), table.select(list(columns)).to_pylist(), scores.tolist()):
        out[q].append(row | {"score": s})
    return out


def multivector_search(ds, queries: Sequence[np.ndarray], k: int, columns: Sequence[str], *,
                       where: str | None = None, exact: bool = False, tune: Mapping | None = None) -> list[list[dict]]:
    """The k best rows of a multi-vector table for each query's token vectors (tokens, dim), by
    MaxSim: the sum over query tokens of the best cosine with a row's tokens. Lance computes it
    (its cosine distance for a multi-vector query is the number of query tokens minus MaxSim),
    with the table's vector index unless `exact`."""
    out = []
    for q in queries:
        nearest = nearest_params(np.asarray(q, dtype=np.float32), k, "cosine", exact)
        if not exact and tune:
            nearest.update(tune)
        table = ds.to_table(columns=[*columns, "_distance"], nearest=nearest, filter=where,
                            prefilter=where is not None, disable_scoring_autoprojection=True)
        scores = len(q) - table.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
        out.append([row | {"score": s} for row, s in zip(table.select(list(columns)).to_pylist(), scores.tolist())])
    return out


def dequantize_int8(codes: np.ndarray, calibration: Mapping) -> np.ndarray:
    """int8 codes (n, dim) back to float32 with the table's fixed per-dimension ranges."""
    low = np.asarray(calibration["low"], dtype=np.float32)
    high = np.asarray(calibration["high"], dtype=np.float32)
    return low + (codes.astype(np.float32) + 128.0) / 255.0 * (high - low)


def int8_search(ds, vectors: np.ndarray, calibration: Mapping, k: int, columns: Sequence[str], *,
                where: str | None = None) -> list[list[dict]]:
    """Exact cosine of float32 query vectors (n, dim) against the table's dequantised int8
    codes (Lance's ANN search takes float vectors only); the k best rows per query."""
    q = np.atleast_2d(vectors).astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)  # (n_queries, <= k)
    best_rows = np.empty((len(q), 0), dtype=object)
    for batch in ds.to_batches(columns=[*columns, "vector"], filter=where, batch_size=16384):
        v = dequantize_int8(np.stack(batch["vector"].to_numpy(zero_copy_only=False)), calibration)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # (n_rows, dim)
        rows = np.empty(batch.num_rows, dtype=object)
        rows[:] = batch.select(list(columns)).to_pylist()
        sc = np.concatenate([best_s, q @ v.T], axis=1)
        cand = np.concatenate([best_rows, np.broadcast_to(rows, (len(q), len(rows)))], axis=1)
        keep = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        best_s, best_rows = np.take_along_axis(sc, keep, 1), np.take_along_axis(cand, keep, 1)
    return [[r | {"score": float(s)} for r, s in zip(best_rows[i], best_s[i])] for i in range(len(q))]


def collapse_to_docs(rows: Iterable) -> list[tuple[str, float]]:
    """Chunk hits -> [(doc_id, best chunk score)], best first, ties by doc_id.

    The one ranking rule for documents (search's grouping and eval's metrics both use it), so
    exact and indexed search rank a tie the same way whatever order the rows came in.
    `rows`: dicts with doc_id and score, or (doc_id, score) pairs; higher score is better.
    """
    best: dict[str, float] = {}
    for r in rows:
        doc, score = (r["doc_id"], r["score"]) if isinstance(r, Mapping) else r
        score = float(score)
        if doc not in best or score > best[doc]:
            best[doc] = score
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
