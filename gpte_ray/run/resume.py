"""Resume state: what this run has staged, and what it still has to embed.

Every embedded window leaves a Parquet marker in the run's staging folder, written after its
Lance fragment: one row per chunk (doc_id, chunk, n_chunks), the fragment's metadata in the
file's schema metadata. The state is computed on the cluster with Ray Data's hash-shuffle
aggregation, never with an object per document on the driver:

- a chunk staged by two markers (a retried window) would be committed twice: the later marker
  of every such pair is dropped (its documents are embedded again);
- a planned document is done when its staged chunks number its n_chunks; the others are
  written as a new embed plan, with the chunks already staged (of documents split across
  windows) listed so the tokenizer skips them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.plan.diff import EMBED_SCHEMA, SMALL_ROWS, _name, _partitions, _write, aggregate, ray_aggregations
from gpte_ray.storage import filesystem, join
from gpte_ray.store.staging import MARKER_SCHEMA, marker_files, marker_footers

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
    from gpte_ray.plan.diff import _batches

    out: set[tuple[str, int]] = set()
    for b in _batches(skip_dir, storage_options, ["doc_id", "chunk"], 65536):
        out.update(zip(b.column(0).to_pylist(), b.column(1).to_pylist()))
    return frozenset(out)


def _conflict_key(batch: pa.Table) -> pa.Table:
    k = pc.binary_join_element_wise(batch["doc_id"], pc.cast(batch["chunk"], pa.string()), "\0")
    return pa.table({"k": k, "path": batch["path"]})


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
    name = _name(batch["doc_id"].combine_chunks() if isinstance(batch["doc_id"], pa.ChunkedArray)
                 else batch["doc_id"])
    _write(rows.sort_by([("shard", "ascending"), ("row", "ascending")]), join(out_dir, "embed"), name,
           storage_options)
    _write(pa.table({"doc_id": batch["doc_id"]}).filter(partial), join(out_dir, "partial"), name,
           storage_options)
    return pa.table({"todo": [rows.num_rows], "partial": [int(pc.sum(pc.cast(partial, pa.int64())).as_py() or 0)],
                     "shards": [pc.unique(rows["shard"]).to_pylist()]},
                    schema=pa.schema([("todo", pa.int64()), ("partial", pa.int64()),
                                      ("shards", pa.list_(pa.int32()))]))


def _skips(batch: pa.Table, out_dir: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.dataset as pads

    fs, path = filesystem(join(out_dir, "partial"), storage_options)
    partial = pads.dataset(path, format="parquet", filesystem=fs).to_table()["doc_id"]
    rows = batch.select(["doc_id", "chunk"]).filter(pc.is_in(batch["doc_id"], value_set=partial))
    if rows.num_rows:
        name = _name(pc.binary_join_element_wise(rows["doc_id"], pc.cast(rows["chunk"], pa.string()), "\0")
                     .combine_chunks())
        _write(rows, join(out_dir, "skip"), name, storage_options)
    return pa.table({"rows": [rows.num_rows]})


# per (doc_id, chunk) key: how many markers hold it, and the last of them
_CONFLICT_AGGS = [("path", "count", "n"), ("path", "max", "last")]
# per document: planned rows (0/1), staged chunks, its chunk count and plan row
_PER_DOC_AGGS = [("shard", "count", "planned"), ("chunk", "count", "staged"), ("n_chunks", "max", "n_chunks"),
                 ("shard", "min", "shard"), ("row", "min", "row"), ("content_hash", "min", "content_hash"),
                 ("meta_hash", "min", "meta_hash")]


def _staged_small(files: list[str], plan_dir: str, planned: int, out_dir: str,
                  storage_options: dict | None) -> tuple[list[str], pa.Table | None]:
    """The small-run path of staged_state, in one task over Arrow: (markers dropped as
    duplicates, the _todo summary or None when no marker is left)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, _ = filesystem(out_dir, storage_options)
    # a retried attempt finds the duplicates an earlier attempt deleted gone: dropped already
    gone = [i.type == pafs.FileType.NotFound for i in fs.get_file_info(files)]
    dropped = [f for f, g in zip(files, gone) if g]
    files = [f for f, g in zip(files, gone) if not g]
    if not files:
        return dropped, None
    tables = [pq.read_table(f, columns=MARKER_SCHEMA.names, filesystem=fs).cast(MARKER_SCHEMA) for f in files]
    marks = pa.concat_tables([t.append_column("path", pa.array([f] * t.num_rows, pa.string()))
                              for f, t in zip(files, tables)])
    while marks.num_rows:
        pairs = aggregate(_conflict_key(marks), "k", _CONFLICT_AGGS)
        later = pc.unique(pairs.filter(pc.greater(pairs["n"], 1))["last"])
        if not len(later):
            break
        for p in later.to_pylist():
            fs.delete_file(p)
            dropped.append(p)
        marks = marks.filter(pc.invert(pc.is_in(marks["path"], value_set=later)))
    if not marks.num_rows:
        return dropped, None
    union = [_docs_union(marks.drop_columns(["path"]))]
    if planned:
        import pyarrow.dataset as pads

        pfs, path = filesystem(join(plan_dir, "embed"), storage_options)
        union.append(_docs_union(pads.dataset(path, format="parquet", filesystem=pfs).to_table()))
    per_doc = aggregate(pa.concat_tables(union), "doc_id", _PER_DOC_AGGS)
    summary = _todo(per_doc, out_dir, storage_options)
    if summary["partial"][0].as_py():
        _skips(marks.select(["doc_id", "chunk"]), out_dir, storage_options)
    return dropped, summary


