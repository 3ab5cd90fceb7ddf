"""After the commit: run tag, compaction, indexes, version cleanup. Runs under the table lock.

Each step is its own Lance transaction and leaves the table's content unchanged, so a crash
here costs nothing but the step itself; the next run repeats whatever did not finish.
"""

from __future__ import annotations

from datetime import timedelta

from gpte_ray.config import OutputConfig
from gpte_ray.query import index_on

__all__ = ["finish_table", "vector_metric"]


def vector_metric(fp: dict) -> str:
    """The distance that matches how the table's vectors were made."""
    if fp.get("precision") == "binary":
        return "hamming"
    return "cosine"


def finish_table(ds, out: OutputConfig, run_id: str, fp: dict, committed: bool) -> dict:
    """Bring the table into shape after a run; returns what was done (for the report)."""
    done: dict = {}
    tag = f"run-{run_id}"
    if committed and tag not in ds.tags.list():
        ds.tags.create(tag, ds.version)

    fragments = len(ds.get_fragments())
    if fragments > out.max_fragments:
        metrics = ds.optimize.compact_files(target_rows_per_fragment=out.target_rows_per_fragment,
                                            materialize_deletions_threshold=0.1)
        done["compacted_fragments"] = metrics.fragments_removed
        done["compacted_into"] = metrics.fragments_added
    rows = ds.count_rows()

    if index_on(ds, "doc_id") is None:
        ds.create_scalar_index("doc_id", "BTREE")
        done["doc_id_index"] = "created"
    if out.fts_index and "text" in ds.schema.names and index_on(ds, "text") is None:
        ds.create_scalar_index("text", "INVERTED")
        done["text_index"] = "created"
    vector_ready = fp.get("precision") in {"float32", "float16"} and rows >= out.index_min_rows
    if vector_ready and index_on(ds, "vector") is None:
        dim = fp["dim"]
        # IVF partitions ~ sqrt(rows) (half that under HNSW, whose per-partition graphs carry
        # more of the search), so the 64 probed per query cover a useful share of the table
        parts = rows**0.5 / (2 if out.index_type == "IVF_HNSW_SQ" else 1)
        kwargs = {"num_partitions": max(1, min(4096, int(parts)))}
        if out.index_type == "IVF_PQ":
            kwargs["num_sub_vectors"] = next(s for s in (dim // 4, dim // 2, dim)
                                             if s and dim % s == 0)
        ds.create_index("vector", index_type=out.index_type, metric=vector_metric(fp), **kwargs)
        done["vector_index"] = f"created {out.index_type}"
    elif committed and "doc_id_index" not in done:
        # new fragments join the existing indexes (delta segments, no full retrain)
        ds.optimize.optimize_indices()
        done["indexes"] = "updated"

    # old run tags would pin their versions forever: keep tags only inside the retention
    cutoff = timedelta(hours=out.retention_hours)
    import datetime as _dt

    now = _dt.datetime.now(_dt.timezone.utc)
    for name, meta in ds.tags.list().items():
        if name.startswith("run-") and name != tag and now - meta["created_at"] > cutoff:
            ds.tags.delete(name)
    # unreferenced files younger than Lance's own safety window are kept: a run that lost its
    # lease while paused may still be staging data files that it will never commit
    stats = ds.cleanup_old_versions(older_than=cutoff, delete_unverified=False,
                                    error_if_tagged_old_versions=False)
    done["cleanup_bytes"] = stats.bytes_removed
    done["fragments"] = len(ds.get_fragments())
    done["version"] = ds.version
    return done
