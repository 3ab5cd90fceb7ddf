"""Private Ray heads for the slow tests, started and stopped without touching anyone else's Ray.

`ray stop` (and `ray stop --force`, which AutoscalingCluster runs) kills every Ray process on
the machine, other test sessions' and other users' included. A `LocalHead` instead starts its
head with its own short --temp-dir and its own free ports, and on stop terminates exactly the
processes whose command line names that temp dir or its GCS port, plus their descendants
(workers and agents rename themselves `ray::...`, so they are found through their parents).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


_ISSUED: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this process (the OS may offer a just-closed port
    again, and Ray refuses two components on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ISSUED:
            _ISSUED.add(port)
            return port


def ray_env(**extra: str) -> dict:
    """The environment for everything the tests start: auth explicitly off, never attach to a
    stray cluster, the venv's `ray` first on PATH."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def require_job_submission() -> None:
    """`ray job submit` and the dashboard need ray[default] (aiohttp_cors, grpcio, ...)."""
    missing = []
    for mod in ("aiohttp", "aiohttp_cors", "grpc", "prometheus_client", "opencensus"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        pytest.skip(f"job submission needs ray[default] (missing: {', '.join(missing)})")


def _has_ray_client() -> bool:
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for this user's processes, from /proc."""
    out, uid = {}, os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def processes_of(pattern: str) -> set[int]:
    """Processes whose command line matches the regex `pattern`, and all their descendants."""
    table = _proc_table()
    me = os.getpid()
    rx = re.compile(pattern)
    roots = {pid for pid, (_, cmd) in table.items() if pid != me and rx.search(cmd)}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    found.discard(me)
    return found


def terminate(pids: set[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + (grace if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        if state == b"Z":  # a zombie child of ours: reap it
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            return False
        return True
    except (OSError, IndexError):
        return False


class LocalHead:
    """`ray start --head` with its own ports and temp dir; `stop()` ends only what it started."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = True, autoscaling_config: str | None = None,
                 env: dict | None = None, extra_args: list[str] | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.env = ray_env(**(env or {}))
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.args = [
            str(BIN / "ray"), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}", f"--include-dashboard={'true' if dashboard else 'false'}",
            # the dashboard agent's HTTP port is a fixed 52365 by default: a second Ray on the machine
            # (any ray.init) holding it leaves this head without a job agent ("No available agent")
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        if _has_ray_client():  # without ray[client] (grpcio) `ray start` refuses this flag
            self.args.append(f"--ray-client-server-port={self.client_port}")
        if autoscaling_config:
            self.args.append(f"--autoscaling-config={autoscaling_config}")
        self.args += extra_args or []
        self.log = ""

    def start(self, timeout: float = 180) -> LocalHead:
        try:
            out = subprocess.run(self.args, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self.log = out.stdout + out.stderr
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{self.log[-3000:]}")
        return self

    def pids(self) -> set[int]:
        # the temp dir, or an address with the GCS port (the client server names only that)
        return processes_of(rf"{re.escape(self.temp_dir)}|:{self.port}(\s|$)")

    def stop(self, keep_temp: bool = False) -> None:
        terminate(self.pids())
        if not keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def ray(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a `ray ...` CLI command against this head."""
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def job_submit(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """`ray job submit --address <dashboard> ARGS`, retried while the head's job agent is not
        registered yet (`ray start` returns before it is; the job is not created then)."""
        deadline = time.time() + 120
        while True:
            out = self.ray("job", "submit", "--address", self.dashboard_url, *args, timeout=timeout)
            if "No available agent to submit job" not in out.stdout + out.stderr:
                return out
            if time.time() > deadline:
                out.stderr += "\n--- dashboard_agent.log ---\n" + self.log_tail("dashboard_agent.log")
                return out
            time.sleep(2)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = Path(self.temp_dir) / "session_latest" / "logs" / name
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"({path}: {e.strerror})"


def copy_checkout(dest: Path, excludes: list[str] = ()) -> Path:
    """The checkout as `ray up`'s rsync or a user's clone has it: tracked and untracked files,
    less what .gitignore (or `excludes`) leaves out."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        if any(Path(rel).match(x) or x in Path(rel).parts for x in excludes) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout[-2000:]}")
