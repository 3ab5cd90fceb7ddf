"""The diff, on the cluster: which documents a run embeds, deletes and quarantines.

The corpus scan (one row per input row: shard, row, doc_id, content_hash, reason, meta_hash) and
the table's documents (doc_id, content_hash and meta_hash of chunk 0) are unioned and grouped by doc_id with
Ray Data's hash-shuffle aggregation. Each group is classified over Arrow in worker tasks, which
write what the run needs as Parquet under a plan folder in staging:

  embed/*.parquet       shard, row, doc_id, content_hash of every document to embed
  meta/embed/*.parquet  the same, of documents whose text is unchanged but whose kept columns
                        changed: their rows are copied with the new values, not embedded (a plan
                        folder of its own, so resume.staged_state reads it as it reads this one)
  changed/*.parquet     doc_id of documents whose old chunks the commit replaces (meta too)
  vanished/*.parquet    doc_id of table documents no longer in the corpus
  dups/*.parquet        group key and winning key of ids seen more than once
  quarantine/*.parquet  source, row, doc_id, reason of every row not embedded

The driver receives one summary row per classified block (counts, digest parts, the shards
with work), never an object per document.

Duplicate rule: the first occurrence of a doc_id in (shard path order, row) order wins; later
ones are quarantined as "duplicate doc_id (kept <file> row <n>)". Rows with a reason (bad id
or text, unreadable shard) never claim an id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.input.sources import ShardError
from gpte_ray.plan.reference import MassDeleteError
from gpte_ray.storage import ensure_dir, filesystem, join

__all__ = [
    "PIN_COLUMN", "SMALL_ROWS", "DeleteIds", "Diff", "PlanLostError", "aggregate", "calibration_rows",
    "check_mass_delete", "compute_diff", "drop_old_plans", "drop_plan", "ids_from", "new_plan_dir", "planned_rows",
    "ray_aggregations", "read_planned",
]

# a scan row's sort key as one string: zero-padded shard and row, then the content hash and
# "|" meta hash, so that the minimum per doc_id is the first occurrence and carries its hashes
SHARD_W, ROW_W = 10, 13
GROUP_SCHEMA = pa.schema([
    ("gkey", pa.string()),    # "d" + doc_id, or "q<shard>:<row>" for a row with a reason
    ("key", pa.string()),     # shard|row|content_hash|meta_hash of a good scan row, else null
    ("old", pa.string()),     # content_hash in the table, else null
    ("old_meta", pa.string()),  # meta_hash in the table, else null
    ("reason", pa.string()),  # why a scan row is quarantined, else null
    ("bad_id", pa.string()),  # the doc_id of a quarantined scan row (may be null)
])
EMBED_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string()),
                          ("content_hash", pa.string()), ("meta_hash", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("shard", pa.int32()), ("source", pa.string()), ("row", pa.int64()),
                               ("doc_id", pa.string()), ("reason", pa.string())])
_HASH_KEYS = ("gpte-ray-diff-a:", "gpte-ray-diff-b:")  # two 64-bit lanes: 128 bits in all


def _hash64(values: pa.Array, key: str) -> np.ndarray:
    """Stable 64-bit hash of each string (SipHash with a fixed key): same on every worker."""
    from pandas.util import hash_array

    return hash_array(np.asarray(values.to_numpy(zero_copy_only=False), dtype=object), hash_key=key)


def _digest_parts(values: pa.Array) -> tuple[int, int]:
    """Order-free digest of a set of strings: the wrapping sum of their hashes, two lanes."""
    if len(values) == 0:
        return 0, 0
    return tuple(int(np.sum(_hash64(values, k), dtype=np.uint64)) for k in _HASH_KEYS)


def _name(values: pa.Array) -> str:
    """A file name fixed by a block's contents, so a retried task overwrites its own output."""
    a, b = _digest_parts(values)
    return f"{a:016x}{b:016x}-{len(values)}"


