"""Query a table with the model, prompt, dimension and precision it was embedded with."""

from __future__ import annotations

import numpy as np

from gpte_ray.config import ConfigError
from gpte_ray.spec import spec_from_fingerprint
from gpte_ray.table import TableStore

__all__ = ["embed_queries", "fuse_rankings", "group_by_document", "nearest_params", "open_embedded_table", "search"]


def embed_queries(fp: dict, queries: list[str], calibration: dict | None, model_path: str | None = None,
                  quantize: bool = True) -> np.ndarray:
    """Query vectors exactly as the table's documents were embedded, with the query prompt
    (left in float32 when `quantize` is false: asymmetric search over int8 codes)."""
    import dataclasses

    from gpte_ray.embedder import Embedder, postprocess
    from gpte_ray.tokenize import TextTokenizer

    spec = spec_from_fingerprint(fp, model_path)
    if not quantize:
        spec = dataclasses.replace(spec, precision="float32")
    chunks = TextTokenizer(spec).encode(queries, role="query")
    pooled = Embedder(spec, "cpu").embed([c.input_ids for c in chunks], [c.prompt_len for c in chunks])
    return postprocess(pooled, spec, calibration)


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


def search(db: str, table: str, query: str, k: int = 10, storage_options: dict | None = None,
           model_path: str | None = None, where: str | None = None, exact: bool = False,
           hybrid: bool = False, group: bool = True) -> list[dict]:
    """The best k results, best first: doc_id, chunk, score and a text snippet.

    With `group`, results are documents: a document's score is its best chunk's, and its other
    matching chunks are listed under `chunks`. With `hybrid`, the vector ranking is fused with
    a full-text ranking of the chunk texts (reciprocal rank fusion; `score` is then the fused one).
    """
    store, ds, fp = open_embedded_table(db, table, storage_options)
    columns = [c for c in ("doc_id", "chunk", "text") if c in ds.schema.names]
    calibration = store.calibration(ds)
    depth = k * 4 if group else k  # enough chunks to fill k documents in the usual case
    if fp["precision"] == "int8":
        vec = embed_queries(fp, [query], calibration, model_path, quantize=False)[0]
        hits = _int8_search(ds, vec, calibration, depth, columns, where)
    else:
        vec = embed_queries(fp, [query], calibration, model_path)[0]
        metric = "hamming" if fp["precision"] == "binary" else "cosine"
        result = ds.to_table(columns=[*columns, "_distance"], nearest=nearest_params(vec, depth, metric, exact),
                             filter=where, prefilter=where is not None, disable_scoring_autoprojection=True)
        hits = []
        for r in result.to_pylist():
            dist = float(r.pop("_distance"))
            # cosine distance -> similarity; Hamming distance -> share of equal bits
            r["score"] = 1.0 - dist if metric == "cosine" else 1.0 - dist / (8 * len(vec))
            hits.append(r)
    if hybrid:
        hits = fuse_rankings(hits, _text_search(ds, query, depth, columns, where))
    rows = [{"doc_id": r["doc_id"], "chunk": r["chunk"], "score": round(float(r["score"]), 6),
             "text": (r.get("text") or "")[:200]} for r in hits]
    return group_by_document(rows)[:k] if group else rows[:k]


def group_by_document(rows: list[dict]) -> list[dict]:
    """Chunk hits (best first) -> one entry per document, at its best chunk's rank."""
    docs: dict[str, dict] = {}
    for r in rows:
        if r["doc_id"] in docs:
            docs[r["doc_id"]]["chunks"].append({"chunk": r["chunk"], "score": r["score"]})
        else:
            docs[r["doc_id"]] = r | {"chunks": [{"chunk": r["chunk"], "score": r["score"]}]}
    return list(docs.values())


def fuse_rankings(*rankings: list[dict], k0: int = 60) -> list[dict]:
    """Reciprocal rank fusion of ranked chunk lists: score = sum over lists of 1 / (k0 + rank)."""
    fused: dict[tuple, dict] = {}
    for ranking in rankings:
        for rank, r in enumerate(ranking, start=1):
            key = (r["doc_id"], r["chunk"])
            entry = fused.setdefault(key, r | {"score": 0.0})
            entry["score"] += 1.0 / (k0 + rank)
    return sorted(fused.values(), key=lambda r: -r["score"])


def _text_search(ds, query: str, k: int, columns: list[str], where: str | None) -> list[dict]:
    """BM25 full-text ranking over the chunk texts (needs the table's text column and index)."""
    if "text" not in ds.schema.names:
        raise ConfigError("config error: search --hybrid: the table stores no text (output.store_text)")
    if not any("text" in idx.field_names for idx in ds.describe_indices()):
        raise ConfigError("config error: search --hybrid: the table has no full-text index on text "
                          "(set output.fts_index: true and run index)")
    result = ds.to_table(columns=[*columns, "_score"], full_text_query=query, limit=k, filter=where,
                         disable_scoring_autoprojection=True)
    return [r | {"score": float(r.pop("_score"))} for r in result.to_pylist()]


def _int8_search(ds, q: np.ndarray, calibration: dict, k: int, columns: list[str], where: str | None) -> list[dict]:
    """Exact search over int8 codes (Lance's ANN search takes float vectors only): dequantise
    each batch with the table's fixed ranges and score cosine against the float query."""
    low, high = np.asarray(calibration["low"]), np.asarray(calibration["high"])
    q = q / max(np.linalg.norm(q), 1e-12)
    best: list[dict] = []
    for batch in ds.to_batches(columns=[*columns, "vector"], filter=where, batch_size=16384):
        codes = np.stack(batch["vector"].to_numpy(zero_copy_only=False)).astype(np.float64)
        v = low + (codes + 128.0) / 255.0 * (high - low)  # (n, dim) back to floats
        scores = (v @ q) / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
        top = np.argsort(-scores)[:k]
        rows = batch.select(columns).take(top).to_pylist()
        best += [r | {"score": float(scores[i])} for r, i in zip(rows, top)]
        best = sorted(best, key=lambda r: -r["score"])[:k]
    return best
