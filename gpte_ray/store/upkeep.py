"""After the commit: run tag, compaction, indexes, version cleanup. Runs under the table lock.

Each step is its own Lance transaction and leaves the table's content unchanged, so a crash
here costs nothing but the step itself; the next run repeats whatever did not finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from gpte_ray.config import OutputConfig
from gpte_ray.store.indexes import index_on, vector_metric

__all__ = ["UpkeepPolicy", "finish_table", "run_upkeep"]


@dataclass
class UpkeepPolicy:
    """When upkeep does more than the change costs: the thresholds past which it compacts,
    merges index segments or retrains the vector index (each announced in the report)."""

    max_small_fragments: int = 16  # compact when more fragments than this are small
    small_fragment_rows: int = 250_000  # a fragment under this many rows is small
    max_index_segments: int = 8  # merge an index's delta segments past this many
    retrain_fraction: float = 1.0  # retrain the vector index when rows added since training exceed this share

    @classmethod
    def from_output(cls, out: OutputConfig) -> UpkeepPolicy:
        return cls(max_small_fragments=out.max_fragments,
                   small_fragment_rows=max(1, out.target_rows_per_fragment // 4))


def _timed(done: dict, step: str, fn, *args, **kwargs):
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        done.setdefault("seconds", {})[step] = round(time.perf_counter() - t, 3)


def _compact(ds, out: OutputConfig, policy: UpkeepPolicy, done: dict) -> None:
    small = sum(1 for f in ds.get_fragments() if f.count_rows() < policy.small_fragment_rows)
    done["small_fragments"] = small
    if small > policy.max_small_fragments:
        metrics = _timed(done, "compact", ds.optimize.compact_files,
                         target_rows_per_fragment=out.target_rows_per_fragment,
                         materialize_deletions_threshold=0.1)
        done["compacted_fragments"] = metrics.fragments_removed
        done["compacted_into"] = metrics.fragments_added


def _update_indexes(ds, policy: UpkeepPolicy, done: dict) -> None:
    """New rows join each index as a delta segment (cost ~ the change); segments merge, and the
    vector index retrains, only past the policy's thresholds."""
    _timed(done, "index_delta", ds.optimize.optimize_indices, num_indices_to_merge=0)
    done["indexes"] = "delta"
    for idx in ds.describe_indices():
        stats = ds.stats.index_stats(idx.name)
        per_delta = stats.get("num_indexed_rows_per_delta") or []
        segments = stats.get("num_segments", stats.get("num_indices", len(per_delta)))
        if "vector" in idx.field_names and per_delta and \
                sum(per_delta[1:]) > policy.retrain_fraction * max(per_delta[0], 1):
            _timed(done, f"retrain_{idx.name}", ds.optimize.optimize_indices, index_names=[idx.name],
                   retrain=True)
            done.setdefault("heavy", []).append(f"retrained {idx.name} ({sum(per_delta)} rows)")
        elif segments > policy.max_index_segments:
            _timed(done, f"merge_{idx.name}", ds.optimize.optimize_indices, index_names=[idx.name],
                   num_indices_to_merge=segments)
            done.setdefault("heavy", []).append(f"merged {segments} segments of {idx.name}")


def _unindexed(ds) -> bool:
    """Whether an index misses some fragment: rows committed by a run whose upkeep did not
    finish (read from the manifest, no index is opened)."""
    fragments = {f.fragment_id for f in ds.get_fragments()}
    for idx in ds.describe_indices():
        if fragments - set().union(*(seg.fragment_ids for seg in idx.segments)):
            return True
    return False


def finish_table(ds, out: OutputConfig, run_id: str, fp: dict, committed: bool,
                 policy: UpkeepPolicy | None = None) -> dict:
    """Bring the table into shape after a run; returns what was done and each step's seconds."""
    policy = policy or UpkeepPolicy.from_output(out)
    done: dict = {}
    tag = f"run-{run_id}"
    if committed and tag not in ds.tags.list():
        ds.tags.create(tag, ds.version)

    _compact(ds, out, policy, done)
    rows = ds.count_rows()

    if index_on(ds, "doc_id") is None:
        _timed(done, "doc_id_index", ds.create_scalar_index, "doc_id", "BTREE")
        done["doc_id_index"] = "created"
    if out.fts_index and "text" in ds.schema.names and index_on(ds, "text") is None:
        _timed(done, "text_index", ds.create_scalar_index, "text", "INVERTED")
        done["text_index"] = "created"
    # a sparse table has no `vector` column (query/sparse.py scans its weights instead)
    vector_ready = fp.get("precision") in {"float32", "float16"} and rows >= out.index_min_rows and \
        "vector" in ds.schema.names
    if vector_ready and index_on(ds, "vector") is None:
        dim = fp["dim"]
        # IVF partitions ~ sqrt(rows) (half that under HNSW, whose per-partition graphs carry
        # more of the search), so the 64 probed per query cover a useful share of the table
        parts = rows**0.5 / (2 if out.index_type == "IVF_HNSW_SQ" else 1)
        kwargs = {"num_partitions": max(1, min(4096, int(parts)))}
        if out.index_type == "IVF_PQ":
            kwargs["num_sub_vectors"] = next(s for s in (dim // 4, dim // 2, dim)
                                             if s and dim % s == 0)
        _timed(done, "vector_index", ds.create_index, "vector", index_type=out.index_type,
               metric=vector_metric(fp), **kwargs)
        done["vector_index"] = f"created {out.index_type}"
    elif (committed or _unindexed(ds)) and "doc_id_index" not in done:
        _update_indexes(ds, policy, done)

    # old run tags would pin their versions forever: keep tags only inside the retention
    cutoff = timedelta(hours=out.retention_hours)
    import datetime as _dt

    now = _dt.datetime.now(_dt.timezone.utc)
    for name, meta in ds.tags.list().items():
        if name.startswith("run-") and name != tag and now - meta["created_at"] > cutoff:
            ds.tags.delete(name)
    # unreferenced files younger than Lance's own safety window are kept: a run that lost its
    # lease while paused may still be staging data files that it will never commit
    stats = _timed(done, "cleanup", ds.cleanup_old_versions, older_than=cutoff, delete_unverified=False,
                   error_if_tagged_old_versions=False)
    done["cleanup_bytes"] = stats.bytes_removed
    done["fragments"] = len(ds.get_fragments())
    done["version"] = ds.version
    return done


def _upkeep_task(uri: str, storage_options: dict | None, version: int, out: OutputConfig, run_id: str,
                 fp: dict, committed: bool) -> dict:
    import os

    import lance

    # index statistics would otherwise carry every IVF centroid (memory ~ the index)
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    return finish_table(ds, out, run_id, fp, committed)


# Up to this many rows a table's upkeep runs in the driver: a Ray task would wait ~0.5 s for a
# worker process and import Lance there, for ~0.1 s of work (5,000 rows: doc_id index, cleanup).
UPKEEP_HERE_ROWS = 20_000


def run_upkeep(uri: str, storage_options: dict | None, version: int, out: OutputConfig, run_id: str,
               fp: dict, committed: bool, *, rows: int, num_cpus: float = 1.0) -> dict:
    """`finish_table` as a Ray task with its own CPUs, on a worker, so that the head stays
    small; a table of up to UPKEEP_HERE_ROWS `rows`, here."""
    import ray

    if rows <= UPKEEP_HERE_ROWS:
        return _upkeep_task(uri, storage_options, version, out, run_id, fp, committed)
    task = ray.remote(num_cpus=num_cpus, max_retries=1)(_upkeep_task)
    return ray.get(task.remote(uri, storage_options, version, out, run_id, fp, committed))