def _write(table: pa.Table, folder: str, name: str, storage_options: dict | None) -> None:
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        return
    fs, path = filesystem(folder, storage_options)
    ensure_dir(fs, path)
    pq.write_table(table, f"{path}/{name}.parquet", filesystem=fs)


def _pad(values: pa.Array, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(values, pa.string()), width=width, padding="0")


# ---- the map steps (run in Ray tasks, over Arrow) -------------------------------------------
def scan_groups(batch: pa.Table) -> pa.Table:
    """Scan rows (stages.SCAN_SCHEMA) -> GROUP_SCHEMA rows."""
    good = pc.is_null(batch["reason"])
    shard, row = batch["shard"], batch["row"]
    bad_key = pc.binary_join_element_wise(
        "q", pc.cast(shard, pa.string()), ":", pc.cast(row, pa.string()), "")
    gkey = pc.if_else(good, pc.binary_join_element_wise("d", batch["doc_id"], ""), bad_key)
    meta = pc.fill_null(batch["meta_hash"], "")
    key = pc.binary_join_element_wise(_pad(shard, SHARD_W), _pad(row, ROW_W), batch["content_hash"], "|", meta, "")
    null = pa.nulls(batch.num_rows, pa.string())
    return pa.table({
        "gkey": gkey,
        "key": pc.if_else(good, key, null),
        "old": null,
        "old_meta": null,
        "reason": batch["reason"],
        "bad_id": pc.if_else(good, null, batch["doc_id"]),
    }, schema=GROUP_SCHEMA)


def table_groups(batch: pa.Table) -> pa.Table:
    """The table's (doc_id, content_hash, meta_hash if it has one) of chunk 0 -> GROUP_SCHEMA rows."""
    null = pa.nulls(batch.num_rows, pa.string())
    meta = batch["meta_hash"] if "meta_hash" in batch.column_names else null
    return pa.table({"gkey": pc.binary_join_element_wise("d", batch["doc_id"], ""), "key": null,
                     "old": batch["content_hash"], "old_meta": meta, "reason": null, "bad_id": null},
                    schema=GROUP_SCHEMA)


