"""Retrieval metrics: plain functions over one query's ranked document ids and its graded
judgements (`{doc_id: grade}`; grade > 0 is relevant), with the conventions of BEIR's
pytrec_eval:

* recall@k  = relevant documents in the top k / all relevant documents of the query
* nDCG@k    = DCG@k / IDCG@k, linear gain: DCG = sum(grade_i / log2(i + 1)), i = 1-based rank;
  IDCG is the DCG of the query's judgements sorted by grade
* MRR@k     = 1 / rank of the first relevant document in the top k (0 if none)

A query with no relevant document (absent from qrels, or only grade-0 judgements) has no
defined recall or nDCG: every metric returns None for it, and `mean_metrics` leaves it out of
the averages and counts it as skipped (pytrec_eval, and so BEIR, also skip such queries).
A ranked list with a repeated doc id counts its first occurrence only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["has_relevant", "mean_metrics", "metric_names", "mrr_at_k", "ndcg_at_k", "recall_at_k"]


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


def has_relevant(qrels: Mapping[str, int]) -> bool:
    """Whether a query's judgements name at least one relevant document."""
    return bool(_relevant(qrels))


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
