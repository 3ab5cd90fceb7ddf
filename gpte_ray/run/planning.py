"""The planning steps of a run: the table as it is, the scan and the diff, the pins, the run id.

The diff runs on the cluster: the driver gets counts, the per-document lists stay in files
under the run's plan folder in staging (plan/files.py), and each shard's pin says what the
scan read (input/pins.py), so the embed and copy passes read exactly that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pyarrow as pa

from gpte_ray.config import ConfigError
from gpte_ray.input.audit import source_rows
from gpte_ray.input.pins import Pin, pins_dir, read_pinned, read_pins, take_pins
from gpte_ray.plan.files import calibration_rows
from gpte_ray.plan.grouping import SMALL_ROWS
from gpte_ray.plan.kept import resolve_kept
from gpte_ray.plan.shards import changed_in_place
from gpte_ray.run.cluster import user_error
from gpte_ray.run.context import RunContext
from gpte_ray.run.embed import embed_options
from gpte_ray.run.rebuild import check_rebuild
from gpte_ray.run.shards import keep_manifest, plan_shards
from gpte_ray.run.stages import EmbedStage, TokenizeStage, scan_shard
from gpte_ray.storage import is_remote, join
from gpte_ray.store.table import kept_fields, table_schema

__all__ = ["calibrate", "name_run", "open_table", "plan"]

log = logging.getLogger("gpte_ray")


def open_table(ctx: RunContext) -> None:
    """The table at the version this run plans on; refuse a store_text change on it."""
    current = ctx.current = ctx.store.open()
    ctx.rebuild = current is not None and ctx.store.fingerprint(current) != ctx.spec.fingerprint()
    if ctx.rebuild:
        check_rebuild(ctx.cfg, ctx.store, ctx.spec, current)  # the table may have changed since start
    ctx.report.version_before = ctx.read_version
    store_text = ctx.cfg.output.store_text
    if current is not None and not ctx.rebuild and ("text" in current.schema.names) != store_text:
        # unchanged documents would keep (or lack) their text: the table would be a mix
        was = "with" if "text" in current.schema.names else "without"
        raise ConfigError(
            f"config error: output.store_text: {str(store_text).lower()}, but table "
            f"{ctx.store.table!r} was built {was} the chunk texts; keep the table's setting, or index into a new table"
        )


def plan(ctx: RunContext) -> None:
    """Scan the new and changed shards (every shard on a full scan: run.shards) and diff them
    against the table; the counts, quarantine and pins."""
    cfg, store, report = ctx.cfg, ctx.store, ctx.report
    try:
        ctx.diff = plan_shards(ctx, _scan, _table_ids, _resolve_kept)
    except Exception as e:
        raise (user_error(e) or e) from None
    diff, choice = ctx.diff, ctx.shard_choice
    report.stage_seconds.update(diff.seconds)  # table_ids, scan, diff
    report.take_counts(diff)
    report.set_shards(len(ctx.shards), len(choice.read), len(choice.skipped), choice.why)
    for b in diff.quarantine_batches():  # counted by kind, a few examples kept
        report.add_quarantine(b.select(["shard", "row", "doc_id", "reason"]).to_pylist(), ctx.shards)
    whole = [{"shard": s, "row": -1} for s in sorted(diff.whole_shards())]
    # rows of the shards read, counted apart from the reader; the skipped ones as they were
    report.source_rows = source_rows(ctx.shards, cfg.input, whole, cfg.resources.read_cpus,
                                     only=choice.read, here=ctx.scanned_here) + diff.rows_skipped
    # what each shard was when the scan read it: the embed and copy passes read exactly that
    # (a skipped shard: its pin in the manifest, which its fingerprint still matches)
    read = read_pins(pins_dir(ctx.plan_dir), store.storage_options) if choice.read else {}
    ctx.pins = {i: e["pin"] for i, e in choice.skipped.items()} | {s: p.to_json() for s, p in read.items()}
    report.shards_changed_in_place = changed_in_place(choice, ctx.shards, read)
    for uri in report.shards_changed_in_place:
        log.warning("%s: its contents changed although its size and modification time (or ETag) did not; "
                    "found by a full scan", uri)


def _resolve_kept(ctx: RunContext) -> bool:
    """Called by the diff after the scan: the kept columns' schema, and whether it is new."""
    table_kept = kept_fields(ctx.current.schema) if ctx.current is not None and not ctx.rebuild else None
    ctx.kept_schema, changed = resolve_kept(join(ctx.plan_dir, "kept_types"), ctx.shards, ctx.store.storage_options,
                                            ctx.cfg.input.keep_columns, table_kept)
    return changed


# Up to this many shards and bytes the scan runs here, in the driver, one shard at a time: a Ray
# Data pass costs ~2 s of fixed overhead (its executor, its internal actors, a worker per task)
# for work that takes a tenth of that. Its output (ids and hashes, no texts) stays bounded: even
# 16 MiB of Parquet of very short texts is ~1M rows, ~150 MB here.
SCAN_HERE_SHARDS = 64
SCAN_HERE_BYTES = 16 * 2**20


def scan_here(ctx: RunContext, positions: list[int]) -> bool:
    """Whether the shards at `positions` are few, small local files, to scan in the driver (a
    stat each). Object-store shards stay on the cluster: a size costs a request or a listing of
    their folder there, and tasks read them in parallel. A shard whose size is unknown, too."""
    uris = [ctx.shards[i] for i in positions]
    if len(uris) > SCAN_HERE_SHARDS or any(is_remote(u) for u in uris):
        return False
    sizes = [p.size for p in take_pins(uris, ctx.cfg.input.storage_options)]
    return None not in sizes and sum(sizes) <= SCAN_HERE_BYTES


