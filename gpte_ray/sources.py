"""Shards: finding them (dirs, globs, lists, s3://) and reading one as prepared row batches.

Reading runs inside Ray tasks, one shard per task, yielding bounded batches so a large shard
never sits whole in memory. Row positions are the file's own (0-based row or line), so a
quarantined row can be found in its file.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import zlib
from collections.abc import Iterator

import pyarrow as pa

from gpte_ray.config import InputConfig
from gpte_ray.prepare import content_hash, prepare_rows, template_fields
from gpte_ray.storage import filesystem

__all__ = ["PREPARED_SCHEMA", "ShardError", "check_columns", "list_shards", "read_prepared", "shard_format"]

_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")

PREPARED_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("content_hash", pa.string()),
        ("reason", pa.string()),
    ]
)


class ShardError(ValueError):
    """A shard that cannot be read as configured; the message names the file."""


def shard_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    return "parquet" if uri.endswith(".parquet") else "jsonl"


def _with_scheme(uri: str, path: str) -> str:
    return f"s3://{path}" if uri.startswith("s3://") else path


def list_shards(cfg: InputConfig) -> list[str]:
    """Every shard the input names, sorted, without duplicates."""
    import pyarrow.fs as pafs

    if not cfg.paths:
        raise ShardError("config error: input.paths: no input given (use --input)")
    found: set[str] = set()
    for uri in cfg.paths:
        fs, path = filesystem(uri, cfg.storage_options)
        if any(ch in path for ch in "*?["):
            base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            hits = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ShardError(f"input error: {uri}: no such file or directory")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                hits = [
                    i.path for i in infos
                    if i.is_file and i.path.endswith(_EXTENSIONS) and "/." not in i.path
                ]
            else:
                hits = [path]
        if not hits:
            raise ShardError(f"input error: {uri}: matches no shard files")
        found.update(_with_scheme(uri, h) for h in hits)
    return sorted(found)


def _needed_columns(cfg: InputConfig) -> list[str]:
    fields = template_fields(cfg.template) if cfg.template else [cfg.text_column]
    return [cfg.id_column, *[f for f in fields if f != cfg.id_column]]


def check_columns(uri: str, schema: pa.Schema, cfg: InputConfig) -> None:
    """The columns the config needs are in `schema`, with usable types (ShardError otherwise)."""
    missing = [c for c in _needed_columns(cfg) if c not in schema.names]
    if missing:
        raise ShardError(
            f"input error: {uri}: missing column {missing[0]!r} (has: {', '.join(schema.names)})"
        )
    id_type = schema.field(cfg.id_column).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise ShardError(f"input error: {uri}: column {cfg.id_column!r} is {id_type}, expected string or integer")
    for f in _needed_columns(cfg)[1:]:
        t = schema.field(f).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_null(t)):
            raise ShardError(f"input error: {uri}: column {f!r} is {t}, expected string")


def _parquet_batches(uri: str, cfg: InputConfig, batch_rows: int) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, cfg.storage_options)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
        check_columns(uri, pf.schema_arrow, cfg)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=_needed_columns(cfg)):
            yield batch.to_pydict()
    except ShardError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"input error: {uri}: unreadable Parquet ({_short(e)})") from None


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _jsonl_batches(uri: str, cfg: InputConfig, batch_rows: int) -> Iterator[dict[str, list]]:
    fs, path = filesystem(uri, cfg.storage_options)
    needed = _needed_columns(cfg)
    cols: dict[str, list] = {c: [] for c in needed}
    lines_read = 0
    try:
        # decompress ourselves: pyarrow's codec cannot tell a truncated gzip from its end
        raw = fs.open_input_stream(path, compression=None)
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else io.BufferedReader(raw)
        for line in stream:
            lines_read += 1
            if not line.strip():
                _append_bad(cols, needed, "blank line")
            else:
                try:
                    # invalid bytes survive as lone surrogates, so the id is still found and
                    # prepare quarantines the text under that id
                    obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    _append_bad(cols, needed, f"invalid JSON ({_short(e)})")
                else:
                    # an object without the id or text field is quarantined, wherever it is in
                    # the shard (a missing template field renders empty, like a null one)
                    absent = [c for c in needed[: 1 if cfg.template else 2] if c not in obj]
                    if absent:
                        _append_bad(cols, needed, "missing id" if absent[0] == cfg.id_column
                                    else f"missing field {absent[0]!r}")
                    else:
                        for c in needed:
                            cols[c].append(obj.get(c))
            if len(cols[needed[0]]) >= batch_rows:
                yield cols
                cols = {c: [] for c in needed}
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ShardError(
            f"input error: {uri}: truncated or corrupt gzip after line {lines_read} ({_short(e)})"
        ) from None
    except OSError as e:
        raise ShardError(f"input error: {uri}: unreadable ({_short(e)})") from None
    if cols[needed[0]]:
        yield cols


class _Bad:
    """A placeholder id for a line that could not be parsed: carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def _append_bad(cols: dict[str, list], needed: list[str], reason: str) -> None:
    cols[needed[0]].append(_Bad(reason))
    for c in needed[1:]:
        cols[c].append(None)


def read_prepared(
    uri: str, shard: int, cfg: InputConfig, rows: set[int] | None = None, batch_rows: int = 4096
) -> Iterator[pa.Table]:
    """Prepared batches (PREPARED_SCHEMA) of one shard; `rows` keeps only those positions."""
    reader = _parquet_batches if shard_format(uri, cfg.format) == "parquet" else _jsonl_batches
    position = 0
    for cols in reader(uri, cfg, batch_rows):
        ids = cols[cfg.id_column]
        n = len(ids)
        prepared = prepare_rows(
            [None if isinstance(x, _Bad) else x for x in ids], cols, cfg.text_column, cfg.template
        )
        out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
        for i, (doc_id, text, reason) in enumerate(prepared):
            pos = position + i
            if rows is not None and pos not in rows:
                continue
            if isinstance(ids[i], _Bad):
                doc_id, text, reason = None, None, ids[i].reason
            out["shard"].append(shard)
            out["row"].append(pos)
            out["doc_id"].append(doc_id)
            out["text"].append(text)
            out["content_hash"].append(content_hash(text) if text is not None else None)
            out["reason"].append(reason)
        position += n
        if out["row"]:
            yield pa.table(out, schema=PREPARED_SCHEMA)
