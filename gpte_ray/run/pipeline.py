"""One `index` run: check -> plan (scan, diff) -> stage (tokenize, embed, write) -> ONE commit -> finish.

The driver holds counts and what the one commit needs: ids, hashes and texts stay on the
cluster and in staging files. Work is staged as it completes (a Lance fragment plus a marker
per window, under a plan id derived from the table version, the model fingerprint and the
diff), so a run killed at any point resumes where it stopped, and a plan that already
committed is never committed twice. Each run also has its own run id (its reports, quarantine
file and lease), which no other run shares.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from gpte_ray.config import ConfigError, JobConfig
from gpte_ray.console import one_line, say, unwrap
from gpte_ray.input.pins import ShardChangedError
from gpte_ray.input.preflight import preflight
from gpte_ray.model.spec import resolve_model
from gpte_ray.plan.files import drop_old_plans, drop_plan, new_plan_dir
from gpte_ray.report.run_report import RunReport
from gpte_ray.run.cluster import check_fits, check_room, choose_device, connect_ray, is_local
from gpte_ray.run.context import RunContext
from gpte_ray.run.embed import stage
from gpte_ray.run.finish import commit, keep_quarantine, upkeep, write_report
from gpte_ray.run.planning import calibrate, name_run, open_table, plan
from gpte_ray.run.rebuild import check_rebuild
from gpte_ray.storage import lance_options
from gpte_ray.store.lock import FenceError, LockLostError, TableLock
from gpte_ray.store.table import TableStore

__all__ = ["connect_ray", "run_index"]

log = logging.getLogger("gpte_ray")


def run_index(cfg: JobConfig, ray_address: str | None = "local", num_cpus: int | None = None) -> RunReport:
    """Make the table reflect the corpus; returns the run report."""
    t0 = time.perf_counter()
    ctx = start(cfg, num_cpus)  # the model, the table name, the shards and their columns: before Ray
    # the lease first (a second run is refused before it starts a cluster); the cluster starts
    # in the lease's settle wait
    ctx.lock.acquire(run_id=ctx.run_id, meanwhile=lambda: join_cluster(ctx, ray_address, num_cpus))
    try:
        locked(ctx)
    finally:
        ctx.lock.release()
    write_report(ctx, t0)
    return ctx.report


def start(cfg: JobConfig, num_cpus: int | None) -> RunContext:
    """The run's context, from checks that need no cluster (a second, not a cluster start)."""
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"config error: --num-cpus: {num_cpus} (a local Ray needs at least 1 CPU)")
    if cfg.model.revision and cfg.model.path is None:
        raise ConfigError("config error: model.revision (--revision): the packaged default model has one "
                          "revision; give --model <hub id> with --revision to pin a hub commit")
    report = RunReport(table=cfg.output.table, started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    opts = lance_options(cfg.output.storage_options, cfg.output.db)
    store = TableStore(cfg.output.db, cfg.output.table, opts)  # validates the table name
    spec = resolve_model(cfg.model)
    report.set_model(spec.fingerprint())
    rebuild = check_rebuild(cfg, store, spec)  # refused (or announced) before a cluster start
    if rebuild:
        say(f"gpte-ray: {rebuild}")
    shards = preflight(cfg)  # the user's columns and template
    lock = TableLock(cfg.output.db, cfg.output.table, opts, lease_s=cfg.output.lease_seconds)
    ctx = RunContext(cfg=cfg, spec=spec, shards=shards, store=store, lock=lock, report=report)
    report.run_id = ctx.run_id
    return ctx


def join_cluster(ctx: RunContext, ray_address: str | None, num_cpus: int | None) -> None:
    """Join (or start) Ray; choose the embed device; checks that need the cluster."""
    connect_ray(ray_address, num_cpus)
    ctx.device = ctx.report.device = choose_device(ctx.cfg, local=is_local(ray_address))
    check_fits(ctx.cfg, ctx.device)
    if ctx.cfg.model.max_length is not None:
        check_room(ctx.spec, ctx.cfg.resources.tokenize_cpus)


def locked(ctx: RunContext) -> None:
    """The run under the table's lease: plan and stage, commit, finish; its plan folder goes
    with it whether it succeeds or fails (a rerun plans afresh)."""
    ctx.plan_dir = new_plan_dir(ctx.store.staging.plans)
    try:
        try:
            drop_old_plans(ctx.store.staging.plans, ctx.store.storage_options)
            plan_and_stage(ctx)
            commit(ctx)
            finish(ctx)
        except BaseException as e:  # Ctrl-C too
            failed(ctx, e)
            raise
    finally:
        try:
            drop_plan(ctx.plan_dir, ctx.store.storage_options)
        except OSError as e:  # a plan left behind goes after PLAN_TTL_S
            log.warning("run %s: could not delete its plan folder: %s", ctx.run_id, e)


def finish(ctx: RunContext) -> None:
    """The quarantine file and upkeep. Once the commit has landed, a failure here (upkeep
    refused after a lost lease, a late compaction conflict) no longer fails the run: it says
    what it committed, keeps its report, and the next run repeats the upkeep."""
    try:
        keep_quarantine(ctx)
        upkeep(ctx)
    except Exception as e:  # noqa: BLE001 - the table is committed and exact; upkeep is repeatable
        if not ctx.report.committed:
            raise
        why = one_line(unwrap(e))
        ctx.report.upkeep = {"error": why}
        say(f"gpte-ray: run {ctx.run_id} committed version {ctx.report.version}, but its upkeep did not finish "
            f"({why}); the next run repeats it")


def plan_and_stage(ctx: RunContext) -> None:
    """Plan, then stage the work; with --skip-bad-shards, plan again without a shard that
    changed under the run (its documents stay as they are tonight, counted as a bad shard)."""
    while True:
        try:
            open_table(ctx)
            plan(ctx)
            calibrate(ctx)
            name_run(ctx)
            stage(ctx)
            return
        except ShardChangedError as e:
            if not ctx.cfg.input.skip_bad_shards or e.uri not in ctx.shards or e.uri in ctx.forced_bad:
                raise
            log.warning("%s", str(e).split("; nothing was committed")[0])
            ctx.forced_bad[e.uri] = "changed while the run read it; its documents were left as they were"
            drop_plan(ctx.plan_dir, ctx.store.storage_options)
            ctx.plan_dir = new_plan_dir(ctx.store.staging.plans)
            ctx.report, ctx.calibration = fresh_report(ctx.report), None


def fresh_report(old: RunReport) -> RunReport:
    """A new report for a run that plans again, with what was known before planning."""
    report = RunReport(table=old.table, started=old.started, run_id=old.run_id)
    report.model, report.device = old.model, old.device
    return report


def failed(ctx: RunContext, e: BaseException) -> None:
    """After a failure: if the lease was lost meanwhile, say so, with the error it caused."""
    # a run that lost its lease (paused past it) may fail on files the new holder has
    # cleaned up: the lost lease is the news, the error it caused is kept beside it
    if not isinstance(e, Exception) or isinstance(e, FenceError):
        return
    try:
        ctx.lock.check()
    except LockLostError as lost:
        raise LockLostError(f"{lost} (the error it caused: {one_line(unwrap(e))})") from None
    except OSError:
        return
