"""What the table's indexes are, read by upkeep (which builds them) and by search (which uses them)."""

from __future__ import annotations

__all__ = ["index_on", "vector_metric"]


def index_on(ds, column: str) -> str | None:
    """The type of the index on `column` (e.g. IVF_HNSW_SQ, BTREE, INVERTED), or None."""
    for idx in ds.describe_indices():
        if column in idx.field_names:
            return str(getattr(idx, "index_type", None) or "index")
    return None


def vector_metric(fp: dict) -> str:
    """The distance that matches how the table's vectors were made."""
    if fp.get("precision") == "binary":
        return "hamming"
    return "cosine"
