"""The diff, on the cluster: which documents a run embeds, copies, deletes and quarantines.

The corpus scan (one row per input row: shard, row, doc_id, content_hash, reason, meta_hash) and
the table's documents (doc_id, content_hash and meta_hash of chunk 0) are unioned and grouped by
doc_id (plan.grouping: in one task when small, else a hash shuffle). Each block of groups is
classified over Arrow in a worker task, which writes what the run needs into the run's plan
folder (its layout: plan.files).

The driver receives one summary row per classified block (counts, digest parts, the shards
with work), never an object per document.

Duplicate rule: the first occurrence of a doc_id in (shard path order, row) order wins; later
ones are quarantined as "duplicate doc_id (kept <file> row <n>)". Rows with a reason (bad id
or text, unreadable shard) never claim an id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.input.sources import ShardError
from gpte_ray.plan.files import (
    CHANGED,
    DUPS,
    EMBED,
    EMBED_BLOCKS,
    EMBED_SCHEMA,
    META,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    VANISHED,
    block_name,
    digest_parts,
    ids_from,
    partition_by_shard,
    read_batches,
    write_file,
)
from gpte_ray.plan.grouping import SMALL_ROWS, fits_one_task, group_map
from gpte_ray.report.counts import RunCounts
from gpte_ray.storage import ensure_dir, filesystem, join

__all__ = [
    "Carried", "DeleteIds", "Diff", "FullScanNeeded", "MassDeleteError", "PlanLostError", "check_mass_delete",
    "compute_diff",
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
# per doc_id (or quarantined row): the first occurrence's key, how many, the table's hashes
_GROUP_AGGS = [("key", "min", "key"), ("key", "count", "n"), ("old", "min", "old"), ("old_meta", "min", "old_meta"),
               ("reason", "min", "reason"), ("bad_id", "min", "bad_id")]


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
    name = block_name(batch["gkey"])

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
    write_file(emb, join(plan_dir, EMBED_BLOCKS), name, storage_options)
    write_file(copies, join(plan_dir, META, EMBED_BLOCKS), name, storage_options)
    write_file(changed_ids, join(plan_dir, CHANGED), name, storage_options)
    write_file(vanished_ids, join(plan_dir, VANISHED), name, storage_options)
    write_file(pa.table({"gkey": docs["gkey"], "key": key}).filter(dup), join(plan_dir, DUPS), name,
               storage_options)
    whole_shards = _quarantine_bad(bad, plan_dir, shards, storage_options, name)

    # kept values too: a rerun with new values (text unchanged) must not resume the windows
    # staged with the old ones under the same run id
    embed_digest = digest_parts(pc.binary_join_element_wise(doc_id, chash, pc.fill_null(mhash, ""), "\0")
                                .filter(embed).combine_chunks()) if emb.num_rows else (0, 0)
    meta_digest = digest_parts(pc.binary_join_element_wise(doc_id, mhash, "\0").filter(meta)
                               .combine_chunks()) if copies.num_rows else (0, 0)
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
        "bad_shards": [whole_shards],
        "shards": [pc.unique(emb["shard"]).to_pylist()],
        "meta_shards": [pc.unique(copies["shard"]).to_pylist()],
        "d_embed": [list(embed_digest)],
        "d_meta": [list(meta_digest)],
        "d_changed": [list(digest_parts(changed_ids["doc_id"].combine_chunks()))],
        "d_vanished": [list(digest_parts(vanished_ids["doc_id"].combine_chunks()))],
    }, schema=SUMMARY_SCHEMA)


def _quarantine_bad(bad: pa.Table, plan_dir: str, shards: list[str], storage_options: dict | None,
                    name: str) -> int:
    """Groups of rows with a reason ("q<shard>:<row>", one each) -> quarantine file; returns the
    shards among them skipped whole (row -1)."""
    parts = pc.split_pattern(pc.utf8_slice_codeunits(bad["gkey"], 1), ":")
    shard = pc.cast(pc.list_element(parts, 0), pa.int32())
    row = pc.cast(pc.list_element(parts, 1), pa.int64())
    paths = pa.array(shards, pa.string())
    quarantine = pa.table({"shard": shard, "source": pc.take(paths, shard), "row": row, "doc_id": bad["bad_id"],
                           "reason": bad["reason"]}, schema=QUARANTINE_SCHEMA)
    write_file(quarantine, join(plan_dir, QUARANTINE), f"bad-{name}", storage_options)
    return int(pc.sum(pc.cast(pc.less(row, 0), pa.int64())).as_py() or 0)


SUMMARY_SCHEMA = pa.schema(
    [(k, pa.int64()) for k in ("rows_read", "new", "changed", "unchanged", "meta", "vanished", "existing", "embed",
                              "dup_docs", "dup_rows", "bad_rows", "bad_shards")]
    + [("shards", pa.list_(pa.int32())), ("meta_shards", pa.list_(pa.int32()))]
    + [(k, pa.list_(pa.uint64())) for k in ("d_embed", "d_meta", "d_changed", "d_vanished")]
)
_COUNTS = SUMMARY_SCHEMA.names[:12]
_DIGESTS = SUMMARY_SCHEMA.names[14:]


def quarantine_duplicates(batch: pa.Table, plan_dir: str, shards: list[str],
                          storage_options: dict | None) -> pa.Table:
    """Scan groups rows -> quarantine files for the later occurrences of duplicated ids."""
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, DUPS), storage_options)
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
        write_file(q, join(plan_dir, QUARANTINE),
                   f"dup-{block_name(q['source'])}-{block_name(pc.cast(q['row'], pa.string()))}", storage_options)
    return pa.table({"losers": [losers.num_rows]})


# ---- the driver's side ----------------------------------------------------------------------
@dataclass(kw_only=True)
class Diff(RunCounts):
    """What a run must do: its counts (RunCounts; `deleted`: the documents the table loses,
    vanished ones only while every shard could be read, unless the run overwrites the table)
    plus the plan folder that holds the per-document lists."""

    plan_dir: str
    storage_options: dict | None = None
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
        return join(self.plan_dir, META)

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
        yield from ids_from(join(self.plan_dir, CHANGED), self.storage_options, batch_rows)
        if self.delete_vanished:
            yield from ids_from(join(self.plan_dir, VANISHED), self.storage_options, batch_rows)

    def quarantine_batches(self, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
        """Quarantined rows (QUARANTINE_SCHEMA), in batches."""
        yield from read_batches(join(self.plan_dir, QUARANTINE), self.storage_options, None, batch_rows)

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


class PlanLostError(RuntimeError):
    """A run's plan folder changed under it; nothing was committed."""


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


