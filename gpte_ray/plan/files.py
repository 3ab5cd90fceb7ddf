"""The plan folder: its layout, and the writing and reading of its Parquet files.

A run's plan lives in the table's staging under plan-<unix seconds>-<uuid hex> (`new_plan_dir`).
Worker tasks write one file per block of groups into each part, named by the block's contents
(`block_name`), so that a retried task overwrites its own output:

  embed/<shard>.parquet EMBED_SCHEMA: every document to embed, one file per shard (written per
                        block of groups to embed-blocks/, then partitioned by `partition_by_shard`),
                        so a read task reads its own shard's rows only
  meta/embed/*.parquet  EMBED_SCHEMA: documents whose text is unchanged but whose kept columns
                        changed: their rows are copied with the new values, not embedded (a plan
                        folder of its own, so resume.staged_state reads it as it reads the plan)
  changed/*.parquet     doc_id of documents whose old chunks the commit replaces (meta too)
  vanished/*.parquet    doc_id of table documents no longer in the corpus
  dups/*.parquet        group key and winning key of ids seen more than once
  quarantine/*.parquet  QUARANTINE_SCHEMA: every row not embedded
  todo-<n>/, copy-todo-<n>/
                        what is left to embed (copy) after attempt n: a plan folder (embed/), with
                        partial/ (doc_id of documents staged in part) and skip/ (their staged
                        doc_id, chunk)

Everything here reads and writes over Arrow, in batches or per shard, where the work runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.storage import ensure_dir, filesystem, join

__all__ = [
    "CHANGED", "DUPS", "EMBED", "EMBED_SCHEMA", "META", "PARTIAL", "PLAN_PREFIX", "PLAN_TTL_S", "QUARANTINE",
    "QUARANTINE_SCHEMA", "SKIP", "VANISHED", "block_name", "calibration_rows", "digest_parts", "drop_old_plans",
    "drop_plan", "ids_from", "new_plan_dir", "partition_by_shard", "planned_rows", "read_batches", "write_file",
    "EMBED_BLOCKS",
]

# the parts of a plan folder (see above)
EMBED, META, CHANGED, VANISHED, DUPS, QUARANTINE = "embed", "meta", "changed", "vanished", "dups", "quarantine"
PARTIAL, SKIP = "partial", "skip"
EMBED_BLOCKS = "embed-blocks"  # plan rows as the diff's blocks of groups wrote them, before partition_by_shard

EMBED_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string()),
                          ("content_hash", pa.string()), ("meta_hash", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("shard", pa.int32()), ("source", pa.string()), ("row", pa.int64()),
                               ("doc_id", pa.string()), ("reason", pa.string())])

PLAN_PREFIX = "plan-"
# a plan folder is named plan-<unix seconds>-<uuid hex>: its age is read from its name
_PLAN = re.compile(rf"^{PLAN_PREFIX}(?:(\d{{10}})-)?[0-9a-f]{{32}}$")
# Other runs' plans are left this long: a run that lost its lease (paused past it) may still
# be working from its plan. Its commit checks the plan anyway (DeleteIds); this spares its work.
PLAN_TTL_S = 24 * 3600.0

_HASH_KEYS = ("gpte-ray-diff-a:", "gpte-ray-diff-b:")  # two 64-bit lanes: 128 bits in all


def _hash64(values: pa.Array, key: str) -> np.ndarray:
    """Stable 64-bit hash of each string (SipHash with a fixed key): same on every worker."""
    from pandas.util import hash_array

    return hash_array(np.asarray(values.to_numpy(zero_copy_only=False), dtype=object), hash_key=key)


def digest_parts(values: pa.Array) -> tuple[int, int]:
    """Order-free digest of a set of strings: the wrapping sum of their hashes, two lanes (so
    that the digests of blocks add up to the digest of their union)."""
    if len(values) == 0:
        return 0, 0
    return tuple(int(np.sum(_hash64(values, k), dtype=np.uint64)) for k in _HASH_KEYS)


def block_name(values: pa.Array | pa.ChunkedArray) -> str:
    """A file name fixed by a block's contents, so a retried task overwrites its own output."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    a, b = digest_parts(values)
    return f"{a:016x}{b:016x}-{len(values)}"


