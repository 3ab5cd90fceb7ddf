"""The embed pass: the documents still to embed stream through read -> tokenize -> embed, and
each window is staged as it completes; a rerun resumes from what is staged."""

from __future__ import annotations

import logging
import threading
import time

from gpte_ray.config import JobConfig
from gpte_ray.console import say
from gpte_ray.report.run_report import Progress, ProgressCounter, RunReport
from gpte_ray.run.cluster import user_error
from gpte_ray.run.context import RunContext
from gpte_ray.run.resume import StagedState, read_skip, staged_state
from gpte_ray.run.stages import (
    LENGTH_EDGES,
    EmbedOptions,
    EmbedStage,
    TokenizeEmbedStage,
    TokenizeStage,
    WindowWriter,
    read_planned,
)
from gpte_ray.storage import join
from gpte_ray.store.lock import TableLock
from gpte_ray.store.staging import StagingWriter
from gpte_ray.store.table import kept_fields

__all__ = ["embed_options", "stage", "stage_rest", "staged"]

log = logging.getLogger("gpte_ray")

def embed_options(cfg: JobConfig, device: str) -> EmbedOptions:
    b = cfg.batch
    return EmbedOptions(device=device, token_budget=b.token_budget, max_rows=b.max_rows,
                        min_fill=b.min_fill, torch_threads=cfg.resources.torch_threads,
                        cpu_lanes=cfg.resources.cpu_lanes)


def stage(ctx: RunContext) -> None:
    """Stage what the plan needs: resume what is staged, embed the rest, copy kept-column updates."""
    from gpte_ray.run.copy import copy_pass

    report, diff, store = ctx.report, ctx.diff, ctx.store
    t = time.perf_counter()
    state = staged(ctx, 0)
    if store.missing_files(state.fragments):
        # staged for a table folder that was deleted since: its fragments can never be committed
        log.warning("run %s: staged data files are gone; embedding again", ctx.run_id)
        store.drop_staging(ctx.plan_id)
        state = staged(ctx, 0)
    report.stage_seconds["resume_state"] = time.perf_counter() - t
    report.chunks_resumed = state.chunks
    if state.chunks:
        say(f"gpte-ray: resuming {state.chunks} staged chunks ({diff.embed - state.todo} documents) of an "
            f"earlier run of this plan; {state.todo} documents left to embed")
    t = time.perf_counter()
    state = stage_rest(ctx, state, embed_pass)
    report.stage_seconds["embed"] = time.perf_counter() - t
    report.docs_embedded = diff.embed
    if diff.metadata_updated:
        # documents with new kept values: their rows copied, vectors and all (after the embed
        # pass, so this state's fragments are every marker's of the run)
        t = time.perf_counter()
        state = stage_rest(ctx, staged(ctx, 0, copies=True), copy_pass, copies=True)
        report.stage_seconds["copy"] = time.perf_counter() - t
    report.chunks_written = state.chunks
    ctx.state = state


def staged(ctx: RunContext, attempt: int, copies: bool = False) -> StagedState:
    """This run's staged fragments and what is left to embed (or, with `copies`, to copy),
    from its markers (on the cluster). A retried window's marker, and a marker read from a shard
    that changed since, are dropped: their documents are embedded again."""
    diff = ctx.diff
    plan_dir, planned, shards = (diff.meta_dir, diff.metadata_updated, diff.meta_shards) if copies else \
        (diff.plan_dir, diff.embed, diff.shards)
    state = staged_state(ctx.store.staging.run_dir(ctx.plan_id), ctx.store.storage_options, plan_dir=plan_dir,
                         planned=planned, planned_shards=shards,
                         out_dir=join(diff.plan_dir, f"{'copy-todo' if copies else 'todo'}-{attempt}"),
                         pins=set(ctx.pins.values()))
    if state.unpinned:
        log.warning("run %s: %d staged window(s) came from shards that changed since; their documents are "
                    "embedded again", ctx.run_id, state.unpinned)
    return state


def stage_rest(ctx: RunContext, state: StagedState, run_pass, copies: bool = False) -> StagedState:
    """Run `run_pass` (embed or copy) over what `state` has left, then read the state again, up
    to 3 times: a retried window's marker is dropped there and its documents done again."""
    for attempt in range(1, 4):
        if not state.todo:
            break
        try:
            run_pass(ctx, state)
        except Exception as e:
            raise (user_error(e) or e) from None
        state = staged(ctx, attempt, copies)
    if state.todo:
        raise RuntimeError(f"{state.todo} documents could not be {'copied' if copies else 'staged'} after 3 attempts")
    return state


