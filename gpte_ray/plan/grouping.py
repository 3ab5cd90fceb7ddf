"""Grouping rows by a key over Arrow: in one Ray task when they are few, else by a Ray Data
hash shuffle. The diff (plan.diff) and the resume state (run.resume) both group this way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["SMALL_ROWS", "aggregate", "fits_one_task", "group_map", "ray_aggregations"]

# Below this many rows a grouping runs as one task over Arrow: a hash shuffle costs tens of
# seconds of fixed overhead on a small cluster, one task's tables stay under ~100 MB.
SMALL_ROWS = 300_000


def fits_one_task(rows: int, small_rows: int = SMALL_ROWS) -> bool:
    """Whether `rows` are grouped in one task (else by a hash shuffle)."""
    return rows <= small_rows


def aggregate(table: pa.Table, key: str, specs: list[tuple[str, str, str]]) -> pa.Table:
    """Group `table` by `key` in one process: specs are (column, "min"|"max"|"count", alias);
    counts skip nulls, as the cluster path's Count(ignore_nulls=True) does."""
    out = table.group_by(key, use_threads=False).aggregate([(c, fn) for c, fn, _ in specs])
    return pa.table([out[key]] + [out[f"{c}_{fn}"] for c, fn, _ in specs], names=[key] + [a for *_, a in specs])


def ray_aggregations(specs: list[tuple[str, str, str]]) -> list:
    """The same specs as Ray Data aggregations, for the hash-shuffle path."""
    from ray.data.aggregate import Count, Max, Min

    make = {"min": Min, "max": Max, "count": lambda c, alias_name: Count(c, ignore_nulls=True, alias_name=alias_name)}
    return [make[fn](c, alias_name=alias) for c, fn, alias in specs]


def _partitions(rows_hint: int) -> int:
    # ~250k rows per hash partition keeps each reduce task's Arrow tables around 50 MB
    return max(2, min(512, rows_hint // 250_000 + 2))


def group_map(parts: list[Dataset], key: str, specs: list[tuple[str, str, str]], fn: Callable[..., pa.Table], *,
              rows: int, small_rows: int = SMALL_ROWS, rows_hint: int, schema: pa.Schema,
              prepare: Callable[[pa.Table], pa.Table] | None = None,
              fn_kwargs: dict | None = None) -> Iterator[pa.Table]:
    """Group the rows of `parts` (Ray datasets; for the one-task path, lists of object refs of
    Arrow tables, or of the tables themselves, grouped here) by `key` (`specs` as in `aggregate`) and yield
    `fn(groups, **fn_kwargs)` for each block of groups (a group is never split across blocks);
    `fn` writes what it found and returns a small summary table.

    `rows` (the caller's count) decides: up to `small_rows`, all the groups are one block, in
    one Ray task; past that, a hash shuffle into partitions sized by `rows_hint`. `prepare`
    maps each input block to `schema` first (in that task, or as a map step before the shuffle);
    the one task casts to `schema`, and groups an empty table of it when there are no rows.
    """
    import ray

    fn_kwargs = fn_kwargs or {}
    if fits_one_task(rows, small_rows):
        refs = [r for p in parts for r in (p if isinstance(p, list) else p.to_arrow_refs())]
        if all(isinstance(r, pa.Table) for r in refs):  # read by the caller: small, grouped here
            yield _group_in_task(key, specs, schema, prepare, fn, fn_kwargs, *refs)
            return
        task = ray.remote(num_cpus=0.5, max_retries=3)(_group_in_task)
        yield ray.get(task.remote(key, specs, schema, prepare, fn, fn_kwargs, *refs))
        return
    if prepare is not None:
        parts = [p.map_batches(prepare, batch_format="pyarrow", batch_size=None) for p in parts]
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    grouped = union.groupby(key, num_partitions=_partitions(rows_hint)).aggregate(*ray_aggregations(specs))
    yield from grouped.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs
                                   ).iter_batches(batch_size=None, batch_format="pyarrow")


def _group_in_task(key: str, specs: list[tuple[str, str, str]], schema: pa.Schema, prepare: Callable | None,
                   fn: Callable[..., pa.Table], fn_kwargs: dict, *blocks: pa.Table) -> pa.Table:
    """The one-task path of group_map: every input block here, grouped and mapped at once."""
    tables = [(prepare(b) if prepare is not None else b).cast(schema) for b in blocks if b.num_rows]
    return fn(aggregate(pa.concat_tables(tables or [schema.empty_table()]), key, specs), **fn_kwargs)