class FullScanNeeded(Exception):
    """An incremental diff that needs every shard read after all (the kept columns change)."""


class MassDeleteError(RuntimeError):
    """A run would delete more of the table than the guard allows."""


def check_mass_delete(deleted: int, existing: int, max_fraction: float, allow: bool) -> None:
    """Refuse a run that leaves out more of the table's documents than the guard allows."""
    if existing and not allow and deleted / existing > max_fraction:
        raise MassDeleteError(
            f"refusing to delete {deleted} of {existing} documents "
            f"({deleted / existing:.0%} > output.max_delete_fraction "
            f"{max_fraction:.0%}); is the input complete? "
            "Pass --allow-mass-delete to proceed"
        )


@dataclass
class Carried:
    """What the shards a run skipped hold (plan.shards), added to the diff's own counts."""

    unchanged: int = 0  # documents only in skipped shards
    quarantined: int = 0  # their duplicate and bad rows
    existing: int = 0  # table documents among them
    rows_skipped: int = 0  # rows of the skipped shards
    loaded: int = 0  # rows of skipped shards the diff saw (touched ids): not read, so not in rows_read

    def add_to(self, d: Diff) -> None:
        d.unchanged += self.unchanged
        d.quarantined += self.quarantined
        d.existing += self.existing
        d.rows_skipped += self.rows_skipped
        d.rows_read -= self.loaded