def _winner(key: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """shard, row, content_hash and meta_hash ("" when no column is kept) of scan keys."""
    shard = pc.cast(pc.utf8_slice_codeunits(key, 0, SHARD_W), pa.int32())
    row = pc.cast(pc.utf8_slice_codeunits(key, SHARD_W, SHARD_W + ROW_W), pa.int64())
    hashes = pc.split_pattern(pc.utf8_slice_codeunits(key, SHARD_W + ROW_W), "|")
    return shard, row, pc.list_element(hashes, 0), pc.list_element(hashes, 1)


def classify(batch: pa.Table, plan_dir: str, shards: list[str], storage_options: dict | None,
             rebuild: bool, copy_all: bool = False) -> pa.Table:
    """One block of groups (one per doc_id or quarantined row) -> plan files + a summary row.

    `copy_all`: the table's kept columns change, so every document whose text is unchanged
    is copied (with its new kept values), not only those whose kept values changed."""
    is_doc = pc.starts_with(batch["gkey"], "d")
    docs, bad = batch.filter(is_doc), batch.filter(pc.invert(is_doc))
    name = _name(batch["gkey"].combine_chunks() if isinstance(batch["gkey"], pa.ChunkedArray) else batch["gkey"])

    doc_id = pc.utf8_slice_codeunits(docs["gkey"], 1)
    n, old, key = docs["n"], docs["old"], docs["key"]
    in_corpus = pc.greater(n, 0)
    in_table = pc.is_valid(old)
    shard, row, chash, mhash = _winner(key)
    same = pc.fill_null(pc.equal(old, chash), False)
    same_meta = pc.fill_null(pc.equal(pc.fill_null(docs["old_meta"], ""), mhash), False)
    none = pc.and_(in_corpus, pc.invert(in_corpus))
    if rebuild:
        embed = in_corpus
        new, changed, unchanged, meta = in_corpus, none, None, none
    else:
        new = pc.and_(in_corpus, pc.invert(in_table))
        changed = pc.and_(pc.and_(in_corpus, in_table), pc.invert(same))
        same_text = pc.and_(in_corpus, same)
        if copy_all:  # new kept columns: every document with the same text is copied
            meta, unchanged = same_text, none
        else:
            meta, unchanged = pc.and_(same_text, pc.invert(same_meta)), pc.and_(same_text, same_meta)
        embed = pc.or_(new, changed)
    vanished = pc.invert(in_corpus)
    dup = pc.greater(n, 1)

    winners = pa.table({"shard": shard, "row": row, "doc_id": doc_id, "content_hash": chash, "meta_hash": mhash},
                       schema=EMBED_SCHEMA)
    emb = winners.filter(embed).sort_by([("shard", "ascending"), ("row", "ascending")])
    copies = winners.filter(meta).sort_by([("shard", "ascending"), ("row", "ascending")])
    changed_ids = pa.table({"doc_id": doc_id}).filter(pc.or_(changed, meta))
    vanished_ids = pa.table({"doc_id": doc_id}).filter(vanished)
    _write(emb, join(plan_dir, "embed"), name, storage_options)
    _write(copies, join(plan_dir, "meta", "embed"), name, storage_options)
    _write(changed_ids, join(plan_dir, "changed"), name, storage_options)
    _write(vanished_ids, join(plan_dir, "vanished"), name, storage_options)
    _write(pa.table({"gkey": docs["gkey"], "key": key}).filter(dup), join(plan_dir, "dups"), name,
           storage_options)

    # rows with a reason: their own group each, "q<shard>:<row>"
    parts = pc.split_pattern(pc.utf8_slice_codeunits(bad["gkey"], 1), ":")
    bshard = pc.cast(pc.list_element(parts, 0), pa.int32())
    brow = pc.cast(pc.list_element(parts, 1), pa.int64())
    paths = pa.array(shards, pa.string())
    quarantine = pa.table({"shard": bshard, "source": pc.take(paths, bshard), "row": brow, "doc_id": bad["bad_id"],
                           "reason": bad["reason"]}, schema=QUARANTINE_SCHEMA)
    _write(quarantine, join(plan_dir, "quarantine"), f"bad-{name}", storage_options)

    # kept values too: a rerun with new values (text unchanged) must not resume the windows
    # staged with the old ones under the same run id
    embed_digest = _digest_parts(pc.binary_join_element_wise(doc_id, chash, pc.fill_null(mhash, ""), "\0")
                                 .filter(embed).combine_chunks()) if emb.num_rows else (0, 0)
    meta_digest = _digest_parts(pc.binary_join_element_wise(doc_id, mhash, "\0").filter(meta)
                                .combine_chunks()) if copies.num_rows else (0, 0)
    changed_digest = _digest_parts(changed_ids["doc_id"].combine_chunks())
    vanished_digest = _digest_parts(vanished_ids["doc_id"].combine_chunks())
    count = lambda mask: int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)  # noqa: E731
    return pa.table({
        "rows_read": [int(pc.sum(n).as_py() or 0) + bad.num_rows],
        "new": [count(new)],
        "changed": [count(changed)],
        "unchanged": [count(unchanged) if unchanged is not None else 0],
        "meta": [copies.num_rows],
        "vanished": [count(vanished)],
        "existing": [count(in_table)],
        "embed": [emb.num_rows],
        "dup_docs": [count(dup)],
        "dup_rows": [int(pc.sum(pc.subtract(pc.filter(n, dup), 1)).as_py() or 0)],
        "bad_rows": [bad.num_rows],
        "bad_shards": [count(pc.less(brow, 0))],
        "shards": [pc.unique(emb["shard"]).to_pylist()],
        "meta_shards": [pc.unique(copies["shard"]).to_pylist()],
        "d_embed": [list(embed_digest)],
        "d_meta": [list(meta_digest)],
        "d_changed": [list(changed_digest)],
        "d_vanished": [list(vanished_digest)],
    }, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema(
    [(k, pa.int64()) for k in ("rows_read", "new", "changed", "unchanged", "meta", "vanished", "existing", "embed",
                              "dup_docs", "dup_rows", "bad_rows", "bad_shards")]
    + [("shards", pa.list_(pa.int32())), ("meta_shards", pa.list_(pa.int32()))]
    + [(k, pa.list_(pa.uint64())) for k in ("d_embed", "d_meta", "d_changed", "d_vanished")]
)
_COUNTS = SUMMARY_SCHEMA.names[:12]


def quarantine_duplicates(batch: pa.Table, plan_dir: str, shards: list[str],
                          storage_options: dict | None) -> pa.Table:
    """Scan groups rows -> quarantine files for the later occurrences of duplicated ids."""
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, "dups"), storage_options)
    dups = pads.dataset(path, format="parquet", filesystem=fs).to_table()
    rows = batch.select(["gkey", "key"]).filter(pc.is_in(batch["gkey"], value_set=dups["gkey"]))
    rows = rows.join(dups.rename_columns(["gkey", "winner"]), "gkey")
    losers = rows.filter(pc.not_equal(rows["key"], rows["winner"]))
    if losers.num_rows:
        shard, row, *_ = _winner(losers["key"])
        wshard, wrow, *_ = _winner(losers["winner"])
        paths = pa.array(shards, pa.string())
        reason = pc.binary_join_element_wise(
            "duplicate doc_id (kept ", pc.take(paths, wshard), " row ", pc.cast(wrow, pa.string()), ")", "")
        q = pa.table({"shard": shard, "source": pc.take(paths, shard), "row": row,
                      "doc_id": pc.utf8_slice_codeunits(losers["gkey"], 1), "reason": reason},
                     schema=QUARANTINE_SCHEMA)
        _write(q, join(plan_dir, "quarantine"), f"dup-{_name(q['source'].combine_chunks())}-"
               f"{_name(pc.cast(q['row'], pa.string()).combine_chunks())}", storage_options)
    return pa.table({"losers": [losers.num_rows]})


