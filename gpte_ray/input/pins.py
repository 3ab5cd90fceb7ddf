"""Shard pins: what a shard was when the scan read it, and reading exactly that again.

An exporter that re-publishes a corpus rewrites its shards while a run may be reading them.
The embed pass reads planned rows by position, so it must read the bytes the scan planned on:

- a pin is a shard's fingerprint in its store (local: size and mtime_ns; S3: ETag, and the
  version id on a versioned bucket) plus a digest of the rows the scan read from it;
- a pinned read of a local file checks the fingerprint before and after reading; on S3 every
  range GET asks for the pinned version, or carries If-Match with the pinned ETag;
- a shard that no longer matches raises ShardChangedError, naming it: nothing read from it is
  used, and the rerun plans afresh.

Rows are also matched by id and hash against the plan (run.stages.read_planned), and staged windows
record the pins of the shards they came from (resume.staged_state drops those whose pin moved).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.config import InputConfig
from gpte_ray.input.sources import ShardError, read_prepared
from gpte_ray.storage import (
    ensure_dir,
    filesystem,
    fsspec_fs,
    is_remote,
    join,
    local_path,
    read_numbered,
    s3_client,
    with_scheme,
)

__all__ = ["Pin", "ShardChangedError", "check_pin", "open_pinned", "pin_of", "read_pinned", "read_pins",
           "same_fingerprint", "scan_pinned", "take_pin", "take_pins", "write_pin"]

# bytes per ranged GET of a pinned S3 read (Parquet row groups and JSONL streams alike)
S3_BLOCK = 8 << 20


class ShardChangedError(ShardError):
    """A shard's bytes changed under the run that planned on them; `uri` names it."""

    def __init__(self, message: str, uri: str = ""):
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):  # Ray ships it between processes: keep the uri
        return type(self), (str(self), self.uri)


def changed(uri: str, what: str) -> ShardChangedError:
    return ShardChangedError(
        f"input error: {uri}: the shard changed while this run read it ({what}); nothing was committed "
        "from this run: run again to plan on its new contents (or pass --skip-bad-shards to leave its "
        "documents as they are tonight)", uri)


@dataclass(frozen=True)
class Pin:
    """One shard as the scan read it."""

    uri: str
    size: int | None = None
    mtime_ns: int | None = None  # local files
    etag: str | None = None  # object stores
    version_id: str | None = None  # versioned buckets
    rows: str = ""  # digest of (row, doc_id, content_hash, meta_hash) of every row the scan read

    def store_part(self) -> tuple:
        return self.size, self.mtime_ns, self.etag, self.version_id

    def with_rows(self, digest: str) -> Pin:
        return Pin(self.uri, self.size, self.mtime_ns, self.etag, self.version_id, digest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Pin:
        return Pin(**json.loads(text))


def take_pin(uri: str, storage_options: dict | None) -> Pin:
    """The shard's fingerprint in its store now (rows digest empty)."""
    if not is_remote(uri):
        try:
            st = os.stat(local_path(uri))
        except OSError as e:
            raise ShardError(f"input error: {uri}: unreadable ({e.strerror or e})") from None
        return Pin(uri, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            head = s3_client(uri, storage_options).head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            raise ShardError(f"input error: {uri}: unreadable ({e.response.get('Error', {}).get('Code', e)})") from None
        return Pin(uri, size=head.get("ContentLength"), etag=head.get("ETag"), version_id=head.get("VersionId"))
    fs, path = fsspec_fs(uri, storage_options)
    try:
        return pin_of(uri, fs.info(path))
    except OSError as e:  # FileNotFoundError too
        raise ShardError(f"input error: {uri}: unreadable ({e})") from None


def pin_of(uri: str, info: dict) -> Pin:
    """A fingerprint from an fsspec listing entry or `info` (s3fs, gcsfs, adlfs, the HF hub,
    memory): size, the ETag or content hash the store keeps, and the modification time."""
    etag = next((info[k] for k in ("ETag", "etag", "md5Hash", "blob_id", "content_md5") if info.get(k)), None)
    version = info.get("VersionId") or info.get("version_id")
    if uri.startswith("s3://"):  # as a HEAD gives it (take_pin): ETag, size, version id
        return Pin(uri, size=info.get("size"), etag=etag, version_id=version)
    stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "created") if info.get(k)),
                 None)
    return Pin(uri, size=info.get("size"), mtime_ns=_ns(stamp), etag=etag, version_id=version)


