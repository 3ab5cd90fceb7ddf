"""One committer per table: a lease that saves wasted work, and a fence that makes it safe.

The lease (`lease.json` in the table's staging folder) names the run that holds the table and
is refreshed while the run lives. A second run is refused with a message naming the holder; a
lease whose holder is gone (a dead pid on this host, or no heartbeat for `lease_s`) is taken
over, so a crashed run never blocks the next night. The heartbeat never overwrites a lease
that another run has taken: it notices the loss instead.

A lease alone is not a lock (a paused holder wakes up and carries on), so the commit itself is
fenced. `Fence` is handed to Lance as its commit lock: Lance calls it with the version it is
about to write, and the fence lets the commit through only if that version is exactly one
above the version the run planned against (so Lance never silently rebases this run over a
concurrent one), the lease is still this run's, and the run wins an exclusive claim on that
version number (an O_EXCL create on disk, a conditional PUT `If-None-Match: *` on S3). Two
runs can therefore never both commit on top of the same version, whatever the clocks, pauses
or network do. The claims also record which plan made each version, which no Lance operation
(compaction, index remaps, cleanup, tag pruning) can rewrite.

A claim blocks its version only while its maker might still write it: once the maker's commit
has ended (it leaves a `.done` file beside its claim) or its process is gone (same host), a
claim whose version is not in the table (its commit failed, or the table folder was deleted
since) is superseded at once; any other claim only after STALE_CLAIM_S.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

from gpte_ray.storage import ensure_dir, filesystem, is_remote, join, local_path, s3_client
from gpte_ray.store.staging import StagingLayout

__all__ = [
    "Fence",
    "FenceError",
    "LockLostError",
    "TableBusyError",
    "TableLock",
    "TableMovedError",
    "claim_of",
    "claimed_versions",
    "claims_uri",
    "moved",
]


class TableBusyError(RuntimeError):
    """Another run holds the table's lease."""


class FenceError(RuntimeError):
    """The commit was refused by the fence; nothing was committed."""


class LockLostError(FenceError):
    """This run's lease was taken over by another run (e.g. after a long pause)."""


class TableMovedError(FenceError):
    """The table changed since this run planned, or another run claimed the next version."""


