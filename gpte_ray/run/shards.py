"""A run's shards against the table's shard manifest: which are read, the diff over what they
touch, and the manifest of the version the run leaves (plan.shards, store.manifest)."""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from gpte_ray.input.pins import pins_dir, take_pins
from gpte_ray.plan.diff import Diff, FullScanNeeded, compute_diff
from gpte_ray.plan.files import drop_plan, new_plan_dir
from gpte_ray.plan.shards import ShardChoice, carried_all, choose_shards, input_key, read_entries, touched
from gpte_ray.run.context import RunContext
from gpte_ray.run.stages import SCAN_SCHEMA
from gpte_ray.storage import join
from gpte_ray.store.manifest import (
    MANIFEST_SCHEMA,
    Manifest,
    ManifestLayout,
    commit_name,
    last_commit,
    load_manifest,
    prune,
    publish_rows,
    refresh_name,
    write_manifest,
)

__all__ = ["keep_manifest", "manifest_layout", "plan_shards"]

log = logging.getLogger("gpte_ray")


def manifest_layout(store) -> ManifestLayout:
    return ManifestLayout(store.staging.root)


def plan_shards(ctx: RunContext, scan, table_ids, kept_changed) -> Diff:
    """Choose the shards to read and diff them (`scan(ctx, positions)`: the scan dataset;
    `table_ids(ctx)`: the whole table's ids, for a full scan; `kept_changed(ctx)`: the kept
    columns' schema, and whether it changes). An incremental diff that finds the kept columns
    changing plans again, reading every shard, in a fresh plan folder."""
    ctx.shard_choice = _choose(ctx)
    try:
        return _diff(ctx, ctx.shard_choice, scan, table_ids, kept_changed)
    except FullScanNeeded as e:
        drop_plan(ctx.plan_dir, ctx.store.storage_options)
        ctx.plan_dir = new_plan_dir(ctx.store.staging.plans)
        ctx.shard_choice = _choose(ctx, str(e))
        return _diff(ctx, ctx.shard_choice, scan, table_ids, kept_changed)


def _full_scan_why(ctx: RunContext, base: Manifest | None) -> str:
    """Why this run reads every shard ("" when it need not)."""
    cfg = ctx.cfg.input
    if ctx.current is None:
        return "a new table"
    if ctx.rebuild:
        return "a new model: every document is embedded again"
    if cfg.full_scan:
        return "--full-scan"
    if base is None:
        return "no shard manifest for this version of the table"
    if base.input_key != input_key(cfg):
        return "the input settings changed"
    if base.since_full + 1 >= cfg.full_scan_every:
        return f"every {cfg.full_scan_every} runs (input.full_scan_every)"
    return ""


def _choose(ctx: RunContext, why: str = "") -> ShardChoice:
    store = ctx.store
    base = load_manifest(store.db, store.table, manifest_layout(store), ctx.read_version, store.storage_options)
    why = why or _full_scan_why(ctx, base)
    now = [] if why else take_pins(ctx.shards, ctx.cfg.input.storage_options)
    choice = choose_shards(ctx.shards, now, base, why)
    log.info("shards: %d read, %d skipped (unchanged), %d vanished%s", len(choice.read), len(choice.skipped),
             len(choice.vanished), f"; full scan: {choice.why}" if choice.full else "")
    return choice


def _diff(ctx: RunContext, choice: ShardChoice, scan, table_ids, kept_changed) -> Diff:
    import ray.data

    cfg, store = ctx.cfg, ctx.store
    kwargs = {"plan_dir": ctx.plan_dir, "shards": ctx.shards, "storage_options": store.storage_options,
              "rebuild": ctx.rebuild, "max_delete_fraction": cfg.output.max_delete_fraction,
              "allow_mass_delete": cfg.output.allow_mass_delete, "kept_changed": lambda: kept_changed(ctx),
              "small_rows": cfg.resources.one_task_rows}
    if choice.full:
        # (a rebuild reads the old ids too: the mass-delete guard compares old and new documents)
        hint = (ctx.current.count_rows() if ctx.current is not None else 0) + 100_000 * len(ctx.shards)
        return compute_diff(scan(ctx, choice.read), table_ids(ctx), rows_hint=hint, **kwargs)
    if choice.quiet:  # nothing new, changed or gone: no Ray work at all
        d = Diff(plan_dir=ctx.plan_dir, storage_options=store.storage_options,
                 digest_parts=((0, 0), 0, False, (0, 0), 0), seconds={"scan": 0.0, "diff": 0.0})
        carried_all(choice).add_to(d)
        kept_changed(ctx)  # the kept columns' schema: the table's
        return d
    t = time.perf_counter()
    read = scan(ctx, choice.read)
    if isinstance(read, list):  # scanned here (a small night): into the object store for the tasks below
        read = ray.data.from_arrow(read or [SCAN_SCHEMA.empty_table()])
    read = read.materialize()  # used twice: the touched ids, then the diff
    columns = ["doc_id", "content_hash", *(["meta_hash"] if "meta_hash" in ctx.current.schema.names else [])]
    rows, table, carried = touched(read.to_arrow_refs(), choice, manifest_layout(store), store.storage_options,
                                   (store.uri, ctx.current.version, columns))
    scanned = time.perf_counter() - t
    d = compute_diff(read.union(ray.data.from_arrow_refs(rows)), ray.data.from_arrow_refs(table),
                     rows_hint=100_000 * len(choice.read), carried=carried, **kwargs)
    d.seconds["scan"] = d.seconds.get("scan", 0.0) + scanned
    return d


def keep_manifest(ctx: RunContext) -> None:
    """The shard manifest of the table version this run leaves: the next version's, written
    before its commit (believed once the commit is made), or, when the run commits nothing, a
    refresh of the current one with the fingerprints read tonight. None while a shard could not
    be read (the documents it held are left as they were: the next run reads it again)."""
    diff, choice, store = ctx.diff, ctx.shard_choice, ctx.store
    if choice is None or diff.bad_shards:
        return
    entries = read_entries(pins_dir(ctx.plan_dir), store.storage_options) if choice.read else {}
    if len(entries) != len(choice.read):
        return
    rows = [{"uri": ctx.shards[i], **e} for i, e in sorted(entries.items())] + \
        [{k: e[k] for k in MANIFEST_SCHEMA.names} for _, e in sorted(choice.skipped.items())]
    manifest = Manifest(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                        docs=diff.new + diff.changed + diff.unchanged + diff.metadata_updated,
                        since_full=0 if choice.full else choice.base.since_full + 1,
                        input_key=input_key(ctx.cfg.input))
    layout = manifest_layout(store)
    if diff.embed or diff.replaced or diff.overwrite or ctx.current is None:  # the run commits (run.finish)
        name = commit_name((ctx.read_version or 0) + 1, ctx.plan_id)
    else:
        name = refresh_name(ctx.read_version, last_commit(store.db, store.table, ctx.read_version,
                                                          store.storage_options))
    staged = {e["rows_key"]: join(pins_dir(ctx.plan_dir), f"{i:010d}.rows.parquet") for i, e in entries.items()}
    publish_rows(layout, staged, store.storage_options)  # the rows files first: the manifest names them
    write_manifest(layout, name, manifest, store.storage_options)
    if choice.base is not None:
        prune(layout, choice.base, store.storage_options)
