"""Kept source columns (`input.keep_columns`): their one type across shards.

The scan writes the types each shard's kept columns were read with (Parquet's own; for JSONL,
as pyarrow infers them) to a small file per shard; the driver unifies them into the table's
kept schema (`resolve_kept`). Documents whose kept values changed are copied by run/copy.py.
"""

from __future__ import annotations

import pyarrow as pa

from gpte_ray.input.sources import ShardError
from gpte_ray.storage import ensure_dir, filesystem

__all__ = ["resolve_kept", "unify_kept", "write_shard_types"]


def unify_kept(uri: str, acc: pa.Schema | None, schema: pa.Schema) -> pa.Schema:
    """`acc` and `schema` as one schema (int64 and double give double, null gives way to any
    type); a column whose types do not mix is a ShardError naming `uri` and the column."""
    if acc is None:
        return schema
    try:
        return pa.unify_schemas([acc, schema], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        for f in schema:
            if f.name not in acc.names:
                continue
            try:
                pa.unify_schemas([pa.schema([acc.field(f.name)]), pa.schema([f])], promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise ShardError(
                    f"input error: {uri}: column {f.name!r} (input.keep_columns) is {f.type} here but "
                    f"{acc.field(f.name).type} in other rows or shards; a kept column needs one type"
                ) from None
        raise


def write_shard_types(types_dir: str, shard: int, schema: pa.Schema, storage_options: dict | None) -> None:
    """The kept columns' types of one shard, as an empty Parquet file (a retry overwrites it)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(types_dir, storage_options)
    ensure_dir(fs, path)
    pq.write_table(schema.empty_table(), f"{path}/{shard:010d}.parquet", filesystem=fs)


def _shard_types(types_dir: str, storage_options: dict | None) -> list[tuple[int, pa.Schema]]:
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = filesystem(types_dir, storage_options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet"))
    with ThreadPoolExecutor(16) as pool:
        schemas = list(pool.map(lambda p: pq.read_schema(p, filesystem=fs), files))
    return [(int(p.rsplit("/", 1)[-1].split(".")[0]), s) for p, s in zip(files, schemas)]


def resolve_kept(types_dir: str, shards: list[str], storage_options: dict | None, keep_columns: list[str],
                 table_kept: pa.Schema | None) -> tuple[pa.Schema, bool]:
    """(the kept columns' schema for this run, whether it differs from the table's).

    `table_kept`: the kept columns of the table the run updates (None: no table, or a
    rebuild). The table's types stay while the scanned ones fit in them (a column that is
    null in every row read keeps its type, else is stored as string); any other difference
    in names or types is a new kept schema.
    """
    merged = None
    for shard, schema in _shard_types(types_dir, storage_options):
        merged = unify_kept(shards[shard], merged, schema)
    fields = []
    for name in keep_columns:
        old = table_kept.field(name).type if table_kept is not None and name in table_kept.names else None
        typ = merged.field(name).type if merged is not None and name in merged.names else pa.null()
        fields.append(pa.field(name, old or pa.string()) if pa.types.is_null(typ) else pa.field(name, typ))
    target = pa.schema(fields)
    if table_kept is None:
        return target, False
    if set(table_kept.names) != set(target.names):
        return target, True
    try:
        both = pa.unify_schemas([table_kept, target], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return target, True
    if all(both.field(n).type == table_kept.field(n).type for n in table_kept.names):
        return table_kept, False
    return target, True
