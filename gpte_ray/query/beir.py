"""Reading retrieval sets in the BEIR layout: `queries.jsonl` and `qrels.tsv`."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

from gpte_ray.config import ConfigError

__all__ = ["load_qrels", "load_queries"]


@contextmanager
def _opened(path: str, newline: str | None):
    try:
        f = open(path, encoding="utf-8", newline=newline)
    except OSError as e:
        raise ConfigError(f"input error: {path}: {e.strerror or e}") from None
    with f:
        yield f


def load_queries(path: str) -> dict[str, str]:
    """queries.jsonl -> {query_id: text}, in file order."""
    out: dict[str, str] = {}
    first: dict[str, int] = {}  # query id -> its line
    with _opened(path, newline=None) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid = str(row["_id"])
                if qid in first:  # a second text would silently replace the first one's
                    raise ConfigError(f"input error: {path}:{n}: query id {qid!r} is also on line {first[qid]}; "
                                      "query ids must be unique")
                out[qid], first[qid] = str(row["text"]), n
            except (ValueError, KeyError, TypeError) as e:
                if isinstance(e, ConfigError):
                    raise
                msg = f"input error: {path}:{n}: not a query line with _id and text ({e})"
                raise ConfigError(msg) from None
    return out


def load_qrels(path: str) -> dict[str, dict[str, int]]:
    """qrels.tsv (header `query-id  corpus-id  score`) -> {query_id: {doc_id: grade}}."""
    out: dict[str, dict[str, int]] = {}
    with _opened(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise ConfigError(f"input error: {path}: header must be query-id<TAB>corpus-id<TAB>score")
        for n, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            try:
                qid, did, grade = row[0], row[1], int(float(row[2]))
            except (IndexError, ValueError):
                msg = f"input error: {path}:{n}: expected query-id, corpus-id and a numeric score"
                raise ConfigError(msg) from None
            out.setdefault(qid, {})[did] = grade
    return out