def _ns(stamp) -> int | None:
    """A listing's time (datetime, ISO text or seconds) in nanoseconds."""
    from datetime import datetime

    if stamp is None:
        return None
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, datetime):
        return int(stamp.timestamp() * 1e6) * 1000
    return int(float(stamp) * 1e6) * 1000


def same_fingerprint(a: Pin, b: Pin) -> bool:
    """Whether two pins name the same bytes in the store (rows digests aside). A version id
    counts where both know it: a listing may give the ETag without it."""
    versions_agree = a.version_id == b.version_id or a.version_id is None or b.version_id is None
    return a.uri == b.uri and (a.size, a.mtime_ns, a.etag) == (b.size, b.mtime_ns, b.etag) and versions_agree


def take_pins(uris: list[str], storage_options: dict | None) -> list[Pin]:
    """Each shard's fingerprint now (rows digests empty), without reading it: a stat per local
    file; for object stores one fsspec listing per folder (a page of a thousand objects per
    request on S3). A shard that cannot be fingerprinted gets an empty pin (it is read, and the
    scan says why)."""
    listed: dict[str, Pin] = {}
    remote = sorted({u.rsplit("/", 1)[0] for u in uris if is_remote(u)})
    for folder in remote:
        fs, path = fsspec_fs(folder, storage_options)
        try:
            entries = fs.ls(path, detail=True)
        except OSError:
            continue
        for info in entries:
            uri = with_scheme(folder, info["name"])
            listed[uri] = pin_of(uri, info)
    return [listed.get(u) or _pin_or_empty(u, storage_options) for u in uris]


def _pin_or_empty(uri: str, storage_options: dict | None) -> Pin:
    try:
        return take_pin(uri, storage_options)
    except ShardError:
        return Pin(uri)


def check_pin(pin: Pin, storage_options: dict | None) -> None:
    """Raise ShardChangedError unless the shard's fingerprint is still the pinned one."""
    try:
        now = take_pin(pin.uri, storage_options)
    except ShardError:
        raise changed(pin.uri, "it can no longer be read") from None
    if now.store_part() != pin.store_part():
        raise changed(pin.uri, _what(pin, now))


def _what(pin: Pin, now: Pin) -> str:
    if pin.etag is not None:
        return f"ETag {pin.etag} is now {now.etag}"
    return f"size {pin.size}, mtime_ns {pin.mtime_ns} are now {now.size}, {now.mtime_ns}"


@contextmanager
def open_pinned(pin: Pin, storage_options: dict | None):
    """A seekable binary file of exactly the pinned bytes: on S3 every GET asks for them; a local
    file's fingerprint is checked before it is opened and again once it was read whole."""
    if pin.uri.startswith("s3://"):
        with io.BufferedReader(_PinnedObject(pin, storage_options), buffer_size=S3_BLOCK) as f:
            yield f
        return
    check_pin(pin, storage_options)
    fs, path = filesystem(pin.uri, storage_options)
    with fs.open_input_file(path) as f:
        yield f
    check_pin(pin, storage_options)  # not reached when the reader stopped early or failed


class _PinnedObject(io.RawIOBase):
    """An S3 object read by range GETs, each one of the pinned version (or ETag): an object
    overwritten in between is never mixed into what is read, it raises ShardChangedError."""

    def __init__(self, pin: Pin, storage_options: dict | None):
        self.pin = pin
        self.client = s3_client(pin.uri, storage_options)
        self.bucket, _, self.key = pin.uri.removeprefix("s3://").partition("/")
        self.size = pin.size or 0
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        from botocore.exceptions import ClientError

        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={self.pos}-{self.pos + n - 1}"}
        if self.pin.version_id:
            kwargs["VersionId"] = self.pin.version_id  # the very bytes the scan read, even if overwritten since
        else:
            kwargs["IfMatch"] = self.pin.etag
        try:
            body = self.client.get_object(**kwargs)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "NoSuchKey", "NoSuchVersion", "404"):
                raise changed(self.pin.uri, f"ETag {self.pin.etag} no longer matches ({code})") from None
            raise
        buffer[: len(body)] = body
        self.pos += len(body)
        return len(body)


