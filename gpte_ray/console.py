"""The user's terminal: what gpte-ray says on it, and where everything else goes.

gpte-ray's own lines (progress, the run report, errors) go to `console()`. The CLI runs
quiet by default: `quiet()` points file descriptor 2 at a log file, so what Ray's C++ core,
Ray Data and the model libraries print on stderr lands there (Ray also keeps its own copies
in its session logs), while `console()` keeps the real terminal. `-v` leaves stderr alone.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
from typing import TextIO

__all__ = ["console", "end_line", "file_noise_log", "left_open", "noise_log", "noise_log_kept", "one_line", "quiet",
           "say", "unwrap"]

_console: TextIO | None = None
_noise_log: str | None = None
_open_line: TextIO | None = None  # a stream whose last line (a progress line) has no newline yet
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def console() -> TextIO:
    """The stream for gpte-ray's own messages: the terminal's stderr, even when quiet."""
    return _console or sys.stderr


def noise_log() -> str | None:
    """The file that holds the libraries' stderr of this process, when quiet."""
    return _noise_log


def noise_log_kept() -> str | None:
    """The noise log, if it will still be there after this process: it exists and is not empty
    (an empty one is removed at exit, so a path printed for it would lead nowhere)."""
    sys.stderr.flush()
    if _noise_log is not None and os.path.isfile(_noise_log) and os.path.getsize(_noise_log) > 0:
        return _noise_log
    return None


def left_open(stream: TextIO) -> None:
    """Record that `stream`'s last line (a progress line rewritten in place) has no newline yet."""
    global _open_line
    _open_line = stream


def end_line(stream: TextIO | None = None) -> None:
    """End a line left open (on `stream`, or any), so the next message starts a line of its own."""
    global _open_line
    if _open_line is not None and (stream is None or stream is _open_line):
        try:
            _open_line.write("\n")
            _open_line.flush()
        except (OSError, ValueError):  # closed meanwhile: nothing to end
            pass
        _open_line = None


def say(line: str) -> None:
    """One line of gpte-ray's own on the terminal (never inside a progress line)."""
    out = console()
    end_line(out)
    print(line, file=out, flush=True)


def quiet(command: str) -> None:
    """Silence library chatter for the rest of this process (the CLI's default).

    Python loggers of Ray and the model libraries drop to WARNING, progress bars of the
    Hugging Face libraries are off, and file descriptor 2 (where C++ and Python libraries
    write) goes to a log file; `console()` is a copy of the original stderr.
    """
    global _console, _noise_log
    if _console is not None:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("ray", "ray.data", "transformers", "sentence_transformers", "huggingface_hub", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.stderr.flush()
    original = os.dup(2)
    folder = os.path.join(tempfile.gettempdir(), "gpte-ray")
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{command}-{os.getpid()}-", suffix=".log", dir=folder)
    os.dup2(fd, 2)
    os.close(fd)
    _console = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
    _noise_log = path
    atexit.register(_drop_empty_log)


def file_noise_log() -> None:
    """Move the noise log into the running Ray session's log folder, beside Ray's own logs
    (call while Ray is up; later writes follow the file)."""
    global _noise_log
    ray = sys.modules.get("ray")
    if _noise_log is None or ray is None or not ray.is_initialized():
        return
    try:
        logs = ray._private.worker.global_worker.node.get_logs_dir_path()
        if os.path.dirname(_noise_log) == logs:
            return  # moved already: a path printed since must stay true
        target = os.path.join(logs, f"gpte-ray-{os.path.basename(_noise_log)}")
        os.replace(_noise_log, target)
    except Exception:  # noqa: BLE001 - a remote or odd session dir: the log stays in the temp folder
        return
    _noise_log = target


def _drop_empty_log() -> None:
    if _noise_log is not None and os.path.exists(_noise_log) and os.path.getsize(_noise_log) == 0:
        os.unlink(_noise_log)


def unwrap(e: BaseException) -> BaseException:
    """The failure itself inside Ray's wrappers: a task's exception is re-raised on the driver
    as a RayTaskError (with the remote traceback as its message) whose `cause` is the original."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or any(cur is s for s in seen):
            continue
        seen.append(cur)
        if not _is_ray_wrapper(cur):
            if type(cur).__name__ in _RAY_WRAPPERS:  # a wrapper whose cause came only as text
                line = next(filter(None, map(_remote_cause, seen)), None)
                return RemoteFailure(line) if line else cur
            return cur
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    return e


class RemoteFailure(RuntimeError):
    """A failure on the cluster that Ray hands back only as the text of its traceback."""


# the last line of a Python traceback: "package.module.SomeError: message"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")
_RAY_WRAPPERS = ("RayTaskError", "UserCodeException", "ActorDiedError", "RayActorError")


def _remote_cause(e: BaseException) -> str | None:
    """The failure inside a Ray wrapper that carries it only as text (an actor that died in its
    constructor, a UDF error): the last exception line of the remote traceback it quotes."""
    for line in reversed(_ANSI.sub("", str(e)).splitlines()):
        m = _EXCEPTION_LINE.match(line.strip())
        if m and not m.group(1).endswith(_RAY_WRAPPERS):
            name = m.group(1)
            return m.group(2) if name.startswith("gpte_ray.") else f"{name.rsplit('.', 1)[-1]}: {m.group(2)}"
    return None


def one_line(e: BaseException) -> str:
    """An error as one line: its first non-blank line without ANSI colour codes; gpte-ray's
    own errors as they are (written for the user), others prefixed by their type."""
    text = _ANSI.sub("", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if not lines or not type(e).__module__.startswith("gpte_ray."):
        msg = f"{type(e).__name__}: {msg}"
    return msg


def _is_ray_wrapper(e: BaseException) -> bool:
    """Ray's wrappers around a failure elsewhere (RayTaskError, Ray Data's UserCodeException)."""
    if any(c.__name__ == "RayTaskError" for c in type(e).__mro__):
        return True
    return type(e).__module__.startswith("ray.") and (e.__cause__ or getattr(e, "cause", None)) is not None