# ---- the driver's side ----------------------------------------------------------------------
@dataclass
class Diff:
    """What a run must do, as counts plus the plan folder that holds the per-document lists."""

    plan_dir: str
    storage_options: dict | None = None
    rows_read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    metadata_updated: int = 0  # same text, new kept values: rows copied, not embedded
    quarantined: int = 0
    deleted: int = 0  # documents the table loses (vanished, unless a shard could not be read)
    bad_shards: int = 0
    rebuild: bool = False
    copy_all: bool = False  # the kept columns change: unchanged documents are copied into a new table
    existing: int = 0  # documents in the table before the run
    embed: int = 0  # documents to embed
    shards: list[int] = field(default_factory=list)  # shards holding documents to embed
    meta_shards: list[int] = field(default_factory=list)  # shards holding documents to copy
    digest_parts: tuple = ()
    seconds: dict[str, float] = field(default_factory=dict)  # table_ids, scan, diff

    @property
    def overwrite(self) -> bool:
        """The run's fragments replace the table (a new model, or new kept columns)."""
        return self.rebuild or self.copy_all

    @property
    def meta_dir(self) -> str:
        """The plan folder of the documents whose rows are copied with new kept values."""
        return join(self.plan_dir, "meta")

    @property
    def delete_vanished(self) -> bool:
        """Vanished documents leave the table unless a shard was unreadable (they may be in it)."""
        return not self.overwrite and not self.bad_shards

    @property
    def replaced(self) -> int:
        """Documents whose rows the commit removes from the current table (not for overwrites)."""
        if self.overwrite:
            return 0
        return self.changed + self.metadata_updated + (self.deleted if self.delete_vanished else 0)

    def digest(self) -> str:
        """Identity of the work: the same embed and delete sets give the same digest."""
        return hashlib.sha256(repr(self.digest_parts).encode()).hexdigest()[:16]

    def delete_batches(self, batch_rows: int = 8192) -> Iterator[pa.Array]:
        """doc_ids whose current rows the commit deletes, in Arrow batches."""
        if self.overwrite:
            return
        yield from ids_from(join(self.plan_dir, "changed"), self.storage_options, batch_rows)
        if self.delete_vanished:
            yield from ids_from(join(self.plan_dir, "vanished"), self.storage_options, batch_rows)

    def quarantine_batches(self, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
        """Quarantined rows (QUARANTINE_SCHEMA), in batches."""
        yield from _batches(join(self.plan_dir, "quarantine"), self.storage_options, None, batch_rows)

    def whole_shards(self) -> set[int]:
        """Shards quarantined whole (unreadable, skipped): one row each, `row` -1."""
        if not self.bad_shards:
            return set()
        out: set[int] = set()
        for b in self.quarantine_batches():
            out.update(pc.filter(b.column("shard"), pc.less(b.column("row"), 0)).to_pylist())
        return out

    def write_quarantine(self, uri: str, run_id: str) -> str:
        """All quarantined rows as one Parquet file at `uri` (source, row, doc_id, reason, run_id),
        streamed batch by batch."""
        import pyarrow.parquet as pq

        schema = pa.schema([("source", pa.string()), ("row", pa.int64()), ("doc_id", pa.string()),
                            ("reason", pa.string()), ("run_id", pa.string())])
        fs, path = filesystem(uri, self.storage_options)
        ensure_dir(fs, path.rsplit("/", 1)[0])
        with pq.ParquetWriter(path, schema, filesystem=fs) as w:
            for b in self.quarantine_batches():
                run = pa.array([run_id] * b.num_rows, pa.string())
                w.write_table(pa.table([b.column("source"), b.column("row"), b.column("doc_id"),
                                        b.column("reason"), run], schema=schema))
        return uri


class DeleteIds:
    """The doc ids a commit deletes, re-readable in Arrow batches (CommitPlan.delete_doc_ids)."""

    def __init__(self, diff: Diff):
        self.diff = diff

    def __iter__(self) -> Iterator[pa.Array]:
        # Read in full before the commit is built: ids missing from the plan (its folder deleted
        # by another run that took the table over) would leave the old rows beside the new ones.
        read = 0
        for ids in self.diff.delete_batches():
            read += len(ids)
            yield ids
        if read != self.diff.replaced:
            raise PlanLostError(
                f"the plan folder {self.diff.plan_dir} lists {read} documents to delete where this run's diff "
                f"counted {self.diff.replaced}: it changed under the run (did another run take the table over?); "
                "nothing was committed: run again"
            )

    def __len__(self) -> int:
        return self.diff.replaced


def _batches(folder: str, storage_options: dict | None, columns: list[str] | None,
             batch_rows: int) -> Iterator[pa.RecordBatch]:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, path = filesystem(folder, storage_options)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    ds = pads.dataset(path, format="parquet", filesystem=fs)
    yield from ds.to_batches(columns=columns, batch_size=batch_rows)


def ids_from(folder: str, storage_options: dict | None, batch_rows: int = 8192) -> Iterator[pa.Array]:
    for b in _batches(folder, storage_options, ["doc_id"], batch_rows):
        if b.num_rows:
            yield b.column(0)


def check_mass_delete(deleted: int, existing: int, max_fraction: float, allow: bool) -> None:
    """Refuse a run that leaves out more of the table's documents than the guard allows."""
    if existing and not allow and deleted / existing > max_fraction:
        raise MassDeleteError(
            f"refusing to delete {deleted} of {existing} documents "
            f"({deleted / existing:.0%} > output.max_delete_fraction "
            f"{max_fraction:.0%}); is the input complete? "
            "Pass --allow-mass-delete to proceed"
        )


# Below this many rows a grouping runs as one task over Arrow: a hash shuffle costs tens of
# seconds of fixed overhead on a small cluster, one task's tables stay under ~100 MB.
SMALL_ROWS = 300_000


def aggregate(table: pa.Table, key: str, specs: list[tuple[str, str, str]]) -> pa.Table:
    """Group `table` by `key` in one process: specs are (column, "min"|"max"|"count", alias);
    counts skip nulls, as the cluster path's Count(ignore_nulls=True) does."""
    out = table.group_by(key, use_threads=False).aggregate([(c, fn) for c, fn, _ in specs])
    return pa.table([out[key]] + [out[f"{c}_{fn}"] for c, fn, _ in specs], names=[key] + [a for *_, a in specs])


def ray_aggregations(specs: list[tuple[str, str, str]]) -> list:
    """The same specs as Ray Data aggregations, for the hash-shuffle path."""
    from ray.data.aggregate import Count, Max, Min

    make = {"min": Min, "max": Max, "count": lambda c, alias_name: Count(c, ignore_nulls=True, alias_name=alias_name)}
    return [make[fn](c, alias_name=alias) for c, fn, alias in specs]


# per doc_id (or quarantined row): the first occurrence's key, how many, the table's hashes
_GROUP_AGGS = [("key", "min", "key"), ("key", "count", "n"), ("old", "min", "old"), ("old_meta", "min", "old_meta"),
               ("reason", "min", "reason"), ("bad_id", "min", "bad_id")]


def _group_and_classify(plan_dir: str, shards: list[str], storage_options: dict | None, rebuild: bool,
                        copy_all: bool, *blocks: pa.Table) -> pa.Table:
    """The small-diff path: every group row in one task, grouped and classified at once."""
    groups = pa.concat_tables([b.cast(GROUP_SCHEMA) for b in blocks if b.num_rows] or [GROUP_SCHEMA.empty_table()])
    return classify(aggregate(groups, "gkey", _GROUP_AGGS), plan_dir, shards, storage_options, rebuild, copy_all)


def _partitions(rows_hint: int) -> int:
    # ~250k rows per hash partition keeps each reduce task's Arrow tables around 50 MB
    return max(2, min(512, rows_hint // 250_000 + 2))


def compute_diff(scan, table, plan_dir: str, shards: list[str], storage_options: dict | None,
                 rebuild: bool, rows_hint: int, max_delete_fraction: float = 1.0,
                 allow_mass_delete: bool = True, small_rows: int = SMALL_ROWS,
                 kept_changed: Callable[[], bool] | None = None) -> Diff:
    """Diff a scan dataset (stages.SCAN_SCHEMA rows) against `table` (a Ray dataset of the
    table's doc_id, content_hash and meta_hash of chunk 0, or None for no table).

    The plan files land under `plan_dir`; raises MassDeleteError past the guard, counting for
    a rebuild too the documents the new table would no longer hold. Up to `small_rows` rows
    (scan and table together) are grouped in one task, more by a hash shuffle.
    `kept_changed` is called once the scan is done (the kept columns' types are known then):
    true when the table's kept columns change, so that every document whose text is
    unchanged is copied into the new table (`Diff.copy_all`).
    """
    import time

    import ray

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    old_rows = None
    if table is not None:
        # read on its own, so that its cost shows in the report apart from the scan
        old_rows = table.map_batches(table_groups, batch_format="pyarrow", batch_size=None).materialize()
    seconds["table_ids"] = time.perf_counter() - t
    t = time.perf_counter()
    # kept (in the object store) for the duplicates pass; the driver holds block references only
    scan_rows = scan.map_batches(scan_groups, batch_format="pyarrow", batch_size=None).materialize()
    seconds["scan"] = time.perf_counter() - t
    copy_all = (kept_changed() if kept_changed is not None else False) and not rebuild
    t = time.perf_counter()
    parts = [scan_rows] + ([old_rows] if old_rows is not None else [])
    if sum(p.count() for p in parts) <= small_rows:
        refs = [r for p in parts for r in p.to_arrow_refs()]
        task = ray.remote(num_cpus=0.5, max_retries=3)(_group_and_classify)
        summaries = [ray.get(task.remote(plan_dir, shards, storage_options, rebuild, copy_all, *refs))]
    else:
        groups = scan_rows if old_rows is None else scan_rows.union(old_rows)
        grouped = groups.groupby("gkey", num_partitions=_partitions(rows_hint)).aggregate(
            *ray_aggregations(_GROUP_AGGS))
        summaries = grouped.map_batches(
            classify, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"plan_dir": plan_dir, "shards": shards, "storage_options": storage_options,
                       "rebuild": rebuild, "copy_all": copy_all},
        ).iter_batches(batch_size=None, batch_format="pyarrow")
    totals = dict.fromkeys(_COUNTS, 0)
    work_shards: set[int] = set()
    meta_shards: set[int] = set()
    digests = {k: [0, 0] for k in ("d_embed", "d_meta", "d_changed", "d_vanished")}
    for b in summaries:
        for k in totals:
            totals[k] += int(pc.sum(b[k]).as_py() or 0)
        work_shards.update(pc.unique(pc.list_flatten(b["shards"])).to_pylist())
        meta_shards.update(pc.unique(pc.list_flatten(b["meta_shards"])).to_pylist())
        for k, acc in digests.items():
            for parts in b[k].to_pylist():
                acc[0], acc[1] = (acc[0] + parts[0]) % 2**64, (acc[1] + parts[1]) % 2**64
    if totals["dup_docs"]:
        losers = scan_rows.map_batches(
            quarantine_duplicates, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"plan_dir": plan_dir, "shards": shards, "storage_options": storage_options},
        )
        found = sum(int(pc.sum(b["losers"]).as_py() or 0)
                    for b in losers.iter_batches(batch_size=None, batch_format="pyarrow"))
        assert found == totals["dup_rows"], (found, totals["dup_rows"])
    del scan_rows, old_rows
    seconds["diff"] = time.perf_counter() - t

    d = Diff(plan_dir=plan_dir, storage_options=storage_options, rebuild=rebuild, copy_all=copy_all,
             rows_read=totals["rows_read"], new=totals["new"], changed=totals["changed"],
             unchanged=totals["unchanged"], metadata_updated=totals["meta"],
             quarantined=totals["bad_rows"] + totals["dup_rows"],
             bad_shards=totals["bad_shards"], existing=totals["existing"], embed=totals["embed"],
             shards=sorted(work_shards), meta_shards=sorted(meta_shards), seconds=seconds)
    # an overwrite replaces the table: what it leaves out is lost whatever the reason
    d.deleted = totals["vanished"] if (d.overwrite or not d.bad_shards) else 0
    deletes = [digests["d_changed"]] + ([digests["d_vanished"]] if d.delete_vanished else [])
    d.digest_parts = (tuple(digests["d_embed"]), d.embed, rebuild,
                      tuple(sum(p[i] for p in deletes) % 2**64 for i in (0, 1)), d.replaced)
    if d.metadata_updated or copy_all:  # (without copies, the run ids of earlier versions stay)
        d.digest_parts += (tuple(digests["d_meta"]), d.metadata_updated, copy_all)
    if copy_all and d.bad_shards:
        # copying the table into the new columns would leave out the documents of unread shards
        raise ShardError(f"input error: {d.bad_shards} shard(s) could not be read; a new set of kept columns "
                         "(input.keep_columns) rewrites the table and would drop their documents: fix those "
                         "shards, or keep the previous input.keep_columns until they read")
    check_mass_delete(d.deleted, d.existing, max_delete_fraction, allow_mass_delete)
    return d


# ---- the embed pass -------------------------------------------------------------------------
def planned_rows(plan_dir: str, shard: int, storage_options: dict | None) -> pa.Table:
    """The plan's rows of one shard (row, doc_id, content_hash, meta_hash), read in the read
    task, not on the driver."""
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, "embed"), storage_options)
    ds = pads.dataset(path, format="parquet", filesystem=fs)
    return ds.to_table(columns=["row", "doc_id", "content_hash", "meta_hash"], filter=pads.field("shard") == shard)