# ---- reading a pinned shard ----------------------------------------------------------------
def read_pinned(pin: Pin, shard: int, cfg: InputConfig, plan: pa.Table, kept_schema: pa.Schema | None = None,
                batch_rows: int = 4096) -> Iterator[pa.Table]:
    """The planned rows of a pinned shard (`plan`: row, doc_id, content_hash, meta_hash), each
    matched by id and hashes against the plan before it is yielded; ShardChangedError on any
    difference, on a planned row that is gone, or on a fingerprint that moved while reading."""
    rows = set(plan["row"].to_pylist())
    seen = 0
    with open_pinned(pin, cfg.storage_options) as f:
        for t in read_prepared(pin.uri, shard, cfg, rows=rows, batch_rows=batch_rows, kept_schema=kept_schema,
                               file=f):
            _match(pin.uri, t, plan)
            seen += t.num_rows
            yield t
    if seen != len(rows):
        raise changed(pin.uri, f"{len(rows) - seen} of the {len(rows)} planned rows are gone")


def _match(uri: str, got: pa.Table, plan: pa.Table) -> None:
    """Every row read is the planned document with the planned hashes (rows are matched by id,
    never by position alone)."""
    want = plan.take(pc.index_in(got["row"], value_set=plan["row"]))
    same = pc.and_(
        pc.and_(pc.fill_null(pc.equal(got["doc_id"], want["doc_id"]), False),
                pc.fill_null(pc.equal(got["content_hash"], want["content_hash"]), False)),
        pc.equal(pc.fill_null(got["meta_hash"], ""), pc.fill_null(want["meta_hash"], "")))
    if pc.all(same).as_py():
        return
    i = pc.index(same, False).as_py()
    row, planned, found = got["row"][i].as_py(), want["doc_id"][i].as_py(), got["doc_id"][i].as_py()
    what = f"row {row} was {planned!r} when planned, is now {found!r}" if planned != found else \
        f"row {row} ({found!r}) has other contents than when planned"
    raise changed(uri, what)


def scan_pinned(uri: str, shard: int, cfg: InputConfig, attempts: int = 3) -> tuple[Pin, list[pa.Table]]:
    """(the shard's pin, all its prepared rows), read whole under one pin; a shard
    rewritten during the read is read again, up to `attempts` times."""
    for attempt in range(attempts):
        pin = take_pin(uri, cfg.storage_options)
        digest = hashlib.sha256()
        tables = []
        try:
            with open_pinned(pin, cfg.storage_options) as f:
                for t in read_prepared(uri, shard, cfg, file=f):
                    tables.append(t)
                    digest.update(_rows_bytes(t))
        except ShardChangedError:
            if attempt == attempts - 1:
                raise
            continue
        return pin.with_rows(digest.hexdigest()[:32]), tables
    raise AssertionError("unreachable")


def _rows_bytes(t: pa.Table) -> bytes:
    """What identifies the rows read: position, id, hashes and reason, one line each."""
    fields = [pc.cast(t["row"], pa.string())] + [pc.fill_null(t[c], "") for c in
                                                 ("doc_id", "content_hash", "meta_hash", "reason")]
    lines = pc.binary_join_element_wise(*fields, "\x1f")
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(lines)], pa.int32()),
                                                     lines.combine_chunks() if isinstance(lines, pa.ChunkedArray)
                                                     else lines), "\n")
    return (joined[0].as_py() or "").encode("utf-8", "surrogatepass") + b"\n"


# ---- the run's pins, one file per shard in its plan folder ----------------------------------
def write_pin(pins_dir: str, shard: int, pin: Pin, storage_options: dict | None) -> None:
    fs, path = filesystem(pins_dir, storage_options)
    ensure_dir(fs, path)
    with fs.open_output_stream(f"{path}/{shard:010d}.json") as f:
        f.write(pin.to_json().encode())


def read_pins(pins_dir: str, storage_options: dict | None) -> dict[int, Pin]:
    """Shard index -> its pin, for every shard the scan read whole."""
    return {k: Pin.from_json(v) for k, v in read_numbered(pins_dir, ".json", storage_options).items()}


def pins_dir(plan_dir: str) -> str:
    return join(plan_dir, "pins")
