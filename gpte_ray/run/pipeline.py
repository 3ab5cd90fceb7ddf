"""One `index` run: scan -> diff -> tokenize -> embed -> write fragments -> ONE commit -> finish.

The driver holds counts and what the one commit needs: ids, hashes and texts stay on the
cluster and in staging files (diff.py, resume.py). Work is staged as it completes (Lance
fragments plus a marker per written window, under a run id derived from the table version,
the model fingerprint and the diff), so a run killed at any point resumes where it stopped,
and a run that already committed is never committed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from gpte_ray.config import ConfigError, JobConfig
from gpte_ray.input.audit import source_rows
from gpte_ray.input.pins import ShardChangedError, pins_dir, read_pins
from gpte_ray.input.preflight import preflight
from gpte_ray.input.sources import ShardError
from gpte_ray.model.spec import ModelSpec, resolve_model
from gpte_ray.plan.diff import (
    SMALL_ROWS,
    DeleteIds,
    Diff,
    calibration_rows,
    compute_diff,
    drop_old_plans,
    drop_plan,
    new_plan_dir,
    read_planned,
)
from gpte_ray.plan.kept import copy_shard, resolve_kept
from gpte_ray.report.run_report import TREND_RUNS, Progress, ProgressCounter, RunReport, trend_row
from gpte_ray.run.resume import StagedState, read_skip, staged_state
from gpte_ray.run.stages import LENGTH_EDGES, EmbedStage, TokenizeStage, WindowWriter, scan_shard
from gpte_ray.storage import join, lance_options
from gpte_ray.store.lock import FenceError, LockLostError, TableLock
from gpte_ray.store.staging import StagingWriter, staged_ids
from gpte_ray.store.table import CommitPlan, DuplicateKeyError, TableStore, kept_fields, table_schema
from gpte_ray.store.upkeep import run_upkeep

__all__ = ["connect_ray", "run_index"]

log = logging.getLogger("gpte_ray")

# tokens per micro-batch. On CPU smaller batches keep activations in cache: MiniLM ran 6-10%
# faster at 4096 than at 8192 (benchmarks/microbatch.py, both corpora); 2048 cost a tiny model more.
DEFAULT_BUDGET = {"cpu": 4096, "cuda": 32768}


def _is_local(address: str | None) -> bool:
    """Whether `address` asks for a private local Ray (started by this process)."""
    return address in (None, "", "local")


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (a job's own cluster under `ray job submit`), or start a
    private local one for address 'local'/None. Never attaches to a stray cluster by accident."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if _is_local(address):
        # Ray >= 2.52 turns token auth on for a new local cluster unless RAY_AUTH_MODE says
        # otherwise, and writes ~/.ray/auth_token; a later `ray start --head` then finds that
        # file and demands the token from every submitter. Nothing outside this process can
        # reach the private cluster (no dashboard, no client server), so auth stays off.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    import ray.data

    # our own progress line counts rows; Ray's per-operator bars would interleave with it
    ray.data.DataContext.get_current().enable_progress_bars = False


def _device(cfg: JobConfig, local: bool = False) -> str:
    """The embed device. `local`: Ray was started by this process (no autoscaler can add GPUs)."""
    import ray

    if cfg.resources.device == "cuda" and local and not cfg.resources.fake_gpus and \
            not ray.cluster_resources().get("GPU", 0):
        # a cluster may still scale GPU workers up from zero; this private Ray never will
        raise ConfigError("config error: resources.device: cuda, but this machine has no GPU that Ray can see "
                          "(use --device auto or cpu, or --ray-address of a cluster with GPU workers)")
    if cfg.resources.device != "auto":
        return cfg.resources.device
    if cfg.resources.fake_gpus:
        return "cpu"
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def _check_fits(cfg: JobConfig, device: str) -> None:
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    r = cfg.resources
    if device == "cpu" and total and r.cpus_per_actor + r.read_cpus > total:
        raise ConfigError(
            f"config error: resources.cpus_per_actor: {r.cpus_per_actor} CPUs per actor plus "
            f"{r.read_cpus} for reads exceed the cluster's {total:g} CPUs (the job would hang)"
        )


MIN_TEXT_TOKENS = 8  # the smallest chunk of text worth a vector


def _check_room(spec: ModelSpec, num_cpus: float) -> None:
    """Refuse a max_length that leaves (almost) no room for text after the special tokens and
    the document prompt: every vector would silently embed a few tokens of each chunk. Runs
    where the tokenizer runs (a worker fetches the model; the driver never does)."""
    import ray

    def room() -> int:
        from gpte_ray.model.tokenize import TextTokenizer

        tok = TextTokenizer(spec)
        return len(tok.tok(spec.document_prefix + spec.document_suffix, add_special_tokens=True)["input_ids"])

    try:
        overhead = ray.get(ray.remote(num_cpus=num_cpus)(room).remote())
    except Exception as e:
        raise (_user_error(e) or e) from None
    if spec.max_length - overhead < MIN_TEXT_TOKENS:
        raise ConfigError(
            f"config error: model.max_length: {spec.max_length} leaves {max(0, spec.max_length - overhead)} "
            f"tokens for text after {overhead} special and prompt tokens (need at least {MIN_TEXT_TOKENS})"
        )


def _user_error(e: BaseException) -> BaseException | None:
    """The original ShardError/ConfigError inside a Ray-wrapped exception, if any.

    Ray re-raises a task's exception as a class derived from both RayTaskError and the
    original type, with the remote traceback as its message; the original is its `cause`.
    """
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ShardChangedError) and not isinstance(e, RayTaskError):
            return ShardChangedError(str(e).splitlines()[0], e.uri)
        if isinstance(e, (ShardError, ConfigError)) and not isinstance(e, RayTaskError):
            # our messages are one line; Ray may append its retry advice below it
            return type(e)(str(e).splitlines()[0])
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _scan(shards: list[str], cfg: JobConfig, plan_dir: str, storage_options: dict | None,
          forced_bad: dict[str, str]):
    """The manifest pass as a lazy Ray dataset (stages.SCAN_SCHEMA rows); the diff consumes it.
    The kept columns' types and the pin of each shard go to files in the plan folder."""
    import ray.data

    items = [{"shard": i, "uri": u} for i, u in enumerate(shards)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        scan_shard, fn_kwargs={"cfg": cfg.input, "types_dir": join(plan_dir, "kept_types"),
                               "storage_options": storage_options, "pins_dir": pins_dir(plan_dir),
                               "forced_bad": forced_bad},
        batch_size=1, batch_format="pyarrow", num_cpus=cfg.resources.read_cpus,
    )