def embed_pass(ctx: RunContext, state: StagedState) -> None:
    """Stream the documents still to embed (`state`'s plan) through tokenize -> embed -> write."""
    import ray

    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    ds = _pipeline(ctx, state, counter)
    # the plan's documents and chunks, those staged by an earlier run included (as the report counts them)
    progress = Progress(ctx.diff.embed, resumed=(ctx.diff.embed - state.todo, state.chunks))
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            ctx.report.timeline.append(progress.update(*ray.get(counter.totals.remote())))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        actors = _collect(ds, ctx.report, ctx.lock)
    finally:
        done.set()
        poller.join()
    r = ctx.cfg.resources
    ctx.report.add_embed_actors(list(actors.values()), r.gpus_per_actor if on_accelerator(ctx) else 0.0,
                                ctx.cfg.report.price_per_hour)
    ctx.report.timeline.append(progress.update(*ray.get(counter.totals.remote())))
    ray.kill(counter)


def _pipeline(ctx: RunContext, state: StagedState, counter):
    """The lazy Ray dataset: one read task per shard with work -> tokenize actors -> embed actors."""
    import ray.data
    from ray.data import ActorPoolStrategy

    r, b, store = ctx.cfg.resources, ctx.cfg.batch, ctx.store
    items = [{"shard": s, "pin": ctx.pins[s]} for s in state.shards]
    # chunks already staged, of documents split across windows only: a few per window
    skip = read_skip(state.skip_dir, store.storage_options)
    writer = WindowWriter(StagingWriter(store, ctx.schema, ctx.plan_id, ctx.overwrite))
    embed_resources = {"num_cpus": r.cpus_per_actor}
    if on_accelerator(ctx):
        embed_resources["num_gpus"] = r.gpus_per_actor
    read_kwargs = {"cfg": ctx.cfg.input, "plan_dir": state.plan_dir, "storage_options": store.storage_options,
                   "kept_schema": kept_fields(ctx.schema)}
    # a small run (its shards scanned in the driver) on CPUs reads one shard at a time: each
    # concurrent read task costs a worker process start, ~1 CPU-second, while the embed actor
    # loads its model, and a CPU forward is far slower than the reads. Accelerators may outrun
    # one reader: their reads stay parallel.
    serial = ctx.scanned_here and not on_accelerator(ctx)
    docs = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_planned, batch_size=1, batch_format="pyarrow", num_cpus=r.read_cpus, fn_kwargs=read_kwargs,
        concurrency=1 if serial else None)
    embed_kwargs = {"spec": ctx.spec, "options": embed_options(ctx.cfg, ctx.device), "calibration": ctx.calibration,
                    "progress": counter, "writer": writer}
    # two windows per actor: one on the device while the other's fragment is written
    embed_pool = ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors, max_concurrent_calls_per_actor=2,
                                   enable_true_multi_threading=True)
    if on_accelerator(ctx):
        return (
            docs.map_batches(TokenizeStage, batch_size=b.window_rows, batch_format="pyarrow", num_cpus=r.tokenize_cpus,
                             fn_constructor_kwargs={"spec": ctx.spec, "staged": skip,
                                                    "threads": max(1, int(r.tokenize_cpus))},
                             # grown by Ray Data while its input queues up: capacity follows the embedders
                             compute=ActorPoolStrategy(min_size=1,
                                                       max_size=r.max_actors * r.tokenize_actors_per_embed_actor))
            .map_batches(EmbedStage, batch_size=b.window_rows, batch_format="pyarrow",
                         fn_constructor_kwargs=embed_kwargs, compute=embed_pool, **embed_resources)
        )
    # on the CPU the embed actors tokenize their own windows (stages.TokenizeEmbedStage)
    return docs.map_batches(TokenizeEmbedStage, batch_size=b.window_rows, batch_format="pyarrow",
                            fn_constructor_kwargs={"tokenize": {"spec": ctx.spec, "staged": skip},
                                                   "embed": embed_kwargs},
                            compute=embed_pool, **embed_resources)


def on_accelerator(ctx: RunContext) -> bool:
    """The embed actors hold GPUs (real, or fake ones on a test cluster)."""
    return ctx.device == "cuda" or ctx.cfg.resources.fake_gpus


def _collect(ds, report: RunReport, lock: TableLock) -> dict[str, dict]:
    """Drive the pipeline; sum the writers' per-window figures into the report. Returns each
    embed actor's latest cumulative figures, by actor id. Stops at the first window after the
    lease was lost (a run paused past it wakes up): its work could never be committed."""
    actors: dict[str, dict] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if lock.lost_to is not None:
            lock.check()  # raises LockLostError
        for row in out.to_pylist():
            last = actors.get(row["actor"])
            if last is None or row["actor_held_s"] > last["actor_held_s"]:
                actors[row["actor"]] = {k: v for k, v in row.items() if k.startswith("actor") or k == "node"}
            report.add_window(row, LENGTH_EDGES.tolist())
    return actors
