"""Retrieval evaluation in the BEIR layout: `queries.jsonl` + `qrels.tsv` against a table.

The metrics are plain functions over one query's ranked document ids and its graded
judgements (`{doc_id: grade}`; grade > 0 is relevant), with the conventions of BEIR's
pytrec_eval:

* recall@k  = relevant documents in the top k / all relevant documents of the query
* nDCG@k    = DCG@k / IDCG@k, linear gain: DCG = sum(grade_i / log2(i + 1)), i = 1-based rank;
  IDCG is the DCG of the query's judgements sorted by grade
* MRR@k     = 1 / rank of the first relevant document in the top k (0 if none)

A query with no relevant document (absent from qrels, or only grade-0 judgements) has no
defined recall or nDCG: every metric returns None for it, and `mean_metrics` leaves it out of
the averages and counts it as skipped (pytrec_eval, and so BEIR, also skip such queries).

The table holds chunks, so retrieval results are chunk rows. They collapse to documents: a
document's score is its best chunk's score; documents rank by that score, ties broken by
doc_id (so exact and indexed search rank a tie the same way whatever order the rows came in).
A ranked list with a repeated doc id counts its first occurrence only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "add_eval_parser",
    "build_docstring_retrieval_set",
    "collapse_to_docs",
    "evaluate",
    "load_qrels",
    "load_queries",
    "mean_metrics",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "run_eval",
]

# chunks fetched per wanted document on the first try (a document may have several chunks)
OVERSAMPLE = 4
QUERY_BATCH = 256


# ---- reading the BEIR files -----------------------------------------------------------------
def load_queries(path: str) -> dict[str, str]:
    """queries.jsonl -> {query_id: text}, in file order."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["_id"])] = str(row["text"])
            except (ValueError, KeyError, TypeError) as e:
                msg = f"input error: {path}:{n}: not a query line with _id and text ({e})"
                raise ValueError(msg) from None
    return out


def load_qrels(path: str) -> dict[str, dict[str, int]]:
    """qrels.tsv (header `query-id  corpus-id  score`) -> {query_id: {doc_id: grade}}."""
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise ValueError(f"input error: {path}: header must be query-id<TAB>corpus-id<TAB>score")
        for n, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            try:
                qid, did, grade = row[0], row[1], int(float(row[2]))
            except (IndexError, ValueError):
                raise ValueError(f"input error: {path}:{n}: expected query-id, corpus-id, score") from None
            out.setdefault(qid, {})[did] = grade
    return out


# ---- metrics --------------------------------------------------------------------------------
def _top(ranked: Sequence[str], k: int) -> list[str]:
    """The first k distinct ids of a ranking."""
    seen: set[str] = set()
    out: list[str] = []
    for d in ranked:
        if d not in seen:
            seen.add(d)
            out.append(d)
            if len(out) == k:
                break
    return out


def _relevant(qrels: Mapping[str, int]) -> set[str]:
    return {d for d, g in qrels.items() if g > 0}


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float | None:
    rel = _relevant(qrels)
    if not rel:
        return None
    return sum(1 for d in _top(ranked, k) if d in rel) / len(rel)


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float | None:
    if not _relevant(qrels):
        return None
    dcg = sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(_top(ranked, k)))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg


def mrr_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float | None:
    rel = _relevant(qrels)
    if not rel:
        return None
    for i, d in enumerate(_top(ranked, k)):
        if d in rel:
            return 1.0 / (i + 1)
    return 0.0


def metric_names(k: int) -> list[str]:
    """recall@k, nDCG@10, MRR@10, recall@10 and recall@100 (each once)."""
    names = [f"recall@{k}", "ndcg@10", "mrr@10"]
    for cut in (10, 100):
        if f"recall@{cut}" not in names:
            names.append(f"recall@{cut}")
    return names


def _metric(name: str, ranked: Sequence[str], qrels: Mapping[str, int]) -> float | None:
    kind, cut = name.split("@")
    fn = {"recall": recall_at_k, "ndcg": ndcg_at_k, "mrr": mrr_at_k}[kind]
    return fn(ranked, qrels, int(cut))


def mean_metrics(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                 names: Sequence[str]) -> dict:
    """Mean of each metric over the queries of `runs` that have a relevant document.

    `runs`: {query_id: ranked doc ids}. Returns {name: mean, ..., "evaluated": n, "skipped": m};
    a mean over zero queries is None.
    """
    sums = dict.fromkeys(names, 0.0)
    evaluated = skipped = 0
    for qid, ranked in runs.items():
        judged = qrels.get(qid, {})
        if not _relevant(judged):
            skipped += 1
            continue
        evaluated += 1
        for name in names:
            sums[name] += _metric(name, ranked, judged)
    out: dict = {name: (round(sums[name] / evaluated, 6) if evaluated else None) for name in names}
    out["evaluated"] = evaluated
    out["skipped"] = skipped
    return out


