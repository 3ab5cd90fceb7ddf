"""The Lance table: schema and fingerprint, fragment writes in workers, one commit per run.

Layout under the LanceDB URI (so `lancedb.connect(db).open_table(name)` reads it):
  <db>/<table>.lance                          the table
  <db>/_gpte_staging/<table>/                 staged work, plans, the lease, commit claims (staging.py)
  <db>/<table>.quarantine/<run_id>.parquet    rows that were not embedded, with reasons
  <db>/<table>.reports/<run_id>.{json,html}   run reports

A run commits once, as a Lance transaction fenced on the version it planned against (see
lock.py), so two runs never both commit and a retried run never doubles rows.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from gpte_ray.config import ConfigError
from gpte_ray.model.spec import ModelSpec
from gpte_ray.storage import ensure_dir, filesystem, is_remote, join, local_path
from gpte_ray.store.lock import Fence, FenceError, claim_of, moved
from gpte_ray.store.staging import StagingLayout

__all__ = [
    "FINGERPRINT_KEY",
    "RUN_ID_KEY",
    "META_HASH",
    "CommitPlan",
    "DuplicateKeyError",
    "TableStore",
    "embedding_columns",
    "kept_fields",
    "table_schema",
    "vector_type",
]

FINGERPRINT_KEY = "gpte_ray.fingerprint"
CALIBRATION_KEY = "gpte_ray.calibration"
RUN_ID_KEY = "gpte_ray.run_id"

# what LanceDB accepts, minus names that are path steps ("." and ".." would make the staging
# folder a parent of other tables' data) or hidden files
TABLE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
RUN_ID = re.compile(r"^[0-9a-f]{16}$")
_IN_PROCESS = threading.Lock()  # see TableStore.commit


def check_table_name(name: str) -> str:
    if not TABLE_NAME.match(name):
        raise ConfigError(
            f"config error: output.table: {name!r} is not a valid table name (letters, digits, '_', '-', "
            "'.'; not starting with '.'; at most 128 characters)"
        )
    return name


def vector_type(spec: ModelSpec) -> pa.DataType:
    """The `vector` column's type: one fixed-size list per chunk, or (multi-vector) a list of them."""
    if spec.output == "multi-vector":
        return pa.list_(pa.list_(pa.float32(), spec.dim))
    if spec.precision == "float16":
        return pa.list_(pa.float16(), spec.dim)
    if spec.precision == "int8":
        return pa.list_(pa.int8(), spec.dim)
    if spec.precision == "binary":
        return pa.list_(pa.uint8(), spec.dim // 8)
    return pa.list_(pa.float32(), spec.dim)


# the table's own columns; a table with kept source columns has META_HASH and them after these
BASE_COLUMNS = ("doc_id", "chunk", "vector", "sparse_indices", "sparse_values", "text", "content_hash", "char_start",
                "char_end")
# a sparse table's vectors: the non-zero vocabulary ids, ascending, and their weights
SPARSE_COLUMNS = {"sparse_indices": pa.list_(pa.int32()), "sparse_values": pa.list_(pa.float32())}
META_HASH = "meta_hash"


def table_schema(spec: ModelSpec, store_text: bool, calibration: dict | None,
                 kept: pa.Schema | None = None) -> pa.Schema:
    """The table's schema; `kept`: the kept source columns (with meta_hash, the hash of their values)."""
    if spec.output == "sparse":
        vectors = [pa.field(name, typ) for name, typ in SPARSE_COLUMNS.items()]
    else:
        vectors = [pa.field("vector", vector_type(spec))]
    fields = [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        *vectors,
        pa.field("content_hash", pa.string()),
        pa.field("char_start", pa.int32()),
        pa.field("char_end", pa.int32()),
    ]
    if store_text:
        fields.insert(2 + len(vectors), pa.field("text", pa.string()))
    if kept is not None and len(kept):
        fields += [pa.field(META_HASH, pa.string()), *kept]
    meta = {FINGERPRINT_KEY: json.dumps(spec.fingerprint(), sort_keys=True)}
    if calibration is not None:
        meta[CALIBRATION_KEY] = json.dumps(calibration)
    return pa.schema(fields, metadata=meta)


def kept_fields(schema: pa.Schema) -> pa.Schema:
    """The kept source columns of a table's schema (empty for a table that keeps none)."""
    return pa.schema([f for f in schema if f.name not in BASE_COLUMNS and f.name != META_HASH])


def vectors_to_arrow(vectors: np.ndarray, typ: pa.DataType) -> pa.Array:
    """(n, d) numpy -> fixed_size_list array of the table's vector type."""
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=typ.value_type)
    return pa.FixedSizeListArray.from_arrays(flat, typ.list_size)