def write_file(table: pa.Table, folder: str, name: str, storage_options: dict | None) -> None:
    """`table` as `folder`/`name`.parquet; nothing for an empty table."""
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        return
    fs, path = filesystem(folder, storage_options)
    ensure_dir(fs, path)
    pq.write_table(table, f"{path}/{name}.parquet", filesystem=fs)


def read_batches(folder: str, storage_options: dict | None, columns: list[str] | None,
                 batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The Parquet files of `folder` in batches of up to `batch_rows`; none for a missing folder."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, path = filesystem(folder, storage_options)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    ds = pads.dataset(path, format="parquet", filesystem=fs)
    yield from ds.to_batches(columns=columns, batch_size=batch_rows)


def ids_from(folder: str, storage_options: dict | None, batch_rows: int = 8192) -> Iterator[pa.Array]:
    """The doc_id column of a part (changed/, vanished/), in Arrow batches."""
    for b in read_batches(folder, storage_options, ["doc_id"], batch_rows):
        if b.num_rows:
            yield b.column(0)


def shard_file(folder: str, shard: int) -> str:
    return join(folder, f"{shard:010d}.parquet")


def planned_rows(plan_dir: str, shard: int, storage_options: dict | None) -> pa.Table:
    """The plan's rows of one shard (row, doc_id, content_hash, meta_hash), read in the read
    task, not on the driver: that shard's file only (the plan is partitioned by shard)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(shard_file(join(plan_dir, EMBED), shard), storage_options)
    return pq.read_table(path, filesystem=fs, columns=["row", "doc_id", "content_hash", "meta_hash"])


def partition_by_shard(src: str, dst: str, rows: int, storage_options: dict | None, small_rows: int,
                       here: bool = False) -> None:
    """The plan rows in folder `src` (one file per block of groups) as one file per shard in
    `dst` (`shard_file`), sorted by row; `src` goes after. Up to `small_rows` rows in one Ray
    task (`here`: in this process, for a plan the driver grouped), more by a Ray Data groupby
    on the shard."""
    import ray

    if rows == 0:
        return
    if rows <= small_rows:
        if here:
            _partition_in_task(src, dst, storage_options)
        else:
            task = ray.remote(num_cpus=0.5, max_retries=3)(_partition_in_task)
            ray.get(task.remote(src, dst, storage_options))
    else:
        import ray.data

        fs, path = filesystem(src, storage_options)
        parts = ray.data.read_parquet(path, filesystem=fs).groupby("shard").map_groups(
            _write_shard, batch_format="pyarrow", fn_kwargs={"dst": dst, "storage_options": storage_options})
        for _ in parts.iter_batches(batch_size=None):
            pass
    fs, path = filesystem(src, storage_options)
    fs.delete_dir(path)


def _write_shard(rows: pa.Table, dst: str, storage_options: dict | None) -> pa.Table:
    """One shard's plan rows -> its file (a retried task overwrites it)."""
    import pyarrow.parquet as pq

    rows = rows.select(EMBED_SCHEMA.names).cast(EMBED_SCHEMA).sort_by("row")
    fs, path = filesystem(shard_file(dst, rows["shard"][0].as_py()), storage_options)
    ensure_dir(fs, path.rsplit("/", 1)[0])
    pq.write_table(rows, path, filesystem=fs)
    return pa.table({"rows": [rows.num_rows]})


def _partition_in_task(src: str, dst: str, storage_options: dict | None) -> None:
    import pyarrow.dataset as pads

    fs, path = filesystem(src, storage_options)
    t = pads.dataset(path, format="parquet", filesystem=fs).to_table().sort_by([("shard", "ascending")])
    shards = t["shard"].to_numpy()
    starts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(shards)]
    for a, b in zip(starts, starts[1:]):
        _write_shard(t.slice(a, b - a), dst, storage_options)


def calibration_rows(plan_dir: str, storage_options: dict | None, k: int) -> dict[int, pa.Table]:
    """Shard -> plan rows (as `planned_rows`) of the first k documents to embed, by doc_id: a
    fixed sample (read where the calibration runs, not on the driver)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(join(plan_dir, EMBED), storage_options)
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


def new_plan_dir(staging_root: str) -> str:
    """A fresh plan folder's path under `staging_root` (made by the first file written in it)."""
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
