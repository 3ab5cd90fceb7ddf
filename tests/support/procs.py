"""Stop a process session we started, every process of it, by pid."""

from __future__ import annotations

import os
import signal
import time


def session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of session `sid`."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except (OSError, IndexError):
            continue
        out.add(pid)
    return out


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of session `sid` (one started with start_new_session=True, whose
    leader's pid is `sid`) and wait until none is left. Killing the group alone is not enough:
    Ray puts each worker in its own process group, and a killed driver's embed actor goes on
    staging windows for a second or two."""
    deadline = time.time() + timeout
    while pids := session_pids(sid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise TimeoutError(f"processes {sorted(pids)} of session {sid} outlived SIGKILL")
        time.sleep(0.2)