def read_planned(batch: pa.Table, cfg, plan_dir: str, storage_options: dict | None,
                 kept_schema: pa.Schema | None = None):
    """Embed pass read task: the prepared rows of one shard that the plan selected, read under
    the shard's scan pin and matched to the plan by id and hashes (pins.read_pinned), with the
    pin on every row so that the staged window records where it came from (kept columns cast
    to the table's `kept_schema`, so every block has the same schema)."""
    from gpte_ray.input.pins import Pin, read_pinned

    shard, pin = batch["shard"][0].as_py(), batch["pin"][0].as_py()
    plan = planned_rows(plan_dir, shard, storage_options)
    for t in read_pinned(Pin.from_json(pin), shard, cfg, plan, kept_schema=kept_schema):
        t = t.drop_columns(["reason", "row", "shard"])
        yield t.append_column(PIN_COLUMN, pa.array([pin] * t.num_rows, pa.string()))


# the pin (JSON) of the shard a document was read from, carried to its chunks' staging marker
PIN_COLUMN = "source_pin"


# ---- the commit's deletions and the plan folder ------------------------------------------------
PLAN_PREFIX = "plan-"
# a plan folder is named plan-<unix seconds>-<uuid hex>: its age is read from its name
_PLAN = re.compile(rf"^{PLAN_PREFIX}(?:(\d{{10}})-)?[0-9a-f]{{32}}$")
# Other runs' plans are left this long: a run that lost its lease (paused past it) may still
# be working from its plan. Its commit checks the plan anyway (DeleteIds); this spares its work.
PLAN_TTL_S = 24 * 3600.0


