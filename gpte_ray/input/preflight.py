"""Checks of the user's input that need no Ray, run before Ray starts.

A typo in a column name or template should cost a second, not a cluster start and a page of
Ray tracebacks. These checks read only the shard list and the first shard's schema (Parquet
footer) or first JSON objects, so they stay cheap on any corpus; later shards are still checked
by the job itself, which names the file.
"""

from __future__ import annotations

import json
import string

import pyarrow as pa

from gpte_ray.config import ConfigError, InputConfig, JobConfig
from gpte_ray.input.sources import ShardError, check_columns, list_shards, missing_kept, needed_columns, shard_format
from gpte_ray.storage import filesystem

__all__ = [
    "check_first_shard",
    "check_template",
    "preflight",
]

# how far into a JSONL shard to look for the columns it has
_SAMPLE_OBJECTS = 100
_SAMPLE_LINES = 1000


def preflight(cfg: JobConfig) -> list[str]:
    """The run's shards, after checking the template and the first shard's columns."""
    check_template(cfg.input.template)
    shards = list_shards(cfg.input, exclude=cfg.output.db)
    if not cfg.input.skip_bad_shards:  # a bad first shard is then quarantined, not fatal
        check_first_shard(shards[0], cfg.input)
    return shards


def check_template(template: str | None) -> None:
    """A template must be a str.format template over named columns only."""
    if template is None:
        return
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"config error: input.template: {template!r} is not a valid template ({e})") from None
    fields = [f for _, f, _, _ in parts if f is not None]
    if not fields:
        raise ConfigError(f"config error: input.template: {template!r} names no column (write e.g. {{text}})")
    for f in fields:
        if f == "" or f.isdigit():
            raise ConfigError(
                f"config error: input.template: {template!r} has a positional field {{{f}}}; "
                "name a column instead, e.g. {title}"
            )
        if not f.isidentifier() and any(ch in f for ch in ".[]"):
            raise ConfigError(
                f"config error: input.template: field {{{f}}}: use plain column names "
                "(no attribute or index access)"
            )


def check_first_shard(uri: str, cfg: InputConfig) -> None:
    """The needed columns exist in the first shard (types too, for Parquet; in JSONL, in at
    least one of its first objects), and for Parquet the kept ones too (a JSONL field may first
    appear anywhere in a shard: the reader checks the whole shard).

    A shard that cannot be read at all is left to the job, which reports it as a bad shard.
    """
    fs, path = filesystem(uri, cfg.storage_options)
    if shard_format(uri, cfg.format) == "parquet":
        import pyarrow.parquet as pq

        try:
            with fs.open_input_file(path) as f:
                schema = pq.read_schema(f)
        except (OSError, pa.ArrowException):
            return
        _check_names(uri, schema.names, cfg)
        check_columns(uri, schema, cfg)
        return
    seen = _json_keys(fs, path)
    if not seen:
        return
    for column in cfg.keep_columns:  # a typo costs a second here, not a cluster start
        if column not in seen and not _mentions(fs, path, column):
            raise ShardError(missing_kept(uri, column, list(seen)))
    # one object may lack a column (that row is quarantined); a column that none of the first
    # objects has is a wrong name. A template field may be optional, but not all of them.
    needed = needed_columns(cfg)
    absent = [c for c in needed if c not in seen]
    if cfg.template and len(absent) < len(needed) - 1 and cfg.id_column not in absent:
        return
    if absent:
        _check_names(uri, list(seen), cfg)


def _check_names(uri: str, names: list[str], cfg: InputConfig) -> None:
    missing = [c for c in needed_columns(cfg) if c not in names]
    if missing:
        flag = "input.id_column" if missing[0] == cfg.id_column else (
            "input.template" if cfg.template else "input.text_column")
        raise ShardError(
            f"input error: {uri}: missing column {missing[0]!r} ({flag}; the shard has: {', '.join(names)})"
        )


_SCAN_BYTES = 64 << 20  # how much of a JSONL first shard is searched for a kept column's name


def _mentions(fs, path: str, key: str) -> bool:
    """Whether a JSONL shard may hold `key` as a field: its quoted name appears in the text,
    or the shard is too long (or unreadable) to tell from here (the job checks it whole)."""
    import gzip
    import io

    needles = {json.dumps(key).encode(), json.dumps(key, ensure_ascii=False).encode()}
    keep = max(map(len, needles)) - 1
    tail, read = b"", 0
    try:
        raw = fs.open_input_stream(path, compression=None)
        with gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else io.BufferedReader(raw) as stream:
            while block := stream.read(1 << 20):
                text = tail + block
                if any(n in text for n in needles):
                    return True
                tail, read = text[-keep:], read + len(block)
                if read >= _SCAN_BYTES:
                    return True
    except (OSError, EOFError, ValueError):
        return True
    return False


def _json_keys(fs, path: str) -> dict[str, None]:
    """Keys of the first objects of a JSONL shard, in order of appearance (empty: none found)."""
    import gzip
    import io

    keys: dict[str, None] = {}
    objects = 0
    try:
        raw = fs.open_input_stream(path, compression=None)
        with gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else io.BufferedReader(raw) as stream:
            for n, line in enumerate(stream):
                if n >= _SAMPLE_LINES or objects >= _SAMPLE_OBJECTS:
                    break
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    objects += 1
                    keys.update(dict.fromkeys(obj))
    except (OSError, EOFError, ValueError):
        pass
    return keys