def embedding_columns(spec: ModelSpec, emb) -> dict[str, pa.Array]:
    """A window's outputs (model.outputs.Embeddings) as the table's vector column(s)."""
    if spec.output == "sparse":
        offsets = pa.array(emb.offsets, pa.int32())
        return {"sparse_indices": pa.ListArray.from_arrays(offsets, pa.array(emb.indices, pa.int32())),
                "sparse_values": pa.ListArray.from_arrays(offsets, pa.array(emb.values, pa.float32()))}
    typ = vector_type(spec)
    if spec.output == "multi-vector":
        tokens = vectors_to_arrow(emb.values, typ.value_type)
        return {"vector": pa.ListArray.from_arrays(pa.array(emb.offsets, pa.int32()), tokens, type=typ)}
    return {"vector": vectors_to_arrow(emb.values, typ)}


@dataclass
class CommitPlan:
    """What one run changes, committed as one Lance transaction."""

    run_id: str
    read_version: int | None  # None: the table does not exist yet
    overwrite: bool  # a new table or a fingerprint change: the new fragments ARE the table
    # the doc ids whose current rows the commit deletes, in Arrow arrays, re-readable (plan.diff.DeleteIds)
    delete_doc_ids: Iterable[pa.Array] = ()
    fragments: list = field(default_factory=list)  # lance FragmentMetadata written this run
    staged_ids: Callable[[], Iterable[pa.Array]] | None = None  # the staged doc ids, for the duplicate check


class DuplicateKeyError(RuntimeError):
    """The commit would store a (doc_id, chunk) twice; nothing was committed."""