class PlanLostError(RuntimeError):
    """A run's plan folder changed under it; nothing was committed."""


def new_plan_dir(staging_root: str) -> str:
    import time
    import uuid

    return join(staging_root, f"{PLAN_PREFIX}{int(time.time()):010d}-{uuid.uuid4().hex}")


def drop_plan(plan_dir: str, storage_options: dict | None) -> None:
    """Delete one plan folder (the caller's own)."""
    fs, path = filesystem(plan_dir, storage_options)
    if not _PLAN.match(path.rstrip("/").rsplit("/", 1)[-1]):
        raise ValueError(f"refusing to delete {plan_dir!r}: not a plan folder")
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def drop_old_plans(staging_root: str, storage_options: dict | None, older_than_s: float = PLAN_TTL_S) -> None:
    """Delete plan folders older than `older_than_s`: left by crashed runs (this table's
    staging only). Folders named without a time come from older versions: always old."""
    import time

    import pyarrow.fs as pafs

    fs, root = filesystem(staging_root, storage_options)
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = _PLAN.match(info.base_name)
        if info.type == pafs.FileType.Directory and m and \
                (m.group(1) is None or time.time() - int(m.group(1)) > older_than_s):
            fs.delete_dir(f"{root}/{info.base_name}")


def calibration_rows(plan_dir: str, storage_options: dict | None, k: int) -> dict[int, pa.Table]:
    """Shard -> plan rows (as `planned_rows`) of the first k documents to embed, by doc_id: a
    fixed sample (read where the calibration runs, not on the driver)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, "embed"), storage_options)
    try:
        plan = pads.dataset(path, format="parquet", filesystem=fs)
    except FileNotFoundError:
        return {}
    best = None
    columns = ["shard", "row", "doc_id", "content_hash", "meta_hash"]
    for b in plan.to_batches(columns=columns, batch_size=1 << 20):
        t = pa.Table.from_batches([b]) if best is None else pa.concat_tables([best, pa.Table.from_batches([b])])
        best = t.sort_by("doc_id").slice(0, k)
    if best is None:
        return {}
    return {s: best.filter(pc.equal(best["shard"], s)).drop_columns(["shard"])
            for s in pc.unique(best["shard"]).to_pylist()}
