"""Shards: finding them (dirs, globs, lists, s3:// and other fsspec URLs) and reading one as
prepared row batches.

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
from gpte_ray.input.prepare import content_hash, meta_hashes, prepare_rows, template_fields
from gpte_ray.storage import filesystem, is_remote, local_path, with_scheme

META_HASH = "meta_hash"  # PREPARED_SCHEMA's column: rides with the kept values until read_prepared

__all__ = ["PREPARED_SCHEMA", "ShardError", "check_columns", "list_shards", "needed_columns", "read_prepared",
           "shard_format"]

_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")

PREPARED_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("content_hash", pa.string()),
        ("reason", pa.string()),
        ("meta_hash", pa.string()),  # hash of the kept columns' values (null when none are kept)
    ]
)


class ShardError(ValueError):
    """A shard that cannot be read as configured; the message names the file."""


def shard_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    return "parquet" if uri.endswith(".parquet") else "jsonl"


def list_shards(cfg: InputConfig, exclude: str | None = None) -> list[str]:
    """Every shard the input names, sorted, without duplicates; none inside the folder
    `exclude` (the output db: an input folder that holds it must not read the job's own
    quarantine files back as shards)."""
    import pyarrow.fs as pafs

    if not cfg.paths:
        raise ShardError("config error: input.paths: no input given (use --input)")
    skip = None
    if exclude:
        skip = (exclude if is_remote(exclude) else local_path(exclude)).rstrip("/") + "/"
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
        hits = [with_scheme(uri, h) for h in hits]
        hits = [h for h in hits if skip is None or not h.startswith(skip)]
        if not hits:
            raise ShardError(f"input error: {uri}: matches no shard files")
        found.update(hits)
    return sorted(found)


def needed_columns(cfg: InputConfig) -> list[str]:
    """The id column, then every column the text is made of (each once)."""
    fields = template_fields(cfg.template) if cfg.template else [cfg.text_column]
    return [cfg.id_column, *dict.fromkeys(f for f in fields if f != cfg.id_column)]


def check_columns(uri: str, schema: pa.Schema, cfg: InputConfig) -> None:
    """The columns the config needs are in `schema`, with usable types (ShardError otherwise)."""
    missing = [c for c in needed_columns(cfg) if c not in schema.names]
    if missing:
        raise ShardError(
            f"input error: {uri}: missing column {missing[0]!r} (has: {', '.join(schema.names)})"
        )
    missing = [c for c in cfg.keep_columns if c not in schema.names]
    if missing:
        raise ShardError(missing_kept(uri, missing[0], schema.names))
    id_type = schema.field(cfg.id_column).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise ShardError(f"input error: {uri}: column {cfg.id_column!r} is {id_type}, expected string or integer")
    for f in needed_columns(cfg)[1:]:
        t = schema.field(f).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_null(t)):
            raise ShardError(f"input error: {uri}: column {f!r} is {t}, expected string")


def missing_kept(uri: str, column: str, names: list[str] | None) -> str:
    """The one line for a kept column a shard lacks (`names`: its columns, None for JSONL)."""
    has = f"the shard has: {', '.join(names)}" if names is not None else "no object of the shard has it"
    return f"input error: {uri}: missing column {column!r} (input.keep_columns; {has})"


def _open(uri: str, cfg: InputConfig, file, stream: bool):
    if file is not None:
        return file
    fs, path = filesystem(uri, cfg.storage_options)
    return fs.open_input_stream(path, compression=None) if stream else fs.open_input_file(path)


def _parquet_batches(uri: str, cfg: InputConfig, batch_rows: int,
                     file=None) -> Iterator[tuple[dict[str, list], pa.Table | None]]:
    import pyarrow.parquet as pq

    needed = needed_columns(cfg)
    try:
        pf = pq.ParquetFile(_open(uri, cfg, file, stream=False))
        check_columns(uri, pf.schema_arrow, cfg)
        columns = [*needed, *(c for c in cfg.keep_columns if c not in needed)]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            kept = _with_hash(_decoded(pa.Table.from_batches([batch]).select(cfg.keep_columns))) \
                if cfg.keep_columns else None
            yield {c: batch.column(c).to_pylist() for c in needed}, kept
    except ShardError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"input error: {uri}: unreadable Parquet ({_short(e)})") from None


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas categories) as their values: one type with plain ones."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table


def _with_hash(kept: pa.Table) -> pa.Table:
    return kept.append_column(META_HASH, pa.array(meta_hashes(kept.to_pylist()), pa.string()))


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _kept_table(uri: str, values: dict[str, list]) -> pa.Table | None:
    """Kept JSON values as Arrow, typed as pyarrow infers them (one type per column), with
    their meta hashes taken of the values as parsed: the inferred type depends on the batch's
    other rows (1 reads as 1.0 beside 2.5), the hash must not."""
    if not values:
        return None
    names = list(values)
    hashes = meta_hashes([dict(zip(names, row)) for row in zip(*values.values())])
    columns = {}
    for name, v in values.items():
        try:
            columns[name] = pa.array(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ShardError(f"input error: {uri}: column {name!r} (input.keep_columns) holds values of "
                             f"mixed types ({_short(e)})") from None
    return pa.table(columns).append_column(META_HASH, pa.array(hashes, pa.string()))


def _jsonl_batches(uri: str, cfg: InputConfig, batch_rows: int,
                   file=None) -> Iterator[tuple[dict[str, list], pa.Table | None]]:
    needed = needed_columns(cfg)
    cols: dict[str, list] = {c: [] for c in needed}
    kept: dict[str, list] = {c: [] for c in cfg.keep_columns}
    seen: set[str] = set()  # kept columns found in at least one object of the shard
    objects = 0
    lines_read = 0
    try:
        # decompress ourselves: pyarrow's codec cannot tell a truncated gzip from its end
        raw = _open(uri, cfg, file, stream=True)
        stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else io.BufferedReader(raw)
        for line in stream:
            lines_read += 1
            obj = None
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
                    obj = None
                    _append_bad(cols, needed, f"invalid JSON ({_short(e)})")
                else:
                    objects += 1
                    seen.update(c for c in kept if c in obj)
                    # an object without the id or text field is quarantined, wherever it is in
                    # the shard (a missing template field renders empty, like a null one)
                    absent = [c for c in needed[: 1 if cfg.template else 2] if c not in obj]
                    if absent:
                        _append_bad(cols, needed, "missing id" if absent[0] == cfg.id_column
                                    else f"missing field {absent[0]!r}")
                    else:
                        for c in needed:
                            cols[c].append(obj.get(c))
            for c, values in kept.items():
                values.append(obj.get(c) if obj is not None else None)
            if len(cols[needed[0]]) >= batch_rows:
                yield cols, _kept_table(uri, kept)
                cols = {c: [] for c in needed}
                kept = {c: [] for c in cfg.keep_columns}
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ShardError(
            f"input error: {uri}: truncated or corrupt gzip after line {lines_read} ({_short(e)})"
        ) from None
    except OSError as e:
        raise ShardError(f"input error: {uri}: unreadable ({_short(e)})") from None
    if cols[needed[0]]:
        yield cols, _kept_table(uri, kept)
    absent = [c for c in cfg.keep_columns if c not in seen]
    if objects and absent:  # no object of the shard has it: a wrong name, or a shard without it
        raise ShardError(missing_kept(uri, absent[0], None))


class _Bad:
    """A placeholder id for a line that could not be parsed: carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def _append_bad(cols: dict[str, list], needed: list[str], reason: str) -> None:
    cols[needed[0]].append(_Bad(reason))
    for c in needed[1:]:
        cols[c].append(None)