def compute_diff(scan, table, *, plan_dir: str, shards: list[str], storage_options: dict | None,
                 rebuild: bool, rows_hint: int, max_delete_fraction: float = 1.0,
                 allow_mass_delete: bool = True, small_rows: int = SMALL_ROWS,
                 kept_changed: Callable[[], bool] | None = None, carried: Carried | None = None) -> Diff:
    """Diff a scan (stages.SCAN_SCHEMA rows: a Ray dataset, or a list of Arrow tables the
    driver read, grouped here if small) against `table` (a Ray dataset of the
    table's doc_id, content_hash and meta_hash of chunk 0, or None for no table).

    The plan files land under `plan_dir`; raises MassDeleteError past the guard, counting for
    a rebuild too the documents the new table would no longer hold. Up to `small_rows` rows
    (scan and table together) are grouped in one task, more by a hash shuffle (`rows_hint`
    sizes its partitions). `kept_changed` is called once the scan is done (the kept columns'
    types are known then): true when the table's kept columns change, so that every document
    whose text is unchanged is copied into the new table (`Diff.copy_all`). `carried`: what the
    shards the run skipped hold, when `scan` and `table` cover the touched documents only.
    """
    import time

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    old_rows = None
    if table is not None:
        # read on its own, so that its cost shows in the report apart from the scan
        old_rows = table.map_batches(table_groups, batch_format="pyarrow", batch_size=None).materialize()
    seconds["table_ids"] = time.perf_counter() - t
    t = time.perf_counter()
    here = isinstance(scan, list)  # a small scan, read by the driver: grouped here too
    if here:
        scan_rows = [scan_groups(b) for b in scan]
        if not fits_one_task(_count(scan_rows) + (old_rows.count() if old_rows is not None else 0), small_rows):
            import ray.data  # many rows after all (short texts, or a large table): grouped by a shuffle

            here, scan_rows = False, ray.data.from_arrow(scan_rows or [GROUP_SCHEMA.empty_table()])
    else:
        # kept (in the object store) for the duplicates pass; the driver holds block references only
        scan_rows = scan.map_batches(scan_groups, batch_format="pyarrow", batch_size=None).materialize()
    seconds["scan"] = time.perf_counter() - t
    copy_all = (kept_changed() if kept_changed is not None else False) and not rebuild
    if copy_all and carried is not None:
        raise FullScanNeeded("the kept columns change: every document is copied, so every shard is read")
    t = time.perf_counter()
    parts = [scan_rows] + ([old_rows] if old_rows is not None else [])
    totals = _add_up(group_map(
        parts, "gkey", _GROUP_AGGS, classify, rows=sum(_count(p) for p in parts), small_rows=small_rows,
        rows_hint=rows_hint, schema=GROUP_SCHEMA,
        fn_kwargs={"plan_dir": plan_dir, "shards": shards, "storage_options": storage_options, "rebuild": rebuild,
                   "copy_all": copy_all}))
    if totals["dup_docs"]:
        kwargs = {"plan_dir": plan_dir, "shards": shards, "storage_options": storage_options}
        if here:
            losers = (quarantine_duplicates(b, **kwargs) for b in scan_rows)
        else:
            losers = scan_rows.map_batches(quarantine_duplicates, batch_format="pyarrow", batch_size=None,
                                           fn_kwargs=kwargs).iter_batches(batch_size=None, batch_format="pyarrow")
        found = sum(int(pc.sum(b["losers"]).as_py() or 0) for b in losers)
        assert found == totals["dup_rows"], (found, totals["dup_rows"])
    del scan_rows, old_rows, parts
    for folder, rows in ((plan_dir, totals["embed"]), (join(plan_dir, META), totals["meta"])):
        partition_by_shard(join(folder, EMBED_BLOCKS), join(folder, EMBED), rows, storage_options, small_rows,
                           here=here)
    seconds["diff"] = time.perf_counter() - t

    d = _make_diff(totals, plan_dir=plan_dir, storage_options=storage_options, rebuild=rebuild, copy_all=copy_all)
    d.seconds = seconds
    if carried is not None:
        carried.add_to(d)
    if copy_all and d.bad_shards:
        # copying the table into the new columns would leave out the documents of unread shards
        raise ShardError(f"input error: {d.bad_shards} shard(s) could not be read; a new set of kept columns "
                         "(input.keep_columns) rewrites the table and would drop their documents: fix those "
                         "shards, or keep the previous input.keep_columns until they read")
    check_mass_delete(d.deleted, d.existing, max_delete_fraction, allow_mass_delete)
    return d


def _count(part) -> int:
    """Rows of a grouping input: a Ray dataset, or a list of Arrow tables read here."""
    return sum(b.num_rows for b in part) if isinstance(part, list) else part.count()


def _add_up(summaries: Iterable[pa.Table]) -> dict:
    """The classify summaries as one: counts, the shards with work, the digests (wrapping sums)."""
    totals: dict = dict.fromkeys(_COUNTS, 0)
    totals.update(shards=set(), meta_shards=set(), **{k: [0, 0] for k in _DIGESTS})
    for b in summaries:
        for k in _COUNTS:
            totals[k] += int(pc.sum(b[k]).as_py() or 0)
        for k in ("shards", "meta_shards"):
            totals[k].update(pc.unique(pc.list_flatten(b[k])).to_pylist())
        for k in _DIGESTS:
            acc = totals[k]
            for parts in b[k].to_pylist():
                acc[0], acc[1] = (acc[0] + parts[0]) % 2**64, (acc[1] + parts[1]) % 2**64
    return totals


def _make_diff(totals: dict, *, plan_dir: str, storage_options: dict | None, rebuild: bool, copy_all: bool) -> Diff:
    """The Diff of the added-up summaries, its digest parts included."""
    d = Diff(plan_dir=plan_dir, storage_options=storage_options, rebuild=rebuild, copy_all=copy_all,
             rows_read=totals["rows_read"], new=totals["new"], changed=totals["changed"],
             unchanged=totals["unchanged"], metadata_updated=totals["meta"],
             quarantined=totals["bad_rows"] + totals["dup_rows"],
             bad_shards=totals["bad_shards"], existing=totals["existing"], embed=totals["embed"],
             shards=sorted(totals["shards"]), meta_shards=sorted(totals["meta_shards"]))
    # an overwrite replaces the table: what it leaves out is lost whatever the reason
    d.deleted = totals["vanished"] if (d.overwrite or not d.bad_shards) else 0
    deletes = [totals["d_changed"]] + ([totals["d_vanished"]] if d.delete_vanished else [])
    d.digest_parts = (tuple(totals["d_embed"]), d.embed, rebuild,
                      tuple(sum(p[i] for p in deletes) % 2**64 for i in (0, 1)), d.replaced)
    if d.metadata_updated or copy_all:  # (without copies, the run ids of earlier versions stay)
        d.digest_parts += (tuple(totals["d_meta"]), d.metadata_updated, copy_all)
    return d


# ---- the embed pass -------------------------------------------------------------------------