def _read_table_ids(uri: str, version: int, storage_options: dict | None, columns: list[str]) -> pa.Table:
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    return ds.to_table(columns=columns, filter="chunk = 0")


def _table_ids(store: TableStore, current):
    """The table's documents (doc_id, content_hash and meta_hash if kept columns are stored,
    of chunk 0) at the planned version, as a lazy Ray dataset read by Lance in worker tasks."""
    import ray.data

    if current is None:
        return None
    columns = ["doc_id", "content_hash", *(["meta_hash"] if "meta_hash" in current.schema.names else [])]
    if current.count_rows() <= SMALL_ROWS:
        # one task: read_lance's per-fragment tasks cost more than they save on a small table
        task = ray.remote(num_cpus=0.5, max_retries=3)(_read_table_ids)
        return ray.data.from_arrow_refs([task.remote(store.uri, current.version, store.storage_options, columns)])
    return ray.data.read_lance(store.uri, version=current.version, columns=columns,
                               scanner_options={"filter": "chunk = 0"}, storage_options=store.storage_options)


def _calibrate(spec: ModelSpec, cfg: JobConfig, pins: dict[int, str], diff: Diff, device: str) -> dict:
    """int8 ranges from a fixed sample of this corpus, computed once per table."""
    import ray

    from gpte_ray.input.pins import Pin, read_pinned

    plan_dir, opts, sample = diff.plan_dir, diff.storage_options, cfg.model.calibration_sample

    gpus = cfg.resources.gpus_per_actor if device == "cuda" or cfg.resources.fake_gpus else 0

    @ray.remote(num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus)
    def calibrate() -> dict:
        import dataclasses

        import numpy as np
        import pyarrow.compute as pc

        from gpte_ray.model.quantize import calibrate_int8

        docs = []
        # the first documents to embed by doc_id: read from the plan here, not on the driver
        for shard, rows in sorted(calibration_rows(plan_dir, opts, sample).items()):
            for t in read_pinned(Pin.from_json(pins[shard]), shard, cfg.input, rows):
                docs.append(t.select(["doc_id", "text", "content_hash"]))
        # the job's own stages, with float32 output: the ranges of the vectors int8 will hold
        chunks = TokenizeStage(spec)(pa.concat_tables(docs))
        chunks = chunks.filter(pc.equal(chunks["chunk"], 0))
        f32 = dataclasses.replace(spec, precision="float32")
        b = cfg.batch
        stage = EmbedStage(f32, device, b.token_budget or DEFAULT_BUDGET[device], b.max_rows, b.min_fill,
                           cfg.resources.torch_threads, None)
        floats = np.stack(stage(chunks)["vector"].to_numpy(zero_copy_only=False))
        low, high = calibrate_int8(floats)
        return {"low": low, "high": high, "sample": chunks.num_rows}

    if not diff.embed:
        raise ConfigError("config error: model.precision: int8 needs documents to calibrate on")
    return ray.get(calibrate.remote())


