"""Where a node finds the model: the driver ships a source, every node fetches it itself.

The driver plans from a model's small configuration files and ships a *source*, never a
folder of its own disk: the packaged default (pip-installed on every node), a hub id pinned
to the commit the driver resolved, an ``s3://`` folder, or a local folder that every node
mounts at the same path. It ships the weights hash it planned with too.

Each node materialises the source once, however many actors it runs: one process fetches
under a per-node file lock into a temporary folder and renames it into place; the others
wait on the lock and find the finished folder. Every process then checks the weights it got
against the planned hash, so a model changed underneath a run is one clear error, never a
table of mixed vectors.

The node-local cache is ``$GPTE_RAY_MODEL_CACHE`` (default ``~/.cache/gpte-ray/models``);
hub models go to the node's Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), which
``HF_HUB_OFFLINE=1`` reads without the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from gpte_ray.config import ConfigError

__all__ = [
    "PACKAGED",
    "cache_root",
    "folder_weights_hash",
    "materialize",
    "model_folder",
    "source_kind",
    "weights_hash",
]

PACKAGED = "packaged"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_MIB = 1 << 20

# per process: (source, revision, weights hash) -> verified local folder
_verified: dict[tuple[str, str | None, str], Path] = {}


def source_kind(source: str) -> str:
    """'packaged', 's3', 'local' (an absolute folder) or 'hub' (a repository id)."""
    if source == PACKAGED:
        return "packaged"
    if source.startswith("s3://"):
        return "s3"
    if os.path.isabs(source):
        return "local"
    return "hub"


def cache_root() -> Path:
    """This node's model cache (read when a node needs it, never at import)."""
    if os.environ.get("GPTE_RAY_MODEL_CACHE"):
        return Path(os.environ["GPTE_RAY_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpte-ray" / "models"


def is_weight_file(rel: str) -> bool:
    return rel.endswith(WEIGHT_SUFFIXES)


def weights_hash(files: Iterable[tuple[str, int]], read: Callable[[str, int, int], bytes]) -> str:
    """Hash of the weight files: path and size of each, plus its first and last MiB.

    `files` are (path relative to the model folder, size); `read(rel, offset, length)` returns
    those bytes. Ranged reads keep it cheap on multi-GB checkpoints and let the driver hash a
    folder in object storage without downloading it.
    """
    h = hashlib.sha256()
    for rel, size in sorted(f for f in files if is_weight_file(f[0])):
        h.update(f"{rel}:{size}".encode())
        h.update(read(rel, 0, min(size, _MIB)))
        if size > 2 * _MIB:
            h.update(read(rel, size - _MIB, _MIB))
    return h.hexdigest()[:16]


def folder_weights_hash(folder: Path) -> str:
    """`weights_hash` of a local folder."""
    files = [
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and is_weight_file(p.name) and not _hidden(p.relative_to(folder))
    ]

    def read(rel: str, offset: int, length: int) -> bytes:
        with open(folder / rel, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return weights_hash(files, read)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


@contextlib.contextmanager
def _node_lock(name: str):
    """An exclusive lock shared by every process of this node (flock on a file in the cache)."""
    import fcntl

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mismatch(source: str, got: str, want: str) -> ConfigError:
    return ConfigError(
        f"config error: model.path: {source} on node {socket.gethostname()} has weights {got}, "
        f"but this run was planned with {want}: the model changed after planning; run again"
    )


def model_folder(source: str, revision: str | None, expected_hash: str) -> Path:
    """This node's local folder for `source`, fetched once per node and checked against
    `expected_hash` (the weights hash the run was planned with)."""
    key = (source, revision, expected_hash)
    if key not in _verified:
        _verified[key] = materialize(source, revision, expected_hash)
    return _verified[key]


def materialize(source: str, revision: str | None, expected_hash: str | None) -> Path:
    """Fetch `source` into this node's cache if needed and return the folder; with an
    `expected_hash`, a folder whose weights differ is a ConfigError."""
    kind = source_kind(source)
    if kind == "s3":
        return _from_object_store(source, expected_hash)
    if kind == "packaged":
        from gpte_ray.model.spec import default_model_path

        folder = Path(default_model_path())
    elif kind == "local":
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(
                f"config error: model.path: {source} does not exist on node {socket.gethostname()}; "
                "a local model folder must be on every node (or put it in object storage: s3://...)"
            )
    else:
        with _node_lock("hub-" + hashlib.sha256(source.encode()).hexdigest()[:16]):
            folder = hub_snapshot(source, revision)
    if expected_hash is not None:
        got = folder_weights_hash(folder)
        if got != expected_hash:
            raise _mismatch(source if revision is None else f"{source}@{revision}", got, expected_hash)
    return folder


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The hub snapshot in this node's Hugging Face cache, downloaded if it is not there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - the hub raises many types; one line for the user
        raise ConfigError(
            f"config error: model.path: cannot load {repo_id!r}"
            f"{'@' + revision if revision else ''} on node {socket.gethostname()} ({type(e).__name__}); "
            "give a hub id available to every node (offline: in its Hugging Face cache), "
            "an s3:// folder or a local folder"
        ) from None


# ---- object storage -----------------------------------------------------------------------

def list_object_folder(uri: str) -> tuple[object, str, list[tuple[str, int]]]:
    """(pyarrow filesystem, base path, [(relative path, size)]) of the files under `uri`."""
    import pyarrow.fs as pafs

    from gpte_ray.storage import filesystem

    fs, base = filesystem(uri)
    base = base.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, FileNotFoundError) as e:
        raise ConfigError(f"config error: model.path: cannot list {uri} ({e})".splitlines()[0]) from None
    files = [
        (i.path[len(base) + 1:], i.size) for i in infos
        if i.type == pafs.FileType.File and not _hidden(Path(i.path[len(base) + 1:]))
    ]
    if not files:
        raise ConfigError(f"config error: model.path: {uri} holds no files")
    return fs, base, files


def object_weights_hash(fs, base: str, files: list[tuple[str, int]]) -> str:
    """`weights_hash` of a folder in object storage, by ranged reads (no full download)."""

    def read(rel: str, offset: int, length: int) -> bytes:
        with fs.open_input_file(f"{base}/{rel}") as f:
            return f.read_at(length, offset)

    return weights_hash(files, read)


def _from_object_store(uri: str, expected_hash: str | None) -> Path:
    uri = uri.rstrip("/") + "/"
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    root = cache_root()
    if expected_hash is not None:
        final = root / "s3" / f"{name}-{expected_hash}"
        if final.is_dir():
            return final
    with _node_lock("s3-" + name):
        if expected_hash is not None and final.is_dir():
            return final  # another actor of this node fetched it while we waited
        fs, base, files = list_object_folder(uri)
        tmp = root / "s3" / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, _ in files:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(f"{base}/{rel}") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 8 * _MIB)
            got = folder_weights_hash(tmp)
            if expected_hash is not None and got != expected_hash:
                raise _mismatch(uri, got, expected_hash)
            final = root / "s3" / f"{name}-{got}"
            if final.is_dir():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)  # atomic: readers see no folder or a complete one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
