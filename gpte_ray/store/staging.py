"""The table's staging area: every path under `<db>/_gpte_staging/<table>/`, the markers of
staged windows, and the one writer that stages rows (the embed pass and the copy pass).

  runs/<run_id>/<name>.parquet    a staged window: its (doc_id, chunk, n_chunks) rows; in its
                                  footer the Lance fragments it wrote and the pins of the shards
                                  its rows were read from
  plans/plan-<time>-<hex>/        a run's plan files (plan.files)
  lease.json                      the lease of the run that holds the table (lock.py)
  commits/<version>.<n>.json      one claim per committed version: which run made it (lock.py)

A window is staged when its marker exists: the marker is written after the fragment's data
files, atomically, so a crash leaves either a whole staged window or orphaned data files that
no commit names.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.storage import ensure_dir, filesystem, join

__all__ = ["MARKER_SCHEMA", "StagingLayout", "StagingWriter", "marker_files", "marker_footers", "staged_ids",
           "tidy_after_failure", "write_marker"]


class StagingLayout:
    """Every path under one table's staging folder."""

    def __init__(self, db: str, table: str):
        self.root = join(db.rstrip("/"), "_gpte_staging", table)
        self.runs = join(self.root, "runs")  # one folder of markers per run id
        self.plans = join(self.root, "plans")  # one folder per run's plan
        self.lease = join(self.root, "lease.json")
        self.commits = join(self.root, "commits")

    def run_dir(self, run_id: str) -> str:
        return join(self.runs, run_id)


MARKER_SCHEMA = pa.schema([("doc_id", pa.string()), ("chunk", pa.int32()), ("n_chunks", pa.int32())])
FRAGMENTS_KEY = b"gpte_ray.fragments"
PINS_KEY = b"gpte_ray.pins"  # the pins (input.pins.Pin JSON) of the shards the window's rows were read from


def write_marker(staging_dir: str, storage_options: dict | None, name: str, keys: pa.Table,
                 fragments: list[str], pins: list[str] | None = None) -> None:
    """Durably record a window's fragments, the chunks they hold and the pins of the shards
    they were read from (atomic per file)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(staging_dir, storage_options)
    ensure_dir(fs, path)
    table = keys.select(MARKER_SCHEMA.names).cast(MARKER_SCHEMA)
    meta = {FRAGMENTS_KEY: json.dumps(fragments).encode()}
    if pins is not None:
        meta[PINS_KEY] = json.dumps(sorted(set(pins))).encode()
    table = table.replace_schema_metadata(meta)
    tmp = f"{path}/.{name}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{path}/{name}.parquet")


def marker_files(staging_dir: str, storage_options: dict | None) -> list[str]:
    """Paths of the run's markers, sorted (one per staged window)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(staging_dir, storage_options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith("."))


def _marker_meta(path: str, fs) -> tuple[list, int, list[str] | None]:
    """(FragmentMetadata list, rows, source pins or None) of one marker, from its footer alone."""
    import pyarrow.parquet as pq
    from lance.fragment import FragmentMetadata

    meta = pq.read_metadata(path, filesystem=fs)
    frags = json.loads(meta.metadata[FRAGMENTS_KEY])
    pins = json.loads(meta.metadata[PINS_KEY]) if PINS_KEY in meta.metadata else None
    return ([FragmentMetadata.from_json(f if isinstance(f, str) else json.dumps(f)) for f in frags], meta.num_rows,
            pins)


def staged_ids(staging_dir: str, markers: list[str], storage_options: dict | None, batch_rows: int = 65536):
    """The doc ids of the kept markers' chunks (paths in `staging_dir`'s filesystem, as
    `marker_files` gives them), in Arrow batches (unique within each batch)."""
    import pyarrow.dataset as pads

    if not markers:
        return
    fs, _ = filesystem(staging_dir, storage_options)
    for b in pads.dataset(markers, format="parquet", filesystem=fs).to_batches(columns=["doc_id"],
                                                                              batch_size=batch_rows):
        if b.num_rows:
            yield pc.unique(b.column(0))


def marker_footers(files: list[str], fs) -> list[tuple[list, int, list[str] | None]]:
    """(fragments, rows, pins) of each marker: one footer per window, read in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda p: _marker_meta(p, fs), files))


class StagingWriter:
    """Stage rows of the table: a Lance fragment, then the marker that names it, its keys and
    the pins of the shards the rows came from. Runs in the workers (embed actors, copy tasks)."""

    def __init__(self, store, schema: pa.Schema, run_id: str, overwrite: bool):
        self.store = store  # a store.table.TableStore
        self.schema = schema
        self.run_id = run_id
        self.overwrite = overwrite  # the fragments will replace the table (a new schema)

    def write(self, rows: pa.Table, keys: pa.Table, pins: list[str] | None) -> int:
        """Stage `rows` (any superset of the table's columns) with their (doc_id, chunk, n_chunks)
        `keys`; returns the rows staged."""
        if rows.num_rows == 0:
            return 0
        data = rows.select(self.schema.names).cast(self.schema)
        fragments = self.store.write_fragments(data, self.schema, data.num_rows, self.overwrite)
        write_marker(self.store.staging.run_dir(self.run_id), self.store.storage_options, uuid.uuid4().hex, keys,
                     [f.to_json() for f in fragments], pins)
        return data.num_rows


def tidy_after_failure(db: str, table: str, existed: bool | None) -> None:
    """After a run that failed before committing: remove the empty folders it made.

    Only empty folders go (the staging folders, a db folder this run created), so a failed first
    run leaves the disk as it found it; staged work that a rerun can resume from is never touched.
    `existed`: whether the (local) db folder existed before the run; None for an object store.
    """
    if existed is None:
        return
    layout = StagingLayout(db, table)
    for folder in (layout.plans, layout.root, os.path.dirname(layout.root), *(() if existed else (db,))):
        try:
            os.rmdir(folder)  # only succeeds on an empty folder
        except OSError:
            pass