@dataclass
class RunContext:
    """What the steps of one run share, instead of a dozen parameters each."""

    cfg: JobConfig
    spec: ModelSpec
    shards: list[str]
    store: TableStore
    device: str
    report: RunReport
    schema: pa.Schema | None = None
    run_id: str = ""
    calibration: dict | None = None
    overwrite: bool = False  # the run's fragments replace the table (first build, new model or kept columns)
    read_version: int | None = None  # the table version the run planned on
    pins: dict[int, str] = field(default_factory=dict)  # shard -> its scan pin (pins.Pin JSON)


def _embed(ctx: RunContext, state: StagedState) -> None:
    """Stream the documents still to embed (`state`'s plan) through tokenize -> embed -> write."""
    import ray.data
    from ray.data import ActorPoolStrategy

    cfg, spec, store, device, report = ctx.cfg, ctx.spec, ctx.store, ctx.device, ctx.report
    r, b = cfg.resources, cfg.batch
    # one read task per shard with work; each reads its own rows from the plan
    items = [{"shard": s, "pin": ctx.pins[s]} for s in state.shards]
    # chunks already staged, of documents split across windows only: a few per window
    staged = read_skip(state.skip_dir, store.storage_options)
    budget = b.token_budget or DEFAULT_BUDGET[device]
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    writer = WindowWriter(StagingWriter(store, ctx.schema, ctx.run_id, ctx.overwrite))
    embed_resources = {"num_cpus": r.cpus_per_actor}
    if device == "cuda" or r.fake_gpus:
        embed_resources["num_gpus"] = r.gpus_per_actor
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_planned, batch_size=1, batch_format="pyarrow", num_cpus=r.read_cpus,
                     fn_kwargs={"cfg": cfg.input, "plan_dir": state.plan_dir, "storage_options": store.storage_options,
                                "kept_schema": kept_fields(ctx.schema)})
        .map_batches(TokenizeStage, fn_constructor_args=(spec, staged, max(1, int(r.tokenize_cpus))),
                     batch_size=b.window_rows, batch_format="pyarrow", num_cpus=r.tokenize_cpus,
                     # grown by Ray Data while its input queues up: capacity follows the embedders
                     compute=ActorPoolStrategy(min_size=1, max_size=r.max_actors * r.tokenize_actors_per_embed_actor))
        .map_batches(EmbedStage, fn_constructor_args=(spec, device, budget, b.max_rows, b.min_fill, r.torch_threads,
                                                      ctx.calibration, counter, writer),
                     batch_size=b.window_rows, batch_format="pyarrow",
                     # two windows per actor: one on the device while the other's fragment is written
                     compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors,
                                               max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
                     **embed_resources)
    )
    progress = Progress(state.todo)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            report.timeline.append(progress.update(*ray.get(counter.totals.remote())))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        actors = _collect(ds, report)
    finally:
        done.set()
        poller.join()
    on_accelerator = device == "cuda" or r.fake_gpus
    report.add_embed_actors(list(actors.values()), r.gpus_per_actor if on_accelerator else 0.0,
                            cfg.report.price_per_hour)
    report.timeline.append(progress.update(*ray.get(counter.totals.remote())))
    ray.kill(counter)


