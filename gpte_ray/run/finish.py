"""The end of a run: ONE fenced commit, the quarantine file, upkeep, the report files."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

from gpte_ray.plan.diff import DeleteIds
from gpte_ray.report.run_report import TREND_RUNS, trend_row
from gpte_ray.run.context import RunContext
from gpte_ray.storage import join
from gpte_ray.store.lock import FenceError, LockLostError, TableLock
from gpte_ray.store.staging import staged_ids
from gpte_ray.store.table import CommitPlan, DuplicateKeyError
from gpte_ray.store.upkeep import run_upkeep

__all__ = ["commit", "keep_quarantine", "upkeep", "write_report"]

log = logging.getLogger("gpte_ray")


def commit(ctx: RunContext) -> None:
    """Commit what is staged as one Lance transaction on the planned version, unless nothing changed."""
    diff, store, report, plan_id = ctx.diff, ctx.store, ctx.report, ctx.plan_id
    t = time.perf_counter()
    ctx.dataset = ctx.current
    if diff.embed or diff.replaced or diff.overwrite or ctx.current is None:
        # claimed under the plan id: a run that took over the same work commits it only once
        plan = CommitPlan(run_id=plan_id, read_version=ctx.read_version, overwrite=ctx.overwrite,
                          delete_doc_ids=DeleteIds(diff), fragments=ctx.state.fragments,
                          staged_ids=lambda: staged_ids(store.staging.run_dir(plan_id), ctx.state.markers,
                                                        store.storage_options))
        latest = store.open()
        if latest is not None and store.committed_run(latest, plan):
            # a run with the very same work (same version, corpus and model: same plan id) that
            # took over while this one was paused has committed it already
            log.warning("run %s: the same work was already committed by another run", ctx.run_id)
            ctx.dataset = latest
        else:
            try:
                ctx.dataset = store.commit(plan, ctx.schema, ctx.lock)
            except (FenceError, DuplicateKeyError):
                store.drop_staging(plan_id)  # never committable now: the table moved on without it
                raise
            report.committed = True
    report.version = ctx.dataset.version if ctx.dataset is not None else None
    report.stage_seconds["commit"] = time.perf_counter() - t


def keep_quarantine(ctx: RunContext) -> None:
    """Write the quarantined rows beside the table; drop the run's staging (committed or moot)."""
    if ctx.diff.quarantined and ctx.cfg.output.quarantine:
        uri = join(ctx.store.db, f"{ctx.store.table}.quarantine", f"{ctx.run_id}.parquet")
        ctx.report.quarantine_file = ctx.diff.write_quarantine(uri, ctx.run_id)
    ctx.store.drop_staging(ctx.plan_id)


def upkeep(ctx: RunContext) -> None:
    """Indexes, compaction and cleanup (a Ray task on a worker, a small table's here), if the lease is still ours."""
    t = time.perf_counter()
    # (a run that lost its lease after committing leaves upkeep to the new holder: its
    # compaction would make the new holder's commit fail with "the table changed")
    if ctx.dataset is not None and holds(ctx.lock):
        ctx.report.upkeep = run_upkeep(ctx.store.uri, ctx.store.storage_options, ctx.dataset.version, ctx.cfg.output,
                                       ctx.run_id, ctx.spec.fingerprint(), ctx.report.committed,
                                       rows=ctx.dataset.count_rows())
        ctx.report.version = ctx.report.upkeep["version"]
    ctx.report.stage_seconds["upkeep"] = time.perf_counter() - t


def holds(lock: TableLock) -> bool:
    """Whether the lease is still this run's (read now, not only as the heartbeat last saw it)."""
    try:
        lock.check()
    except (LockLostError, OSError):
        return False
    return True


def write_report(ctx: RunContext, t0: float) -> None:
    """The run report as JSON and HTML beside the table, with the table's trend of runs."""
    from gpte_ray.report.html import render_html_report

    report, store = ctx.report, ctx.store
    report.seconds = time.perf_counter() - t0
    report.finish()
    if not report.run_id:
        return
    report.report_file = store.report_uri(report.run_id)
    # earlier runs' lines (a rerun of this run id replaces its own)
    earlier = [r for r in store.recent_reports(TREND_RUNS) if r.get("run_id") != report.run_id]
    report.trend = [trend_row(r) for r in earlier][-(TREND_RUNS - 1):] + [trend_row(asdict(report))]
    line = report.to_json()
    store.write_report(report.run_id, line, render_html_report(json.loads(line)))