def read_prepared(
    uri: str, shard: int, cfg: InputConfig, rows: set[int] | None = None, batch_rows: int = 4096,
    kept_schema: pa.Schema | None = None, file=None,
) -> Iterator[pa.Table]:
    """Prepared batches (PREPARED_SCHEMA, then the kept columns) of one shard; `rows` keeps only
    those positions. Kept columns come as read, or cast to `kept_schema` when given. `file`: the
    shard already opened (pins.open_pinned), else it is opened here."""
    reader = _parquet_batches if shard_format(uri, cfg.format) == "parquet" else _jsonl_batches
    position = 0
    for cols, kept in reader(uri, cfg, batch_rows, file):
        ids = cols[cfg.id_column]
        n = len(ids)
        prepared = prepare_rows(
            [None if isinstance(x, _Bad) else x for x in ids], cols, cfg.text_column, cfg.template
        )
        out: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
        taken: list[int] = []
        for i, (doc_id, text, reason) in enumerate(prepared):
            pos = position + i
            if rows is not None and pos not in rows:
                continue
            if isinstance(ids[i], _Bad):
                doc_id, text, reason = None, None, ids[i].reason
            taken.append(i)
            out["shard"].append(shard)
            out["row"].append(pos)
            out["doc_id"].append(doc_id)
            out["text"].append(text)
            out["content_hash"].append(content_hash(text) if text is not None else None)
            out["reason"].append(reason)
        position += n
        if not taken:
            continue
        if kept is None:
            out["meta_hash"] = [None] * len(taken)
            yield pa.table(out, schema=PREPARED_SCHEMA)
            continue
        kept = kept.take(pa.array(taken, pa.int64()))
        out["meta_hash"] = kept[META_HASH].to_pylist()  # of the values as read, before any cast
        kept = kept.drop_columns([META_HASH])
        table = pa.table(out, schema=PREPARED_SCHEMA)
        for name in kept.column_names:
            table = table.append_column(name, _cast_kept(uri, kept[name], name, kept_schema))
        yield table


def _cast_kept(uri: str, column: pa.ChunkedArray, name: str, schema: pa.Schema | None) -> pa.ChunkedArray:
    if schema is None:
        return column
    target = schema.field(name).type
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise ShardError(f"input error: {uri}: column {name!r} (input.keep_columns) is {column.type}, which does "
                         f"not cast to {target}, its type in the table or other shards ({_short(e)})") from None
