"""Kept source columns (`input.keep_columns`): their one type across shards, and the copy pass.

The scan writes the types each shard's kept columns were read with (Parquet's own; for JSONL,
as pyarrow infers them) to a small file per shard; the driver unifies them into the table's
kept schema (`resolve_kept`). A document whose text is unchanged but whose kept values
changed is not embedded again: `copy_shard` copies its rows from the table at the planned
version (vectors included, bit for bit) with the new values, and stages them like embedded
windows (a Lance fragment plus a marker), so the run's one fenced commit and its resume
logic cover them too.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.input.sources import ShardError
from gpte_ray.storage import ensure_dir, filesystem

__all__ = ["copy_shard", "resolve_kept", "unify_kept", "write_shard_types"]


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


def copy_shard(uri: str, shard: int, cfg, plan_dir: str, db: str, table: str, storage_options: dict | None,
               read_version: int, schema: pa.Schema, run_id: str, overwrite: bool,
               skip: frozenset[tuple[str, int]] = frozenset(), pin: str = "") -> int:
    """Stage the planned documents of one shard as copies of their table rows with the kept
    values read from the shard now (under its scan `pin`, matched to the plan by id and hashes);
    returns the rows staged. Runs in a Ray task."""
    from gpte_ray.input.pins import Pin, read_pinned
    from gpte_ray.plan.diff import planned_rows
    from gpte_ray.store.deletions import sql_list
    from gpte_ray.store.staging import StagingWriter
    from gpte_ray.store.table import BASE_COLUMNS, META_HASH, TableStore, kept_fields

    store = TableStore(db, table, storage_options)
    writer = StagingWriter(store, schema, run_id, overwrite)
    ds = store.open(read_version)
    kept = kept_fields(schema)
    old_columns = [c for c in BASE_COLUMNS if c in schema.names and c in ds.schema.names]
    plan = planned_rows(plan_dir, shard, storage_options)
    staged = 0
    for t in read_pinned(Pin.from_json(pin), shard, cfg, plan, kept_schema=kept):
        ids = t["doc_id"].combine_chunks()
        old = ds.to_table(columns=old_columns, filter=f"doc_id IN ({sql_list(ids)})")
        at = pc.index_in(old["doc_id"], value_set=ids)  # each old row's document in `t`
        out = old
        for name in (META_HASH, *kept.names):
            out = out.append_column(name, t[name].take(at))
        for f in schema:  # a base column the old table lacks (text, if it stored none): null
            if f.name not in out.column_names:
                out = out.append_column(f.name, pa.nulls(out.num_rows, f.type))
        counts = old.group_by("doc_id", use_threads=False).aggregate([("chunk", "count")])
        n_chunks = pc.cast(counts["chunk_count"].take(pc.index_in(old["doc_id"], value_set=counts["doc_id"])),
                           pa.int32())
        keys = pa.table({"doc_id": old["doc_id"], "chunk": old["chunk"], "n_chunks": n_chunks})
        if skip:  # chunks an earlier attempt of this run staged already
            keep = [(d, c) not in skip for d, c in zip(keys["doc_id"].to_pylist(), keys["chunk"].to_pylist())]
            out, keys = out.filter(pa.array(keep)), keys.filter(pa.array(keep))
        staged += writer.write(out, keys, [pin])
    return staged