def collapse_to_docs(rows: Iterable) -> list[tuple[str, float]]:
    """Chunk hits -> [(doc_id, best chunk score)], best first, ties by doc_id.

    `rows`: dicts with doc_id and score, or (doc_id, score) pairs; higher score is better.
    """
    best: dict[str, float] = {}
    for r in rows:
        doc, score = (r["doc_id"], r["score"]) if isinstance(r, Mapping) else r
        score = float(score)
        if doc not in best or score > best[doc]:
            best[doc] = score
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))


# ---- searching the table --------------------------------------------------------------------
def _vector_index(ds) -> str | None:
    """Type of the vector column's index (e.g. IVF_PQ), or None."""
    try:
        for idx in ds.describe_indices():
            fields = list(getattr(idx, "field_names", None) or getattr(idx, "columns", None) or [])
            if "vector" in fields:
                return str(getattr(idx, "index_type", "vector index"))
    except AttributeError:
        pass
    for idx in ds.list_indices() if hasattr(ds, "list_indices") else []:
        if "vector" in idx.get("fields", []):
            return str(idx.get("type", "vector index"))
    return None


def _lance_search(ds, metric: str, use_index: bool, tune: dict):
    """A batch searcher over the table's vector column, with search.py's `nearest` settings (so
    `indexed` is what `gpte-ray search` does), `tune` overriding them."""
    from gpte_ray.search import nearest_params

    def run(vectors: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
        nearest = nearest_params(vectors, limit, metric, exact=not use_index)
        if use_index:
            nearest.update(tune)
            if "ef" in nearest and "refine_factor" in tune:  # HNSW must explore k x refine candidates
                nearest["ef"] = max(nearest["ef"], 2 * limit * tune["refine_factor"])
        table = ds.to_table(columns=["doc_id", "_distance"], nearest=nearest, disable_scoring_autoprojection=True)
        out: list[list[tuple[str, float]]] = [[] for _ in range(len(vectors))]
        qi = (table.column("query_index").to_numpy() if "query_index" in table.column_names
              else np.zeros(table.num_rows, dtype=np.int64))
        dist = table.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
        # as search.py scores: cosine similarity, or the share of equal bits
        scores = 1.0 - dist if metric == "cosine" else 1.0 - dist / (8 * vectors.shape[1])
        for q, d, sc in zip(qi.tolist(), table.column("doc_id").to_pylist(), scores.tolist()):
            out[q].append((d, sc))
        return out

    return run


def _int8_search(ds, calibration: dict):
    """Exact cosine over the table's int8 codes, dequantised with its ranges (as search.py does:
    Lance's ANN search takes float vectors only); float32 query vectors."""
    low, high = np.asarray(calibration["low"]), np.asarray(calibration["high"])

    def run(vectors: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
        q = vectors.astype(np.float32)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_id = np.empty((len(q), 0), dtype=object)
        for batch in ds.to_batches(columns=["doc_id", "vector"], batch_size=16384):
            codes = np.stack(batch["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
            v = (low + (codes + 128.0) / 255.0 * (high - low)).astype(np.float32)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            ids = np.asarray(batch["doc_id"].to_pylist(), dtype=object)
            sc = np.concatenate([best_s, q @ v.T], axis=1)
            idx = np.concatenate([best_id, np.broadcast_to(ids, (len(q), len(ids)))], axis=1)
            keep = np.argsort(-sc, axis=1, kind="stable")[:, :limit]
            best_s, best_id = np.take_along_axis(sc, keep, 1), np.take_along_axis(idx, keep, 1)
        return [list(zip(best_id[i].tolist(), best_s[i].astype(np.float64).tolist())) for i in range(len(q))]

    return run


def _rank_docs(search, vectors: np.ndarray, depth: int, n_rows: int) -> list[list[str]]:
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


def _embed_all(fp: dict, texts: list[str], calibration: dict | None, model_path: str | None,
               quantize: bool = True) -> np.ndarray:
    """Every query embedded once, in batches of similar length (little padding)."""
    from gpte_ray.search import embed_queries

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), QUERY_BATCH):
        idx = order[start : start + QUERY_BATCH]
        kw = {} if quantize else {"quantize": False}
        vec = embed_queries(fp, [texts[i] for i in idx], calibration, model_path, **kw)
        if out is None:
            out = np.empty((len(texts), *vec.shape[1:]), dtype=vec.dtype)
        out[idx] = vec
    return out if out is not None else np.empty((0, fp["dim"]), dtype=np.float32)


def evaluate(db: str, table: str, queries_path: str, qrels_path: str, k: int = 10,
             storage_options: dict | None = None, model_path: str | None = None,
             nprobes: int | None = None, refine_factor: int | None = None) -> dict:
    """recall@k, nDCG@10, MRR@10, recall@10 and recall@100 of exact and indexed search.

    Each metric comes from a search as deep as its cutoff (max(cutoff, 10) documents, fetched as
    4x that many chunks, more if a query's chunks cover too few documents).

    Queries are those of `queries_path` that have judgements in `qrels_path`; a query with no
    relevant document is skipped (counted in "skipped"). `indexed` is the table's default search
    path, with gpte_ray.search's `nearest` settings (its vector index, or the same exact scan when
    there is none or the table is int8: then "note" says so). `nprobes` / `refine_factor`
    override those settings for the indexed search.
    """
    from gpte_ray.config import ConfigError
    from gpte_ray.search import open_embedded_table

    if k < 1:
        raise ConfigError(f"config error: k: must be >= 1, got {k}")
    t0 = time.perf_counter()
    store, ds, fp = open_embedded_table(db, table, storage_options)
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    qids = [q for q in queries if _relevant(qrels.get(q, {}))]
    no_relevant = sum(1 for q in queries if q in qrels and q not in set(qids))
    missing = sum(1 for q in qrels if q not in queries)

    names = metric_names(k)
    # each metric is measured on a retrieval as deep as its cutoff needs (at least 10 documents),
    # as a user's query for that many would be: an IVF index probes fewer partitions for a small k
    passes: dict[int, list[str]] = {}
    for name in names:
        passes.setdefault(max(10, int(name.split("@")[1])), []).append(name)
    metric = "hamming" if fp["precision"] == "binary" else "cosine"
    int8 = fp["precision"] == "int8"
    calibration = store.calibration(ds)
    n_rows = ds.count_rows()
    index = None if int8 else _vector_index(ds)
    tune: dict = {}
    if nprobes is not None:
        tune["nprobes"] = nprobes
    if refine_factor is not None:
        tune["refine_factor"] = refine_factor

    t = time.perf_counter()
    vectors = _embed_all(fp, [queries[q] for q in qids], calibration, model_path, quantize=not int8)
    embed_s = time.perf_counter() - t

    result: dict = {"queries": len(qids), "k": k, "table_rows": n_rows, "version": ds.version,
                    "index": index or "none"}
    seconds = {"embed": round(embed_s, 3)}
    modes = [("exact", False)] + ([("indexed", True)] if index else [])
    for mode, use_index in modes:
        t = time.perf_counter()
        search = _int8_search(ds, calibration) if int8 else _lance_search(ds, metric, use_index, tune)
        means: dict = {}
        for depth, group in sorted(passes.items()):
            runs: dict[str, list[str]] = {q: [] for q in qids}
            for start in range(0, len(qids) if n_rows else 0, QUERY_BATCH):
                ranked = _rank_docs(search, vectors[start : start + QUERY_BATCH], depth, n_rows)
                runs.update(zip(qids[start : start + QUERY_BATCH], ranked))
            means.update({n: v for n, v in mean_metrics(runs, qrels, group).items() if n in group})
        result[mode] = {n: means[n] for n in names}
        seconds[mode] = round(time.perf_counter() - t, 3)
    if not index:
        result["indexed"] = dict(result["exact"])
        result["note"] = ("int8 table: search scores the dequantised codes exactly, no vector index" if int8
                          else "no vector index: indexed search is the exact scan")
    else:
        from gpte_ray.search import nearest_params

        defaults = nearest_params(vectors[:1], 10, metric)
        result["search"] = {key: v for key, v in {**defaults, **tune}.items()
                            if key not in ("column", "q", "k", "metric", "ef", "use_index")}
    result["skipped"] = {"no_relevant": no_relevant, "qrels_without_query": missing}
    seconds["total"] = round(time.perf_counter() - t0, 3)
    result["seconds"] = seconds
    return result


# ---- the command line -----------------------------------------------------------------------
def add_eval_parser(subparsers):
    """`gpte-ray eval`: add the sub-command to the CLI's subparsers; returns its parser."""
    ev = subparsers.add_parser("eval", help="recall/nDCG/MRR of a table on BEIR-layout queries and qrels")
    ev.add_argument("--db", required=True)
    ev.add_argument("--table", required=True)
    ev.add_argument("--queries", required=True, help="queries.jsonl: {\"_id\": ..., \"text\": ...} per line")
    ev.add_argument("--qrels", required=True, help="qrels.tsv with header query-id, corpus-id, score")
    ev.add_argument("-k", type=int, default=10, help="documents per query for recall@k (default 10)")
    ev.add_argument("--model", help="local folder of the table's model, if not findable by its id")
    ev.add_argument("--nprobes", type=int, help="IVF partitions probed by the indexed search")
    ev.add_argument("--refine-factor", type=int, help="re-rank k x this many index hits exactly")
    ev.add_argument("--config", help="job YAML (for output.storage_options)")
    return ev


def run_eval(args) -> int:
    """Run `gpte-ray eval`; prints the metrics as one JSON line."""
    from gpte_ray.config import load_config
    from gpte_ray.storage import lance_options

    cfg = load_config(getattr(args, "config", None))
    if isinstance(getattr(args, "secrets", None), list):  # the CLI redacts these from error lines
        from gpte_ray.storage import secret_values

        args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    opts = lance_options(cfg.output.storage_options, args.db)
    out = evaluate(args.db, args.table, args.queries, args.qrels, args.k, opts, args.model,
                   nprobes=getattr(args, "nprobes", None), refine_factor=getattr(args, "refine_factor", None))
    print(json.dumps(out), flush=True)
    return 0


# ---- an offline retrieval set from docstrings ---------------------------------------------------
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def split_first_sentence(doc: str) -> tuple[str, str]:
    """(first sentence, the rest) of a docstring; the sentence ends at . ! ? or its paragraph."""
    doc = doc.strip()
    para_end = doc.find("\n\n")
    para = doc if para_end < 0 else doc[:para_end]
    m = _SENTENCE_END.search(para)
    end = m.end() if m else len(para)
    return " ".join(doc[:end].split()), doc[end:].strip()


def _good_query(sentence: str) -> bool:
    words = sentence.split()
    return 4 <= len(words) <= 40 and not sentence.startswith((">>>", "..", ":", "-", "=", "|"))


def build_docstring_retrieval_set(out_dir: str, n_docs: int, rows_per_shard: int = 1000,
                                  root: str | None = None, max_chars: int | None = None) -> dict:
    """A small BEIR-layout retrieval set built offline from installed-package docstrings.

    Query = a docstring's first sentence; its one relevant document (grade 1) = the rest of
    that docstring, indexed WITHOUT the first sentence, so the query is not a substring of it.
    Docstrings whose first sentence is too short or long, whose rest is under 80 characters,
    or whose first sentence or rest repeats an earlier one are left out, so each query has a
    single right answer; with `max_chars`, so are those whose rest is longer (a quicker set).
    Writes out_dir/corpus/part-*.parquet (id, title, module, text), out_dir/queries.jsonl and
    out_dir/qrels.tsv; returns their paths and counts.
    """
    from gpte_ray.corpus import docstring_docs, write_shards

    docs, queries = [], []
    seen_q: set[str] = set()
    seen_body: set[str] = set()
    for d in docstring_docs(10**9, root=root):
        first, rest = split_first_sentence(d["text"])
        key_q, key_b = first.lower(), " ".join(rest.split()).lower()
        too_long = max_chars is not None and len(rest) > max_chars
        if not _good_query(first) or len(rest) < 80 or too_long or key_q in seen_q or key_b in seen_body:
            continue
        seen_q.add(key_q)
        seen_body.add(key_b)
        docs.append({"id": d["id"], "title": d["title"], "module": d["module"], "text": rest})
        queries.append({"_id": f"q{len(queries):06d}", "text": first, "doc": d["id"]})
        if len(docs) >= n_docs:
            break
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus")
    shards = write_shards(iter(docs), corpus, rows_per_shard=rows_per_shard)
    qpath, rpath = os.path.join(out_dir, "queries.jsonl"), os.path.join(out_dir, "qrels.tsv")
    with open(qpath, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({"_id": q["_id"], "text": q["text"]}, ensure_ascii=False) + "\n")
    with open(rpath, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["query-id", "corpus-id", "score"])
        for q in queries:
            w.writerow([q["_id"], q["doc"], 1])
    return {"corpus": corpus, "shards": shards, "queries": qpath, "qrels": rpath, "docs": len(docs)}


if __name__ == "__main__":  # python -m gpte_ray.evaluate OUT_DIR N_DOCS: build the docstring set
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m gpte_ray.evaluate OUT_DIR N_DOCS")
    built = build_docstring_retrieval_set(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({k: v for k, v in built.items() if k != "shards"}))