def _collect(ds, report: RunReport) -> dict[str, dict]:
    """Drive the pipeline; sum the writers' per-batch figures into the report. Returns each
    embed actor's latest cumulative figures, by actor id."""
    actors: dict[str, dict] = {}
    for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in out.to_pylist():
            last = actors.get(row["actor"])
            if last is None or row["actor_held_s"] > last["actor_held_s"]:
                actors[row["actor"]] = {k: v for k, v in row.items() if k.startswith("actor") or k == "node"}
            report.chunks_embedded += row["rows"]
            report.embed_nodes[row["node"]] = report.embed_nodes.get(row["node"], 0) + 1
            report.tokens += row["tokens"]
            report.padded_tokens += row["padded_tokens"]
            report.truncated += row["truncated"]
            report.oom_retries += row["oom_retries"]
            if row["rows"]:
                report.min_token_budget = min(report.min_token_budget or row["token_budget"], row["token_budget"])
            seconds = report.stage_seconds
            seconds["embed_compute"] = seconds.get("embed_compute", 0.0) + row["embed_seconds"]
            report.add_histograms(LENGTH_EDGES.tolist(), row["length_hist"], row["bucket_real"],
                                  row["bucket_computed"], row["bucket_batches"])
    return actors


def _staged_state(ctx: RunContext, diff: Diff, attempt: int, copies: bool = False) -> StagedState:
    """This run's staged fragments and what is left to embed (or, with `copies`, to copy),
    from its markers (on the cluster).

    A marker whose chunks overlap an earlier one (a retried window) is dropped, so no
    (doc_id, chunk) is ever committed twice; its documents are embedded again.
    """
    pins = set(ctx.pins.values())
    if copies:
        state = staged_state(ctx.store.staging.run_dir(ctx.run_id), ctx.store.storage_options, diff.meta_dir,
                             diff.metadata_updated, diff.meta_shards, join(diff.plan_dir, f"copy-todo-{attempt}"),
                             pins=pins)
    else:
        state = staged_state(ctx.store.staging.run_dir(ctx.run_id), ctx.store.storage_options, diff.plan_dir,
                             diff.embed, diff.shards, join(diff.plan_dir, f"todo-{attempt}"), pins=pins)
    if state.unpinned:
        log.warning("run %s: %d staged window(s) came from shards that changed since; their documents are "
                    "embedded again", ctx.run_id, state.unpinned)
    return state


def _stage_rest(ctx: RunContext, diff: Diff, state: StagedState, stage, copies: bool = False) -> StagedState:
    """Run `stage` (_embed or _copy) over what `state` has left, then read the state again, up
    to 3 times: a retried window's marker is dropped there and its documents done again."""
    for attempt in range(1, 4):
        if not state.todo:
            break
        try:
            stage(ctx, state)
        except Exception as e:
            raise (_user_error(e) or e) from None
        state = _staged_state(ctx, diff, attempt, copies)
    if state.todo:
        raise RuntimeError(f"{state.todo} documents could not be {'copied' if copies else 'staged'} after 3 attempts")
    return state


def _copy(ctx: RunContext, state: StagedState) -> None:
    """Stage the documents of `state`'s plan as copies of their table rows with their new kept
    values (one Ray task per shard); counts the rows in the report's chunks_copied."""
    import ray

    store = ctx.store
    skip = read_skip(state.skip_dir, store.storage_options)
    task = ray.remote(num_cpus=ctx.cfg.resources.read_cpus, max_retries=3)(copy_shard)
    ctx.report.chunks_copied += sum(ray.get([
        task.remote(ctx.shards[s], s, ctx.cfg.input, state.plan_dir, store.db, store.table, store.storage_options,
                    ctx.read_version, ctx.schema, ctx.run_id, ctx.overwrite, skip, ctx.pins[s])
        for s in state.shards]))


