"""The shard manifest: each shard's fingerprint and what the table holds from it, bound to the
version of the table it describes.

Layout under the table's staging folder (`<db>/_gpte_staging/<table>/`):

  shards/<key>.parquet     one shard as a scan read it (SHARD_ROWS_SCHEMA: row, doc_id, hashes,
                           reason), named by its pin, so a shard that did not change keeps its
                           file from night to night
  manifests/<name>.parquet one row per shard (MANIFEST_SCHEMA: uri, pin, rows file, counts),
                           the corpus-wide counts in the schema metadata

A manifest is written before the commit it describes and is believed only for that commit:

- `<version>-c-<plan id>`: written by the run that commits `version` (the version after the
  one it planned on; its fence admits no other). It counts only if the commit claim of that
  version (store.lock: one exclusive claim per version) names the same plan id, so a run that
  crashed or lost the race before its commit leaves a file nobody believes.
- `<version>-r-<time>-<plan id of the last commit>`: written by a run that found nothing to
  commit: the table at `version` still holds what its last commit wrote, and these are the
  shards' fingerprints now. It counts while that commit is still the table's last one.

Versions after the last commit come from upkeep (compaction, indexes, cleanup), which change
no document, so the manifest of the last commit describes the table at its current version.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

import pyarrow as pa

from gpte_ray.storage import ensure_dir, filesystem, join
from gpte_ray.store.lock import claimed_versions

__all__ = [
    "MANIFEST_SCHEMA", "NO_COMMIT", "SHARD_ROWS_SCHEMA", "Manifest", "ManifestLayout", "believed", "commit_name",
    "find_in_shards", "last_commit", "load_manifest", "prune", "read_shard_rows", "refresh_name", "rows_key",
    "publish_rows", "write_manifest", "write_shard_rows",
]

MANIFEST_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("pin", pa.string()),  # input.pins.Pin JSON of the scan that read the shard (with its rows digest)
    ("rows_key", pa.string()),  # its rows file under shards/
    ("rows", pa.int64()),  # rows the scan read (quarantined ones included)
    ("bad", pa.int64()),  # of which rows with a reason (bad id or text)
])
# one shard as a scan read it (run.stages.SCAN_SCHEMA without the shard's position in the run)
SHARD_ROWS_SCHEMA = pa.schema([("row", pa.int64()), ("doc_id", pa.string()), ("content_hash", pa.string()),
                               ("reason", pa.string()), ("meta_hash", pa.string())])
_META = b"gpte_ray.manifest"
_NAME = re.compile(r"^(\d{20})-(?:c|r-(\d{20}))-([0-9a-f]{16})\.parquet$")
NO_COMMIT = "0" * 16  # the base of a refresh of a table with no commit claims
# rows files no manifest names are deleted after this long: a run in flight may still need its own
ORPHAN_TTL_S = 24 * 3600.0


@dataclass
class Manifest:
    """One table version's shards, and the corpus-wide counts the next run carries over."""

    entries: pa.Table  # MANIFEST_SCHEMA
    docs: int  # distinct documents of the corpus (new + changed + unchanged + metadata_updated)
    since_full: int  # runs since the last one that read every shard (0: this one did)
    input_key: str  # the input settings the rows were read with (ids, text, template, kept columns)
    name: str = ""

    def by_uri(self) -> dict[str, dict]:
        return {r["uri"]: r for r in self.entries.to_pylist()}


class ManifestLayout:
    """The manifest paths of one table (beside its other staging)."""

    def __init__(self, staging_root: str):
        self.manifests = join(staging_root, "manifests")
        self.shards = join(staging_root, "shards")

    def rows_file(self, key: str) -> str:
        return join(self.shards, f"{key}.parquet")


def rows_key(pin_json: str) -> str:
    """A shard's rows file name: fixed by its pin (uri, fingerprint, rows digest)."""
    return hashlib.sha256(pin_json.encode()).hexdigest()[:32]


def commit_name(version: int, plan_id: str) -> str:
    return f"{version:020d}-c-{plan_id}.parquet"


def refresh_name(version: int, base_plan_id: str) -> str:
    return f"{version:020d}-r-{time.time_ns():020d}-{base_plan_id}.parquet"


def write_shard_rows(uri: str, rows: pa.Table, storage_options: dict | None) -> None:
    """One shard's scan rows (SHARD_ROWS_SCHEMA) as the Parquet file `uri`."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage_options)
    ensure_dir(fs, path.rsplit("/", 1)[0])
    pq.write_table(rows.select(SHARD_ROWS_SCHEMA.names).cast(SHARD_ROWS_SCHEMA), path, filesystem=fs)


def publish_rows(layout: ManifestLayout, staged: dict[str, str], storage_options: dict | None) -> None:
    """Copy rows files a scan left in its plan folder (rows key -> their uri) to shards/, those
    not there already (a shard unchanged since keeps its file)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs, root = filesystem(layout.shards, storage_options)
    ensure_dir(fs, root)
    have = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    todo = [(filesystem(src, storage_options)[1], f"{root}/{key}.parquet") for key, src in staged.items()
            if f"{key}.parquet" not in have]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda pair: fs.copy_file(*pair), todo))


