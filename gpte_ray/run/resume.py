"""Resume state: what this run has staged, and what it still has to embed.

Every embedded window leaves a Parquet marker in the run's staging folder, written after its
Lance fragment: one row per chunk (doc_id, chunk, n_chunks), the fragment's metadata in the
file's schema metadata. The state is computed on the cluster, grouped as plan.grouping groups
(in one Ray task when the run is small, else by hash shuffles), never with an object per
document on the driver:

- a chunk staged by two markers (a retried window) would be committed twice: the later marker
  of every such pair is dropped (its documents are embedded again);
- a planned document is done when its staged chunks number its n_chunks; the others are
  written as a new embed plan, with the chunks already staged (of documents split across
  windows) listed so the tokenizer skips them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.plan.files import (
    EMBED,
    EMBED_BLOCKS,
    EMBED_SCHEMA,
    PARTIAL,
    SKIP,
    block_name,
    partition_by_shard,
    read_batches,
    write_file,
)
from gpte_ray.plan.grouping import SMALL_ROWS, fits_one_task, group_map
from gpte_ray.storage import filesystem, join
from gpte_ray.store.staging import MARKER_SCHEMA, marker_files, marker_footers

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["StagedState", "read_skip", "staged_state"]


@dataclass
class StagedState:
    fragments: list = field(default_factory=list)  # lance FragmentMetadata of the kept markers
    chunks: int = 0  # chunks staged in the kept markers
    todo: int = 0  # documents still to embed
    plan_dir: str = ""  # the embed plan of the documents still to embed
    shards: list[int] = field(default_factory=list)  # shards holding them
    skip_dir: str | None = None  # (doc_id, chunk) already staged of documents still to embed
    markers: list[str] = field(default_factory=list)  # the kept markers' paths
    unpinned: int = 0  # markers dropped because a shard they were read from is no longer as pinned


def read_skip(skip_dir: str | None, storage_options: dict | None) -> frozenset[tuple[str, int]]:
    """The chunks the tokenizer skips (only documents split across windows: a few per window)."""
    if not skip_dir:
        return frozenset()
    out: set[tuple[str, int]] = set()
    for b in read_batches(skip_dir, storage_options, ["doc_id", "chunk"], 65536):
        out.update(zip(b.column(0).to_pylist(), b.column(1).to_pylist()))
    return frozenset(out)


def staged_state(staging_dir: str, storage_options: dict | None, *, plan_dir: str, planned: int,
                 planned_shards: list[int], out_dir: str, small_rows: int = SMALL_ROWS,
                 pins: set[str] | None = None) -> StagedState:
    """The run's staged fragments and, in `out_dir`, the plan of what is left to embed (in one
    task up to `small_rows` planned and staged rows, else by hash shuffles).

    `pins`: the run's shard pins; a marker read from a shard whose pin is not among them (the
    shard changed since it was staged), or that records none, is dropped: never committed."""
    fs, _ = filesystem(staging_dir, storage_options)
    files = marker_files(staging_dir, storage_options)
    if not files:
        return StagedState(todo=planned, plan_dir=plan_dir, shards=list(planned_shards))
    footers = dict(zip(files, marker_footers(files, fs)))
    unpinned = [f for f, (_, _, p) in footers.items() if pins is not None and (p is None or not set(p) <= pins)]
    for f in unpinned:
        try:
            fs.delete_file(f)
        except FileNotFoundError:
            pass
    files = [f for f in files if f not in set(unpinned)]
    # one choice for every grouping below: all in one task, or all by hash shuffles
    rows = planned + sum(n for _, n, _ in footers.values())
    files, marks = _drop_retried(files, staging_dir, storage_options, rows=rows, small_rows=small_rows)
    if not files:
        return StagedState(todo=planned, plan_dir=plan_dir, shards=list(planned_shards), unpinned=len(unpinned))
    state = _left_to_embed(marks, len(files), storage_options, plan_dir=plan_dir, planned=planned, out_dir=out_dir,
                           rows=rows, small_rows=small_rows)
    state.unpinned = len(unpinned)
    for f in files:  # the kept markers' fragments
        frags, n, _ = footers[f]
        state.fragments += frags
        state.chunks += n
    state.markers = list(files)
    return state


# per (doc_id, chunk) key: how many markers hold it, and the last of them
_CONFLICT_AGGS = [("path", "count", "n"), ("path", "max", "last")]
_CONFLICT_SCHEMA = pa.schema([("k", pa.string()), ("path", pa.string())])
# per document: planned rows (0/1), staged chunks, its chunk count and plan row
_PER_DOC_AGGS = [("shard", "count", "planned"), ("chunk", "count", "staged"), ("n_chunks", "max", "n_chunks"),
                 ("shard", "min", "shard"), ("row", "min", "row"), ("content_hash", "min", "content_hash"),
                 ("meta_hash", "min", "meta_hash")]
_DOCS_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.int32()), ("row", pa.int64()),
                          ("content_hash", pa.string()), ("meta_hash", pa.string()), ("chunk", pa.int32()),
                          ("n_chunks", pa.int32())])


def _drop_retried(files: list[str], staging_dir: str, storage_options: dict | None, *, rows: int,
                  small_rows: int) -> tuple[list[str], Dataset | None]:
    """Delete the later marker of every pair that stages the same chunk, until none is left:
    (the markers kept, a Ray dataset of their rows with their `path`)."""
    fs, _ = filesystem(staging_dir, storage_options)
    marks = None
    while files:
        marks = _markers(files, staging_dir, storage_options, fits_one_task(rows, small_rows))
        later: set[str] = set()
        for b in group_map([marks], "k", _CONFLICT_AGGS, _later, rows_hint=len(files) * 1024,
                           schema=_CONFLICT_SCHEMA, prepare=_conflict_key, rows=rows, small_rows=small_rows):
            later.update(b["last"].to_pylist())
        if not later:
            break
        for p in later:
            fs.delete_file(p)
        files = [f for f in files if f not in later]
    return files, marks


def _left_to_embed(marks: Dataset, n_files: int, storage_options: dict | None, *, plan_dir: str, planned: int,
                   out_dir: str, rows: int, small_rows: int) -> StagedState:
    """Per planned document, its staged chunks against its chunk count: the documents left to
    embed, as a plan in `out_dir` (and the chunks staged of those staged in part)."""
    parts = [marks] + ([_plan(plan_dir, storage_options, fits_one_task(rows, small_rows))] if planned else [])
    state = StagedState(plan_dir=out_dir)
    shards: set[int] = set()
    partial = 0
    kwargs = {"out_dir": out_dir, "storage_options": storage_options}
    for b in group_map(parts, "doc_id", _PER_DOC_AGGS, _todo, rows_hint=planned + n_files * 1024,
                       schema=_DOCS_SCHEMA, prepare=_docs_union, fn_kwargs=kwargs, rows=rows, small_rows=small_rows):
        state.todo += int(pc.sum(b["todo"]).as_py() or 0)
        partial += int(pc.sum(b["partial"]).as_py() or 0)
        shards.update(pc.unique(pc.list_flatten(b["shards"])).to_pylist())
    state.shards = sorted(shards)
    # one file per shard, so each read task reads its own shard's rows only
    partition_by_shard(join(out_dir, EMBED_BLOCKS), join(out_dir, EMBED), state.todo, storage_options, small_rows)
    if partial:
        if isinstance(marks, list):  # one small block, read here
            for table in marks:
                _skips(table, **kwargs)
        else:
            for _ in marks.map_batches(_skips, batch_format="pyarrow", batch_size=None,
                                       fn_kwargs=kwargs).iter_batches(batch_size=None):
                pass
        state.skip_dir = join(out_dir, SKIP)
    return state


def _markers(files: list[str], staging_dir: str, storage_options: dict | None, one_task: bool) -> Dataset | list:
    """The markers' rows (MARKER_SCHEMA, and `path`: the marker's): for a small run one table
    read here (in a list; at most SMALL_ROWS rows, so the driver's memory stays bounded, and no
    Ray task: one costs a worker start, ~0.4 s, at the end of every run), else a Ray dataset.
    (Not a Ray dataset made of a small table: executing one asks every worker for memory stats,
    and a SIGSTOPped driver's workers never answer, so a run would wait on another, paused one.)"""
    import ray.data

    if one_task:
        return [_read_markers(files, staging_dir, storage_options)]
    fs, _ = filesystem(staging_dir, storage_options)
    return ray.data.read_parquet(files, filesystem=fs, include_paths=True, columns=MARKER_SCHEMA.names)


def _plan(plan_dir: str, storage_options: dict | None, one_task: bool) -> Dataset | list:
    """The plan's rows (EMBED_SCHEMA), read as `_markers` reads."""
    import ray.data

    if one_task:
        return [_read_plan(plan_dir, storage_options)]
    fs, _ = filesystem(plan_dir, storage_options)
    return ray.data.read_parquet(join(plan_dir, EMBED), filesystem=fs)


def _read_markers(files: list[str], staging_dir: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, _ = filesystem(staging_dir, storage_options)
    tables = [pq.read_table(f, columns=MARKER_SCHEMA.names, filesystem=fs).cast(MARKER_SCHEMA) for f in files]
    return pa.concat_tables([t.append_column("path", pa.array([f] * t.num_rows, pa.string()))
                             for f, t in zip(files, tables)])


def _read_plan(plan_dir: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, EMBED), storage_options)
    return pads.dataset(path, format="parquet", filesystem=fs).to_table()


def _conflict_key(batch: pa.Table) -> pa.Table:
    k = pc.binary_join_element_wise(batch["doc_id"], pc.cast(batch["chunk"], pa.string()), "\0")
    return pa.table({"k": k, "path": batch["path"]})


def _later(groups: pa.Table) -> pa.Table:
    """Per-chunk groups -> the later marker of each chunk staged more than once."""
    return pa.table({"last": pc.unique(groups.filter(pc.greater(groups["n"], 1))["last"])})


def _docs_union(batch: pa.Table) -> pa.Table:
    """Plan rows (EMBED_SCHEMA) or marker rows -> one schema for the per-document grouping."""
    n = batch.num_rows
    if "shard" in batch.column_names:
        return pa.table({"doc_id": batch["doc_id"], "shard": batch["shard"], "row": batch["row"],
                         "content_hash": batch["content_hash"], "meta_hash": batch["meta_hash"],
                         "chunk": pa.nulls(n, pa.int32()), "n_chunks": pa.nulls(n, pa.int32())})
    return pa.table({"doc_id": batch["doc_id"], "shard": pa.nulls(n, pa.int32()), "row": pa.nulls(n, pa.int64()),
                     "content_hash": pa.nulls(n, pa.string()), "meta_hash": pa.nulls(n, pa.string()),
                     "chunk": batch["chunk"], "n_chunks": batch["n_chunks"]})


def _todo(batch: pa.Table, out_dir: str, storage_options: dict | None) -> pa.Table:
    planned = pc.greater(batch["planned"], 0)
    staged = batch["staged"]
    done = pc.and_(planned, pc.equal(staged, pc.fill_null(batch["n_chunks"], -1)))
    todo = pc.and_(planned, pc.invert(done))
    partial = pc.and_(todo, pc.greater(staged, 0))
    rows = pa.table({"shard": batch["shard"], "row": batch["row"], "doc_id": batch["doc_id"],
                     "content_hash": batch["content_hash"], "meta_hash": batch["meta_hash"]},
                    schema=EMBED_SCHEMA).filter(todo)
    name = block_name(batch["doc_id"])
    write_file(rows.sort_by([("shard", "ascending"), ("row", "ascending")]), join(out_dir, EMBED_BLOCKS), name,
               storage_options)
    write_file(pa.table({"doc_id": batch["doc_id"]}).filter(partial), join(out_dir, PARTIAL), name,
               storage_options)
    return pa.table({"todo": [rows.num_rows], "partial": [int(pc.sum(pc.cast(partial, pa.int64())).as_py() or 0)],
                     "shards": [pc.unique(rows["shard"]).to_pylist()]},
                    schema=pa.schema([("todo", pa.int64()), ("partial", pa.int64()),
                                      ("shards", pa.list_(pa.int32()))]))


def _skips(batch: pa.Table, out_dir: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.dataset as pads

    fs, path = filesystem(join(out_dir, PARTIAL), storage_options)
    partial = pads.dataset(path, format="parquet", filesystem=fs).to_table()["doc_id"]
    rows = batch.select(["doc_id", "chunk"]).filter(pc.is_in(batch["doc_id"], value_set=partial))
    if rows.num_rows:
        name = block_name(pc.binary_join_element_wise(rows["doc_id"], pc.cast(rows["chunk"], pa.string()), "\0"))
        write_file(rows, join(out_dir, SKIP), name, storage_options)
    return pa.table({"rows": [rows.num_rows]})