def run_index(cfg: JobConfig, ray_address: str | None = "local", num_cpus: int | None = None) -> RunReport:
    """Make the table reflect the corpus; returns the run report."""
    t0 = time.perf_counter()
    report = RunReport(table=cfg.output.table, started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"config error: --num-cpus: {num_cpus} (a local Ray needs at least 1 CPU)")
    opts = lance_options(cfg.output.storage_options, cfg.output.db)
    store = TableStore(cfg.output.db, cfg.output.table, opts)  # validates the table name
    spec = resolve_model(cfg.model)
    report.set_model(spec.fingerprint())
    shards = preflight(cfg)  # the user's columns and template, checked before Ray starts
    connect_ray(ray_address, num_cpus)
    device = _device(cfg, local=_is_local(ray_address))
    _check_fits(cfg, device)
    if cfg.model.max_length is not None:
        _check_room(spec, cfg.resources.tokenize_cpus)
    report.device = device
    lock = TableLock(cfg.output.db, cfg.output.table, opts, lease_s=cfg.output.lease_seconds)
    lock.acquire(run_id="planning")
    # the diff runs on the cluster: the driver gets counts, the per-document lists stay in
    # files under this run's plan folder in staging (a crashed run's plan is never reused)
    plan_dir = new_plan_dir(store.staging.plans)
    forced_bad: dict[str, str] = {}  # shards that changed under this run, left as they are (--skip-bad-shards)
    try:
        drop_old_plans(store.staging.plans, store.storage_options)
        while True:
            try:
                _run_locked(cfg, spec, shards, device, store, lock, report, plan_dir, forced_bad)
                break
            except ShardChangedError as e:
                if not cfg.input.skip_bad_shards or e.uri not in shards or e.uri in forced_bad:
                    raise
                # plan again without it: its documents stay as they are tonight, counted as a bad shard
                log.warning("%s", str(e).split("; nothing was committed")[0])
                forced_bad[e.uri] = "changed while the run read it; its documents were left as they were"
                drop_plan(plan_dir, store.storage_options)
                plan_dir = new_plan_dir(store.staging.plans)
                report = _fresh_report(report)
        try:
            drop_plan(plan_dir, store.storage_options)
        except OSError as e:  # the night is done; a plan left behind goes after PLAN_TTL_S
            log.warning("run %s: could not delete its plan folder: %s", report.run_id, e)
    except BaseException as e:  # Ctrl-C too: its plan folder goes with it
        # a run that lost its lease (paused past it) may fail on files the new holder has
        # cleaned up: say what happened, not which file was missing
        held = True
        try:
            lock.check()
        except LockLostError as lost:
            if isinstance(e, Exception) and not isinstance(e, FenceError):
                raise lost from None
            held = False
        except OSError:
            held = False
        if held:  # a rerun plans afresh
            try:
                drop_plan(plan_dir, store.storage_options)
            except OSError:
                pass
        raise
    finally:
        lock.release()
    report.seconds = time.perf_counter() - t0
    report.finish()
    if report.run_id:
        from gpte_ray.report.html import render_html_report

        report.report_file = store.report_uri(report.run_id)
        # earlier runs' lines (a rerun of this run id replaces its own)
        earlier = [r for r in store.recent_reports(TREND_RUNS) if r.get("run_id") != report.run_id]
        report.trend = [trend_row(r) for r in earlier][-(TREND_RUNS - 1):] + [trend_row(asdict(report))]
        line = report.to_json()
        store.write_report(report.run_id, line, render_html_report(json.loads(line)))
    return report


def _fresh_report(old: RunReport) -> RunReport:
    """A new report for a run that plans again, with what was known before planning."""
    report = RunReport(table=old.table, started=old.started)
    report.model, report.device = old.model, old.device
    return report


def _holds(lock: TableLock) -> bool:
    """Whether the lease is still this run's (read now, not only as the heartbeat last saw it)."""
    try:
        lock.check()
    except (LockLostError, OSError):
        return False
    return True