def staged_state(staging_dir: str, storage_options: dict | None, plan_dir: str, planned: int,
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
    if not files:
        return StagedState(todo=planned, plan_dir=plan_dir, shards=list(planned_shards), unpinned=len(unpinned))
    state = _staged_rest(files, footers, fs, storage_options, plan_dir, planned, planned_shards, out_dir,
                         small_rows)
    state.unpinned = len(unpinned)
    return state


def _staged_rest(files: list[str], footers: dict, fs, storage_options: dict | None, plan_dir: str, planned: int,
                 planned_shards: list[int], out_dir: str, small_rows: int) -> StagedState:
    import ray
    import ray.data
    if planned + sum(rows for _, rows, _ in footers.values()) <= small_rows:
        task = ray.remote(num_cpus=0.5, max_retries=3)(_staged_small)
        dropped, summary = ray.get(task.remote(files, plan_dir, planned, out_dir, storage_options))
        kept = [f for f in files if f not in set(dropped)]
        if summary is None:
            return StagedState(todo=planned, plan_dir=plan_dir, shards=list(planned_shards))
        state = StagedState(plan_dir=out_dir, todo=summary["todo"][0].as_py(),
                            shards=sorted(summary["shards"][0].as_py()))
        if summary["partial"][0].as_py():
            state.skip_dir = join(out_dir, "skip")
        return _with_fragments(state, footers, kept)

    def keys():
        return ray.data.read_parquet(files, filesystem=fs, include_paths=True, columns=MARKER_SCHEMA.names)

    # 1. chunks staged twice: drop the later marker of each pair until none is left
    while True:
        pairs = (keys().map_batches(_conflict_key, batch_format="pyarrow", batch_size=None)
                 .groupby("k", num_partitions=_partitions(len(files) * 1024))
                 .aggregate(*ray_aggregations(_CONFLICT_AGGS))
                 .filter(expr="n > 1").select_columns(["last"]).unique("last"))
        if not pairs:
            break
        for p in pairs:
            fs.delete_file(p)
        files = [f for f in files if f not in set(pairs)]
        if not files:
            return StagedState(todo=planned, plan_dir=plan_dir, shards=list(planned_shards))

    # 2. per planned document: staged chunks against its chunk count
    plan = ray.data.read_parquet(join(plan_dir, "embed"), filesystem=filesystem(plan_dir, storage_options)[0]) \
        if planned else None
    staged = keys().drop_columns(["path"]).map_batches(_docs_union, batch_format="pyarrow", batch_size=None)
    union = staged if plan is None else staged.union(
        plan.map_batches(_docs_union, batch_format="pyarrow", batch_size=None))
    per_doc = union.groupby("doc_id", num_partitions=_partitions(planned + len(files) * 1024)).aggregate(
        *ray_aggregations(_PER_DOC_AGGS))
    state = StagedState(plan_dir=out_dir)
    shards: set[int] = set()
    partial = 0
    for b in per_doc.map_batches(_todo, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"out_dir": out_dir, "storage_options": storage_options}
                                 ).iter_batches(batch_size=None, batch_format="pyarrow"):
        state.todo += int(pc.sum(b["todo"]).as_py() or 0)
        partial += int(pc.sum(b["partial"]).as_py() or 0)
        shards.update(pc.unique(pc.list_flatten(b["shards"])).to_pylist())
    state.shards = sorted(shards)
    if partial:
        for _ in keys().drop_columns(["path"]).map_batches(
                _skips, batch_format="pyarrow", batch_size=None,
                fn_kwargs={"out_dir": out_dir, "storage_options": storage_options}).iter_batches(batch_size=None):
            pass
        state.skip_dir = join(out_dir, "skip")

    # 3. the kept markers' fragments
    return _with_fragments(state, footers, files)


def _with_fragments(state: StagedState, footers: dict, files: list[str]) -> StagedState:
    for f in files:
        frags, rows, _ = footers[f]
        state.fragments += frags
        state.chunks += rows
    state.markers = list(files)
    return state