class TableStore:
    """One table under one LanceDB URI."""

    def __init__(self, db: str, table: str, storage_options: dict | None = None):
        self.db = db.rstrip("/")
        self.table = check_table_name(table)
        if not is_remote(db) and os.path.isfile(local_path(db)):
            raise ConfigError(f"config error: output.db (--db): {db} is a file; give a folder (made if missing)")
        self.uri = join(self.db, f"{table}.lance")
        self.storage_options = storage_options
        self.staging = StagingLayout(self.db, table)
        self.reports_dir = join(self.db, f"{table}.reports")

    # ---- reading ------------------------------------------------------------------------
    def open(self, version: int | None = None):
        """The dataset, or None if the table does not exist yet."""
        import lance

        try:
            return lance.dataset(self.uri, version=version, storage_options=self.storage_options)
        except (ValueError, FileNotFoundError) as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower() or isinstance(e, FileNotFoundError):
                return None
            raise

    @staticmethod
    def fingerprint(ds) -> dict | None:
        meta = ds.schema.metadata or {}
        raw = meta.get(FINGERPRINT_KEY.encode())
        return json.loads(raw) if raw else None

    @staticmethod
    def calibration(ds) -> dict | None:
        raw = (ds.schema.metadata or {}).get(CALIBRATION_KEY.encode())
        return json.loads(raw) if raw else None

    def committed_run(self, ds, plan: CommitPlan) -> bool:
        """Whether `plan`'s run already made the version after the one it planned on.

        Read from the commit claims (lock.py), which no Lance operation rewrites, rather than
        from the table's transaction history (compaction's index remaps cannot be read back).
        """
        nxt = (plan.read_version or 0) + 1
        return ds.version >= nxt and claim_of(self.db, self.table, nxt, self.storage_options) == plan.run_id

    # ---- writing (workers) ----------------------------------------------------------------
    def write_fragments(self, table: pa.Table, schema: pa.Schema, max_rows_per_file: int,
                        overwrite: bool) -> list:
        """Data files for an uncommitted transaction; `overwrite` when they replace the table
        (new schema), so Lance does not check them against the current one."""
        from lance.fragment import write_fragments

        return write_fragments(
            table,
            self.uri,
            schema=schema,
            mode="overwrite" if overwrite else "append",
            max_rows_per_file=max_rows_per_file,
            storage_options=self.storage_options,
        )

    # ---- committing (driver) --------------------------------------------------------------
    def commit(self, plan: CommitPlan, schema: pa.Schema, lock=None):
        """Apply the plan as ONE transaction on top of `plan.read_version` exactly; returns the
        dataset. Raises FenceError (nothing committed) if the table moved or `lock` was lost."""
        import lance
        from lance.dataset import Transaction

        props = {RUN_ID_KEY: plan.run_id}
        ds = self.open()
        if ds is not None and self.committed_run(ds, plan):
            return ds  # this run already landed: committing again would double its rows
        # checked here for a clear message (Lance cannot even start a commit on a read version
        # that cleanup has removed since); the fence below is what makes it safe
        if lock is not None:
            lock.check()
        now = ds.version if ds is not None else 0
        if now != (plan.read_version or 0):
            raise moved(plan.read_version or 0, now)
        missing = self.missing_files(plan.fragments)
        if missing:
            raise FenceError(
                f"staged data of run {plan.run_id} is gone ({missing[0]}; was the table folder deleted?); "
                "its staging was dropped: run again"
            )
        fence = Fence(self.db, self.table, self.storage_options, lock, plan.read_version, plan.run_id)
        if plan.overwrite or ds is None:
            op = lance.LanceOperation.Overwrite(schema, plan.fragments)
        else:
            removed, updated = self._deletions(ds, plan.delete_doc_ids)
            self._check_unique(ds, plan)
            op = lance.LanceOperation.Update(
                removed_fragment_ids=removed, updated_fragments=updated, new_fragments=plan.fragments
            )
        tx = Transaction(plan.read_version or 0, op, uuid=str(uuid.uuid4()), transaction_properties=props)
        try:
            # max_retries=0: a lost race for the version is final, never retried on a newer one;
            # one Lance commit at a time per process: two threads committing with a Python commit
            # lock at once have hung inside Lance (a run commits once; racing runs are processes)
            with _IN_PROCESS:
                lance.LanceDataset.commit(self.uri, tx, storage_options=self.storage_options,
                                          commit_lock=fence, max_retries=0)
        except OSError:
            if fence.error is not None:
                raise fence.error from None
            raise
        return self.open()  # without the fence: it guards this one commit, not upkeep's

    def missing_files(self, fragments: list) -> list[str]:
        """Data files of staged fragments that no longer exist (at most a few, for the message)."""
        import pyarrow.fs as pafs

        paths = [join(self.uri, "data", f.path) for frag in fragments for f in frag.data_files()]
        if not paths:
            return []
        fs, _ = filesystem(self.uri, self.storage_options)
        infos = fs.get_file_info([filesystem(p, self.storage_options)[1] for p in paths])
        return [p for p, i in zip(paths, infos) if i.type == pafs.FileType.NotFound][:3]

    def _deletions(self, ds, doc_ids: Iterable[pa.Array]) -> tuple[list[int], list]:
        """Fragments to drop and fragments with new deletion files, for these doc ids (Arrow
        arrays such as `plan.diff.DeleteIds`): Lance finds their rows, no Python row loop."""
        from gpte_ray.store.deletions import fragment_deletions

        return fragment_deletions(ds, doc_ids)

    def _check_unique(self, ds, plan: CommitPlan) -> None:
        """Refuse a commit that would leave a document's old rows beside its staged ones."""
        from gpte_ray.store.deletions import kept_twice

        if plan.staged_ids is None:
            return
        dup = kept_twice(ds, plan.staged_ids(), plan.delete_doc_ids)
        if dup is not None:
            raise DuplicateKeyError(
                f"refusing to commit run {plan.run_id}: document {dup[0]!r} would be stored twice (its {dup[1]} "
                f"row(s) at version {ds.version} are kept and the run staged it again); nothing was committed, "
                "its staging was dropped: run again"
            )

    def report_uri(self, run_id: str) -> str:
        return join(self.reports_dir, f"{run_id}.html")

    def recent_reports(self, limit: int) -> list[dict]:
        """The last `limit` JSON run reports beside the table (newest by file time), oldest
        first; unreadable ones are skipped (a report is a record, never a reason to fail)."""
        import pyarrow.fs as pafs

        fs, path = filesystem(self.reports_dir, self.storage_options)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        infos = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")]
        infos.sort(key=lambda i: (i.mtime_ns or 0, i.base_name))
        out = []
        for info in infos[-limit:] if limit > 0 else []:
            try:
                with fs.open_input_stream(info.path) as f:
                    report = json.loads(f.read())
            except (OSError, ValueError):
                continue
            if isinstance(report, dict):
                out.append(report)
        return sorted(out, key=lambda r: str(r.get("started") or ""))

    def write_report(self, run_id: str, report_json: str, html: str) -> None:
        """The run report as JSON and as an HTML page beside the table."""
        uri = self.report_uri(run_id)
        fs, path = filesystem(uri, self.storage_options)
        ensure_dir(fs, path.rsplit("/", 1)[0])
        for suffix, body in ((".json", report_json), (".html", html)):
            with fs.open_output_stream(path.removesuffix(".html") + suffix) as f:
                f.write(body.encode())

    # ---- staging ------------------------------------------------------------------------
    def stale_staging(self, keep: str) -> list[str]:
        import pyarrow.fs as pafs

        fs, path = filesystem(self.staging.runs, self.storage_options)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [i.base_name for i in infos
                if i.type == pafs.FileType.Directory and i.base_name != keep and RUN_ID.match(i.base_name)]

    def drop_staging(self, run_id: str) -> None:
        # deletes only a run folder of THIS table's staging: never a path a name could steer
        if not RUN_ID.match(run_id):
            raise ValueError(f"refusing to delete staging {run_id!r}: not a run id")
        fs, path = filesystem(self.staging.run_dir(run_id), self.storage_options)
        _, root = filesystem(self.staging.runs, self.storage_options)
        if path.rsplit("/", 1)[0] != root or "/../" in path + "/" or "/./" in path + "/":
            raise ValueError(f"refusing to delete {path}: outside {root}")
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass
