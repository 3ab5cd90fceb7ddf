"""One committer per table: a lease file beside the table, refreshed while the run lives.

A second run on the same table is refused with a message naming the holder. A lease whose
holder is gone (a dead pid on this host, or no heartbeat for `lease_s`) is taken over, so a
crashed run never blocks the next night. Object stores have no atomic create here, so the
writer re-reads the lease after a pause to detect a race (the loser backs off).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from gpte_ray.storage import ensure_dir, filesystem, join

__all__ = ["TableBusyError", "TableLock"]


class TableBusyError(RuntimeError):
    """Another run holds the table's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TableLock:
    def __init__(self, db: str, table: str, storage_options: dict | None, lease_s: float = 120.0,
                 settle_s: float = 0.5):
        self.uri = join(db.rstrip("/"), "_gpte_staging", f"{table}.lock")
        self.table = table
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.lease_s = lease_s
        self.settle_s = settle_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _write(self, run_id: str) -> None:
        ensure_dir(self.fs, self.path.rsplit("/", 1)[0])
        body = {"token": self.token, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time()}
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(body).encode())

    def _holder_alive(self, held: dict) -> bool:
        if time.time() - held.get("heartbeat", 0) > self.lease_s:
            return False
        if held.get("host") == socket.gethostname():
            return _pid_alive(int(held.get("pid", 0)))
        return True

    def acquire(self, run_id: str) -> None:
        """Take the lease for `run_id` (a label shown to a refused second run), or raise."""
        held = self._read()
        if held and held.get("token") != self.token and self._holder_alive(held):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held.get("heartbeat", 0)))
            raise TableBusyError(
                f"table {self.table!r} is being written by run {held.get('run_id')} "
                f"(host {held.get('host')}, pid {held.get('pid')}, heartbeat {since} UTC); "
                "wait for it to finish"
            )
        self._write(run_id)
        time.sleep(self.settle_s)
        held = self._read()
        if not held or held.get("token") != self.token:
            raise TableBusyError(f"table {self.table!r}: another run took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, args=(run_id,), daemon=True)
        self._thread.start()

    def _beat(self, run_id: str) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self._write(run_id)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("token") == self.token:
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> TableLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