def moved(planned: int, now: int) -> TableMovedError:
    return TableMovedError(
        f"the table changed while this run worked (planned on version {planned}, now at {now}); "
        "nothing was committed: run again"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claims_uri(db: str, table: str) -> str:
    return StagingLayout(db, table).commits


class TableLock:
    """The lease of one table (see the module docstring)."""

    def __init__(self, db: str, table: str, storage_options: dict | None, lease_s: float = 120.0,
                 settle_s: float = 0.5):
        self.uri = StagingLayout(db, table).lease
        self.table = table
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.remote = is_remote(self.uri)
        self.lease_s = lease_s
        self.settle_s = settle_s
        self.token = uuid.uuid4().hex
        self.run_id = "planning"
        self.lost_to: dict | None = None  # the lease that replaced ours, once the heartbeat sees it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        """The lease, or None if there is none. Other I/O errors propagate: an unreadable
        lease is not an absent one."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"run_id": "unknown (unreadable lease)", "heartbeat": 0}

    def _read_settled(self) -> dict | None:
        """`_read`, but an absent lease is read again before it counts: some object stores
        answer 404 for a moment while an object is being overwritten."""
        for _ in range(3):
            held = self._read()
            if held is not None:
                return held
            time.sleep(0.3)
        return None

    def _write(self) -> None:
        folder = self.path.rsplit("/", 1)[0]
        ensure_dir(self.fs, folder)
        body = json.dumps({"token": self.token, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time(), "lease_s": self.lease_s}).encode()
        if self.remote:  # an object PUT is atomic
            with self.fs.open_output_stream(self.path) as f:
                f.write(body)
            return
        tmp = f"{folder}/.lease-{self.token}.tmp"  # a reader never sees a half-written lease
        with self.fs.open_output_stream(tmp) as f:
            f.write(body)
        self.fs.move(tmp, self.path)

    def _holder_alive(self, held: dict) -> bool:
        # the holder beats every quarter of ITS lease: judged by that, not by this run's setting
        lease_s = max(self.lease_s, float(held.get("lease_s") or 0))
        if time.time() - held.get("heartbeat", 0) > lease_s:
            return False
        if held.get("host") == socket.gethostname():
            return _pid_alive(int(held.get("pid", 0)))
        return True

    @staticmethod
    def describe(held: dict) -> str:
        if "host" not in held:
            return str(held.get("run_id"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held.get("heartbeat", 0)))
        return f"run {held.get('run_id')} (host {held.get('host')}, pid {held.get('pid')}, heartbeat {since} UTC)"

    def acquire(self, run_id: str = "planning", meanwhile: Callable[[], None] | None = None) -> None:
        """Take the lease (labelled `run_id` until `relabel`), or raise TableBusyError.
        `meanwhile` runs between writing the lease and reading it back, in the settle wait (a
        run starts its cluster there); the lease is ours only if it still is after both."""
        self.run_id = run_id
        held = self._read()
        if held and held.get("token") != self.token and self._holder_alive(held):
            raise TableBusyError(
                f"table {self.table!r} is being written by {self.describe(held)}; wait for it to finish"
            )
        self._write()
        settled = time.monotonic() + self.settle_s
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                self.release()  # ours, unless another run has taken it since: release checks
                raise
        time.sleep(max(0.0, settled - time.monotonic()))
        held = self._read()
        if not held or held.get("token") != self.token:
            raise TableBusyError(f"table {self.table!r}: another run took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def relabel(self, run_id: str) -> None:
        """Name the real run id in the lease (what a refused second run is told)."""
        self.run_id = run_id
        self.check()
        self._write()

    def check(self) -> None:
        """Raise LockLostError if another run has taken the lease (or removed it)."""
        held = self._read_settled()
        if self.lost_to is None and (not held or held.get("token") != self.token):
            self.lost_to = held or {"run_id": "another run (it has released the table since)"}
        if self.lost_to is not None:
            raise LockLostError(
                f"table {self.table!r}: this run lost its lock to {self.describe(self.lost_to)} "
                "(paused past the lease?); nothing was committed"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                held = self._read_settled()
                if held is None or held.get("token") != self.token:
                    # taken over, or released by the run that took it over: never write again
                    self.lost_to = held or {"run_id": "another run (it has released the table since)"}
                    return
                self._write()
            except OSError:
                continue  # a failed beat is retried at the next one; the lease has slack

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.fs.delete_file(self.path)
        except OSError:
            pass  # a lease left behind expires after lease_s

    def __enter__(self) -> TableLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Fence:
    """Lance commit lock for ONE commit of one run: see the module docstring.

    Lance reports an exception raised here as a generic commit error, so the reason is kept
    in `error` for the caller to raise instead.
    """

    def __init__(self, db: str, table: str, storage_options: dict | None, lock: TableLock | None,
                 read_version: int | None, run_id: str):
        self.uri = claims_uri(db, table)
        self.table_uri = join(db.rstrip("/"), f"{table}.lance")
        self.options = storage_options
        self.lock = lock
        self.expected = (read_version or 0) + 1
        self.run_id = run_id  # the plan's id: a run that took over the same work shares it
        self.token = lock.token if lock is not None else uuid.uuid4().hex
        self.error: FenceError | None = None

    @contextlib.contextmanager
    def __call__(self, version: int):
        try:
            if self.lock is not None:
                self.lock.check()
            if version != self.expected:
                raise moved(self.expected - 1, version - 1)
            claim = self._claim(version)
        except FenceError as e:
            self.error = e
            raise
        try:
            yield
        finally:  # Lance has written the version, or never will from this commit
            _mark_done(claim, self.options)

    def _claim(self, version: int) -> str:
        """Claim `version`; returns the claim's uri. A claim whose maker can no longer write its
        version is superseded by the next attempt number, itself taken exclusively, so two runs
        taking over at once still cannot both win."""
        body = {"run_id": self.run_id, "run": self.lock.run_id if self.lock is not None else None,
                "token": self.token, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        for attempt in range(1000):
            uri = join(self.uri, f"{version:020d}.{attempt}.json")
            if create_exclusive(uri, json.dumps(body).encode(), self.options):
                return uri
            held = _read_claim(uri, self.options)
            if held is _MISSING:  # deleted between the create and the read: never by this job
                raise TableMovedError(f"the claim on version {version} of this table vanished; nothing was "
                                      "committed: run again")
            if held is not None and held.get("run_id") == self.run_id:
                return uri  # this run's own claim (a retried commit of the same work)
            if _ended(uri, held, self.options) and not _has_version(self.table_uri, version, self.options):
                continue  # its commit failed, or its table folder was deleted since
            # a claim that cannot be read (being written, or the store failed to answer) is not
            # a stale one: its age then comes from the store's own time for the file
            age = time.time() - held.get("time", 0) if held is not None else _age(uri, self.options)
            if age is None or age < STALE_CLAIM_S:
                who = (held.get("run") or held.get("run_id")) if held is not None else \
                    "unknown: its claim cannot be read yet"
                raise TableMovedError(
                    f"another run ({who}) is committing version {version} of this table; "
                    "nothing was committed: run again"
                )
        raise TableMovedError(f"version {version} of this table has too many stale claims")


STALE_CLAIM_S = 600.0
_CLAIM = re.compile(r"^(\d{20})\.(\d+)\.json$")


_MISSING = object()


def _read_claim(uri: str, storage_options: dict | None, tries: int = 3):
    """A claim's body; _MISSING if there is none; None if it exists but cannot be read (empty
    while its creator writes it, or a failed read), after `tries` attempts."""
    fs, path = filesystem(uri, storage_options)
    for i in range(tries):
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return _MISSING
        except (OSError, ValueError):
            if i + 1 < tries:
                time.sleep(0.2 * (i + 1))
    return None


def _mark_done(claim: str, storage_options: dict | None) -> None:
    """Say beside a claim that its commit has ended (best effort: without it, the claim is
    judged by its maker's process, then by its age)."""
    try:
        create_exclusive(claim.removesuffix(".json") + ".done", json.dumps({"time": time.time()}).encode(),
                         storage_options)
    except Exception:  # noqa: BLE001 - the commit's own outcome matters, not this note
        pass


def _ended(claim: str, held: dict | None, storage_options: dict | None) -> bool:
    """Whether a claim's maker can no longer write its version: its commit ended (a `.done`
    beside the claim), or its process is gone (a dead pid on this host)."""
    if _read_claim(claim.removesuffix(".json") + ".done", storage_options) is not _MISSING:
        return True
    if held is None or held.get("host") != socket.gethostname() or not held.get("pid"):
        return False
    return not _pid_alive(int(held["pid"]))


_U64_MAX = 2**64 - 1


def _has_version(table_uri: str, version: int, storage_options: dict | None) -> bool:
    """Whether the table holds `version`'s manifest (True when it cannot tell: then the claim
    blocks). Read from the file listing: Lance cannot be called back from inside its commit."""
    import pyarrow.fs as pafs

    fs, path = filesystem(join(table_uri, "_versions"), storage_options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return True
    for info in infos:
        stem = info.base_name.removesuffix(".manifest")
        if stem.isdigit() and info.base_name.endswith(".manifest"):
            n = int(stem)  # Lance's V2 names count down from u64::MAX; legacy names are the version
            if (_U64_MAX - n if n > _U64_MAX // 2 else n) == version:
                return True
    return False


def _age(uri: str, storage_options: dict | None) -> float | None:
    """Seconds since the store last wrote `uri`, or None if it cannot say."""
    fs, path = filesystem(uri, storage_options)
    try:
        mtime = fs.get_file_info(path).mtime
    except OSError:
        return None
    return None if mtime is None else time.time() - mtime.timestamp()


def create_exclusive(uri: str, body: bytes, storage_options: dict | None) -> bool:
    """Create `uri` with `body` unless it exists; True if this call created it. Atomic."""
    if not is_remote(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return True
    return _s3_create_exclusive(uri, body, storage_options)


def _s3_create_exclusive(uri: str, body: bytes, storage_options: dict | None) -> bool:
    """S3 conditional create (PUT with If-None-Match: *): 412 means someone else holds it."""
    from botocore.exceptions import ClientError

    client = s3_client(uri, storage_options)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise
    return True


def claimed_versions(db: str, table: str, storage_options: dict | None) -> dict[int, str]:
    """version -> run id, for every version this job committed (the last claim of each wins)."""
    import pyarrow.fs as pafs

    uri = claims_uri(db, table)
    fs, path = filesystem(uri, storage_options)
    latest: dict[int, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        m = _CLAIM.match(info.base_name)
        if m and info.is_file:
            v, attempt = int(m.group(1)), int(m.group(2))
            latest[v] = max(latest.get(v, -1), attempt)
    out = {}
    for v, attempt in latest.items():
        claim = _read_claim(join(uri, f"{v:020d}.{attempt}.json"), storage_options)
        if isinstance(claim, dict):
            out[v] = claim.get("run_id", "")
    return out


def claim_of(db: str, table: str, version: int, storage_options: dict | None) -> str | None:
    """The run id that claimed `version` (its last claim), or None (none, or the last one
    cannot be read: never an earlier claim's run in its place)."""
    uri = claims_uri(db, table)
    found = None
    for attempt in range(1000):
        claim = _read_claim(join(uri, f"{version:020d}.{attempt}.json"), storage_options)
        if claim is _MISSING:
            return found
        found = claim.get("run_id") if claim is not None else None
    return found