def read_shard_rows(layout: ManifestLayout, keys: list[str], storage_options: dict | None,
                    ids: pa.Array | None = None) -> list[pa.Table]:
    """The rows files of `keys`, in that order (only rows whose doc_id is in `ids`, when given)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs, _ = filesystem(layout.shards, storage_options)
    out = []
    for key in keys:
        path = filesystem(layout.rows_file(key), storage_options)[1]
        if ids is None:
            out.append(pq.read_table(path, filesystem=fs))
        else:
            ds = pads.dataset(path, format="parquet", filesystem=fs)
            out.append(ds.to_table(filter=pads.field("doc_id").isin(ids)))
    return out


def find_in_shards(layout: ManifestLayout, keys: list[str], storage_options: dict | None,
                   ids: pa.Array) -> tuple[pa.Table, pa.Array]:
    """The rows of the rows files `keys` whose doc_id is in `ids`, scanned as one dataset (in
    threads), and the position in `keys` of the file each row came from."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not keys:
        return SHARD_ROWS_SCHEMA.empty_table(), pa.array([], pa.int64())
    fs, _ = filesystem(layout.shards, storage_options)
    paths = [filesystem(layout.rows_file(k), storage_options)[1] for k in keys]
    found = pads.dataset(paths, format="parquet", filesystem=fs, schema=SHARD_ROWS_SCHEMA).to_table(
        columns=[*SHARD_ROWS_SCHEMA.names, "__filename"], filter=pads.field("doc_id").isin(ids))
    position = pc.index_in(found["__filename"], value_set=pa.array(paths))
    return found.drop_columns(["__filename"]), pc.cast(position, pa.int64())


def write_manifest(layout: ManifestLayout, name: str, manifest: Manifest, storage_options: dict | None) -> None:
    """The manifest as manifests/<name> (atomic per file on every store this job writes to)."""
    import pyarrow.parquet as pq

    meta = {"docs": manifest.docs, "since_full": manifest.since_full, "input_key": manifest.input_key}
    table = manifest.entries.cast(MANIFEST_SCHEMA).replace_schema_metadata({_META: json.dumps(meta).encode()})
    fs, path = filesystem(join(layout.manifests, name), storage_options)
    ensure_dir(fs, path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)


def _read(layout: ManifestLayout, name: str, storage_options: dict | None) -> Manifest:
    import pyarrow.parquet as pq

    fs, path = filesystem(join(layout.manifests, name), storage_options)
    table = pq.read_table(path, filesystem=fs)
    meta = json.loads(table.schema.metadata[_META])
    return Manifest(table.replace_schema_metadata(None), docs=meta["docs"], since_full=meta["since_full"],
                    input_key=meta["input_key"], name=name)


def _names(layout: ManifestLayout, storage_options: dict | None) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = filesystem(layout.manifests, storage_options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.is_file and _NAME.match(i.base_name))


def believed(names: list[str], claims: dict[int, str], version: int) -> str | None:
    """The manifest that describes the table at `version`, given the commit claims (version ->
    plan id): the last commit's own, or a later refresh of it; None if there is none. (A table
    whose commits left no claims, written before they existed, is described by refreshes only.)"""
    last = max((v for v in claims if v <= version), default=None)
    last_plan = claims[last] if last is not None else NO_COMMIT
    best, best_key = None, None
    for name in names:
        v, stamp, plan = _NAME.match(name).groups()
        v = int(v)
        if v > version or plan != last_plan:
            continue
        if stamp is None and v != last:  # a commit manifest counts for its own commit only
            continue
        if stamp is not None and v < (last or 0):
            continue
        key = (v, int(stamp or -1))
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best


def last_commit(db: str, table: str, version: int, storage_options: dict | None) -> str:
    """The plan id of the last commit at or before `version` (from the commit claims), or
    NO_COMMIT for a table whose commits left none."""
    claims = claimed_versions(db, table, storage_options)
    last = max((v for v in claims if v <= version), default=None)
    return claims[last] if last is not None else NO_COMMIT


def load_manifest(db: str, table: str, layout: ManifestLayout, version: int | None,
                  storage_options: dict | None) -> Manifest | None:
    """The manifest believed for the table at `version` (None: no table, or none is)."""
    if version is None:
        return None
    name = believed(_names(layout, storage_options), claimed_versions(db, table, storage_options), version)
    if name is None:
        return None
    try:
        return _read(layout, name, storage_options)
    except (OSError, KeyError, ValueError):  # unreadable: the run reads every shard instead
        return None


def prune(layout: ManifestLayout, keep: Manifest, storage_options: dict | None) -> None:
    """Delete the manifests older than `keep` (the one a run believed) and the rows files that
    no manifest left names, once they are a day old (a run in flight may be writing its own)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(layout.manifests, storage_options)
    names = _names(layout, storage_options)
    kept = [n for n in names if n >= keep.name]
    for n in names:
        if n < keep.name:
            fs.delete_file(f"{root}/{n}")
    named: set[str] = set()
    for n in kept:
        try:
            named.update(_read(layout, n, storage_options).entries["rows_key"].to_pylist())
        except (OSError, KeyError, ValueError):
            return  # a manifest being written: leave every rows file for now
    sfs, shards = filesystem(layout.shards, storage_options)
    now = time.time()
    for info in sfs.get_file_info(pafs.FileSelector(shards, allow_not_found=True)):
        key = info.base_name.removesuffix(".parquet")
        if info.is_file and key not in named and info.mtime is not None and now - info.mtime.timestamp() > ORPHAN_TTL_S:
            sfs.delete_file(info.path)
