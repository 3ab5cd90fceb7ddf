"""The copy pass: documents whose text is unchanged but whose kept column values changed are
not embedded again. Their rows are copied from the table at the planned version (vectors
included, bit for bit) with the new values read from the shard, and staged like embedded
windows (store.staging.StagingWriter), so the run's one fenced commit and its resume logic
cover them too."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.config import InputConfig
from gpte_ray.input.pins import Pin, read_pinned
from gpte_ray.plan.files import planned_rows
from gpte_ray.run.context import RunContext
from gpte_ray.run.resume import StagedState, read_skip
from gpte_ray.store.deletions import sql_list
from gpte_ray.store.staging import StagingWriter
from gpte_ray.store.table import BASE_COLUMNS, META_HASH, TableStore, kept_fields

__all__ = ["CopyJob", "copy_pass", "copy_shard"]


@dataclass
class CopyJob:
    """What every copy task of one attempt shares."""

    cfg: InputConfig
    store: TableStore
    writer: StagingWriter
    plan_dir: str  # the plan of the documents to copy
    read_version: int | None
    skip: frozenset[tuple[str, int]] = frozenset()  # chunks an earlier attempt of this run staged already


def copy_pass(ctx: RunContext, state: StagedState) -> None:
    """Stage the documents of `state`'s plan as copies of their table rows with their new kept
    values (one Ray task per shard); counts the rows in the report's chunks_copied."""
    import ray

    job = CopyJob(cfg=ctx.cfg.input, store=ctx.store, writer=StagingWriter(ctx.store, ctx.schema, ctx.plan_id,
                                                                            ctx.overwrite),
                  plan_dir=state.plan_dir, read_version=ctx.read_version,
                  skip=read_skip(state.skip_dir, ctx.store.storage_options))
    task = ray.remote(num_cpus=ctx.cfg.resources.read_cpus, max_retries=3)(copy_shard)
    ctx.report.chunks_copied += sum(ray.get([task.remote(job, s, ctx.pins[s]) for s in state.shards]))


def copy_shard(job: CopyJob, shard: int, pin: str) -> int:
    """Stage the planned documents of one shard as copies of their table rows with the kept
    values read from the shard now (under its scan `pin`, matched to the plan by id and hashes);
    returns the rows staged. Runs in a Ray task."""
    store, schema, skip = job.store, job.writer.schema, job.skip
    ds = store.open(job.read_version)
    kept = kept_fields(schema)
    old_columns = [c for c in BASE_COLUMNS if c in schema.names and c in ds.schema.names]
    plan = planned_rows(job.plan_dir, shard, store.storage_options)
    staged = 0
    for t in read_pinned(Pin.from_json(pin), shard, job.cfg, plan, kept_schema=kept):
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
        staged += job.writer.write(out, keys, [pin])
    return staged