def _scan(ctx: RunContext, positions: list[int]):
    """The manifest pass over the shards at `positions` (stages.SCAN_SCHEMA rows): a list of
    Arrow tables scanned here when they are small (scan_here), else a lazy Ray dataset; the
    diff consumes either. The kept columns' types, the pin of each shard, its rows and its
    manifest entry go to files in the plan folder."""
    import ray.data

    kwargs = {"cfg": ctx.cfg.input, "types_dir": join(ctx.plan_dir, "kept_types"),
              "storage_options": ctx.store.storage_options, "pins_dir": pins_dir(ctx.plan_dir),
              "forced_bad": ctx.forced_bad, "keep_rows": True}
    ctx.scanned_here = scan_here(ctx, positions)
    if ctx.scanned_here:  # (no positions, only vanished shards: an empty list)
        return [t for i in positions
                for t in scan_shard(pa.table({"shard": [i], "uri": [ctx.shards[i]]}), **kwargs)]
    items = [{"shard": i, "uri": ctx.shards[i]} for i in positions]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        scan_shard, fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow", num_cpus=ctx.cfg.resources.read_cpus)


def _read_table_ids(uri: str, version: int, storage_options: dict | None, columns: list[str]) -> pa.Table:
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    return ds.to_table(columns=columns, filter="chunk = 0")


def _table_ids(ctx: RunContext):
    """The table's documents (doc_id, content_hash and meta_hash if kept columns are stored,
    of chunk 0) at the planned version, as a lazy Ray dataset read by Lance in worker tasks."""
    import ray
    import ray.data

    current, store = ctx.current, ctx.store
    if current is None:
        return None
    columns = ["doc_id", "content_hash", *(["meta_hash"] if "meta_hash" in current.schema.names else [])]
    if current.count_rows() <= SMALL_ROWS:
        # one task: read_lance's per-fragment tasks cost more than they save on a small table
        task = ray.remote(num_cpus=0.5, max_retries=3)(_read_table_ids)
        return ray.data.from_arrow_refs([task.remote(store.uri, current.version, store.storage_options, columns)])
    return ray.data.read_lance(store.uri, version=current.version, columns=columns,
                               scanner_options={"filter": "chunk = 0"}, storage_options=store.storage_options)


def calibrate(ctx: RunContext) -> None:
    """int8 ranges: the table's, else from a fixed sample of this corpus (once per table)."""
    if ctx.spec.precision != "int8":
        return
    if ctx.current is not None and not ctx.rebuild:
        ctx.calibration = ctx.store.calibration(ctx.current)
    if ctx.calibration is None:
        if not ctx.diff.embed:
            raise ConfigError("config error: model.precision: int8 needs documents to calibrate on")
        ctx.calibration = _calibrate_on_cluster(ctx)


def _calibrate_on_cluster(ctx: RunContext) -> dict:
    """The job's own stages, with float32 output, over the first documents to embed by doc_id
    (read from the plan in a Ray task, not on the driver): the ranges int8 will hold."""
    import ray

    cfg, pins, plan_dir = ctx.cfg, ctx.pins, ctx.plan_dir
    opts, sample = ctx.store.storage_options, cfg.model.calibration_sample
    f32 = dataclasses.replace(ctx.spec, precision="float32")
    options = embed_options(cfg, ctx.device)
    gpus = cfg.resources.gpus_per_actor if ctx.device == "cuda" or cfg.resources.fake_gpus else 0

    @ray.remote(num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus)
    def sample_ranges() -> dict:
        import numpy as np
        import pyarrow.compute as pc

        from gpte_ray.model.quantize import calibrate_int8

        docs = [t.select(["doc_id", "text", "content_hash"])
                for shard, rows in sorted(calibration_rows(plan_dir, opts, sample).items())
                for t in read_pinned(Pin.from_json(pins[shard]), shard, cfg.input, rows)]
        chunks = TokenizeStage(f32)(pa.concat_tables(docs))
        chunks = chunks.filter(pc.equal(chunks["chunk"], 0))
        floats = np.stack(EmbedStage(f32, options)(chunks)["vector"].to_numpy(zero_copy_only=False))
        low, high = calibrate_int8(floats)
        return {"low": low, "high": high, "sample": chunks.num_rows}

    return ray.get(sample_ranges.remote())


def name_run(ctx: RunContext) -> None:
    """The table's schema and the plan id (the plan's identity, under which its work is staged
    and claimed); staging of other plans goes; the shard manifest of what the run leaves."""
    ctx.schema = table_schema(ctx.spec, ctx.cfg.output.store_text, ctx.calibration, ctx.kept_schema)
    key = f"{ctx.read_version}|{ctx.spec.fingerprint_digest()}|{ctx.diff.digest()}|{ctx.cfg.output.store_text}"
    if len(ctx.kept_schema):
        key += f"|{ctx.kept_schema}"
    ctx.plan_id = ctx.report.plan_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    ctx.lock.check()  # other plans' staging is dropped only by the lease's holder
    for stale in ctx.store.stale_staging(keep=ctx.plan_id):
        ctx.store.drop_staging(stale)  # staged under another table version or corpus: never committable
    # written before the commit it describes, and believed only once that commit is made
    keep_manifest(ctx)
