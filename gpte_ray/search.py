"""Query a table with the model, prompt, dimension and precision it was embedded with."""

from __future__ import annotations

import numpy as np

from gpte_ray.config import ConfigError
from gpte_ray.spec import spec_from_fingerprint
from gpte_ray.table import TableStore

__all__ = ["embed_queries", "nearest_params", "search"]


def embed_queries(fp: dict, queries: list[str], calibration: dict | None, model_path: str | None = None) -> np.ndarray:
    """Query vectors exactly as the table's documents were embedded, with the query prompt."""
    from gpte_ray.embedder import Embedder, postprocess
    from gpte_ray.tokenize import TextTokenizer

    spec = spec_from_fingerprint(fp, model_path)
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
        params.update(nprobes=32, refine_factor=10, ef=max(200, 2 * k * 10))
    return params


def search(db: str, table: str, query: str, k: int = 10, storage_options: dict | None = None,
           model_path: str | None = None, where: str | None = None, exact: bool = False) -> list[dict]:
    """Top-k chunks, best first: doc_id, chunk, score (cosine similarity) and text."""
    store = TableStore(db, table, storage_options)
    ds = store.open()
    if ds is None:
        raise ConfigError(f"config error: output.table: no table {table!r} in {db}")
    fp = store.fingerprint(ds)
    if fp is None:
        raise ConfigError(f"config error: output.table: {table!r} was not written by gpte-ray")
    vec = embed_queries(fp, [query], store.calibration(ds), model_path)[0]
    columns = [c for c in ("doc_id", "chunk", "text") if c in ds.schema.names]
    metric = "hamming" if fp["precision"] == "binary" else "cosine"
    nearest = nearest_params(vec, k, metric, exact)
    result = ds.to_table(columns=columns, nearest=nearest, filter=where, prefilter=where is not None)
    rows = []
    for r in result.to_pylist():
        dist = float(r.pop("_distance"))
        score = 1.0 - dist if metric == "cosine" else -dist
        rows.append({"doc_id": r["doc_id"], "chunk": r["chunk"], "score": round(score, 6),
                     "text": (r.get("text") or "")[:200]})
    return rows