def _run_locked(cfg: JobConfig, spec: ModelSpec, shards: list[str], device: str, store: TableStore,
                lock: TableLock, report: RunReport, plan_dir: str, forced_bad: dict[str, str]) -> None:
    current = store.open()
    rebuild = current is not None and store.fingerprint(current) != spec.fingerprint()
    report.version_before = current.version if current is not None else None
    if current is not None and not rebuild and ("text" in current.schema.names) != cfg.output.store_text:
        # unchanged documents would keep (or lack) their text: the table would be a mix
        was = "with" if "text" in current.schema.names else "without"
        raise ConfigError(
            f"config error: output.store_text: {str(cfg.output.store_text).lower()}, but table "
            f"{store.table!r} was built {was} the chunk texts; keep the table's setting, or index into a new table"
        )
    types_dir = join(plan_dir, "kept_types")
    kept: dict[str, pa.Schema] = {}

    def kept_changed() -> bool:
        """Called by the diff after the scan: the kept columns' schema, and whether it is new."""
        table_kept = kept_fields(current.schema) if current is not None and not rebuild else None
        kept["schema"], changed = resolve_kept(types_dir, shards, store.storage_options, cfg.input.keep_columns,
                                               table_kept)
        return changed

    # (a rebuild reads the old ids too: the mass-delete guard compares old and new documents)
    rows_hint = (current.count_rows() if current is not None else 0) + 100_000 * len(shards)
    try:
        diff = compute_diff(_scan(shards, cfg, plan_dir, store.storage_options, forced_bad), _table_ids(store, current),
                            plan_dir,
                            shards, store.storage_options, rebuild, rows_hint, cfg.output.max_delete_fraction,
                            cfg.output.allow_mass_delete, kept_changed=kept_changed)
    except Exception as e:
        raise (_user_error(e) or e) from None  # (run_index drops the plans of a failed run)
    report.stage_seconds.update(diff.seconds)  # table_ids, scan, diff
    report.take_counts(diff)
    for b in diff.quarantine_batches():  # counted by kind, a few examples kept
        report.add_quarantine(b.select(["shard", "row", "doc_id", "reason"]).to_pylist(), shards)
    whole = [{"shard": s, "row": -1} for s in sorted(diff.whole_shards())]
    report.source_rows = source_rows(shards, cfg.input, whole, cfg.resources.read_cpus)
    # what each shard was when the scan read it: the embed and copy passes read exactly that
    pins = {s: p.to_json() for s, p in read_pins(pins_dir(plan_dir), store.storage_options).items()}

    calibration = None
    if spec.precision == "int8":
        calibration = (store.calibration(current) if current is not None and not rebuild else None) or \
            _calibrate(spec, cfg, pins, diff, device)
    schema = table_schema(spec, cfg.output.store_text, calibration, kept["schema"])
    key = f"{report.version_before}|{spec.fingerprint_digest()}|{diff.digest()}|{cfg.output.store_text}"
    if len(kept["schema"]):
        key += f"|{kept['schema']}"
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    report.run_id = run_id
    lock.relabel(run_id)
    for stale in store.stale_staging(keep=run_id):
        store.drop_staging(stale)  # staged under another table version or corpus: never committable

    ctx = RunContext(cfg, spec, shards, store, device, report, schema, run_id, calibration,
                     diff.overwrite or current is None, report.version_before, pins)
    t = time.perf_counter()
    state = _staged_state(ctx, diff, 0)
    if store.missing_files(state.fragments):
        # staged for a table folder that was deleted since: its fragments can never be committed
        log.warning("run %s: staged data files are gone; embedding again", run_id)
        store.drop_staging(run_id)
        state = _staged_state(ctx, diff, 0)
    report.stage_seconds["resume_state"] = time.perf_counter() - t
    report.chunks_resumed = state.chunks
    t = time.perf_counter()
    state = _stage_rest(ctx, diff, state, _embed)
    report.stage_seconds["embed"] = time.perf_counter() - t
    report.docs_embedded = diff.embed
    if diff.metadata_updated:
        # documents with new kept values: their rows copied, vectors and all (after the embed
        # pass, so this state's fragments are every marker's of the run)
        t = time.perf_counter()
        state = _stage_rest(ctx, diff, _staged_state(ctx, diff, 0, copies=True), _copy, copies=True)
        report.stage_seconds["copy"] = time.perf_counter() - t
    report.chunks_written = state.chunks

    t = time.perf_counter()
    ds = current
    if diff.embed or diff.replaced or diff.overwrite or current is None:
        commit = CommitPlan(run_id=run_id, read_version=report.version_before, overwrite=ctx.overwrite,
                            delete_doc_ids=DeleteIds(diff), fragments=state.fragments,
                            staged_ids=lambda: staged_ids(store.staging.run_dir(run_id), state.markers,
                                                          store.storage_options))
        latest = store.open()
        if latest is not None and store.committed_run(latest, commit):
            # a run with the very same work (same version, corpus and model: same run id) that
            # took over while this one was paused has committed it already
            log.warning("run %s: the same work was already committed by another run", run_id)
            ds = latest
        else:
            try:
                ds = store.commit(commit, schema, lock)
            except (FenceError, DuplicateKeyError):
                store.drop_staging(run_id)  # never committable now: the table moved on without it
                raise
            report.committed = True
    report.version = ds.version if ds is not None else None
    report.stage_seconds["commit"] = time.perf_counter() - t
    if diff.quarantined and cfg.output.quarantine:
        report.quarantine_file = diff.write_quarantine(
            join(store.db, f"{store.table}.quarantine", f"{run_id}.parquet"), run_id)
    store.drop_staging(run_id)

    t = time.perf_counter()
    if ds is not None and _holds(lock):
        # (a run that lost its lease after committing leaves upkeep to the new holder: its
        # compaction would make the new holder's commit fail with "the table changed")
        # a Ray task with its own CPU, on a worker: the head (often 0 CPUs) stays small
        report.upkeep = run_upkeep(store.uri, store.storage_options, ds.version, cfg.output, run_id,
                                   spec.fingerprint(), report.committed)
        report.version = report.upkeep["version"]
    report.stage_seconds["upkeep"] = time.perf_counter() - t
