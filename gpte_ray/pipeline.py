"""One `index` run: scan -> diff -> tokenize -> embed -> write fragments -> ONE commit -> finish.

The driver holds ids and hashes, never texts. Work is staged as it completes (Lance
fragments plus a marker per written batch, under a run id derived from the table version,
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

import pyarrow as pa

from gpte_ray.audit import source_rows
from gpte_ray.config import ConfigError, JobConfig
from gpte_ray.lock import FenceError, TableLock
from gpte_ray.plan import Plan, make_plan
from gpte_ray.preflight import preflight
from gpte_ray.report import Progress, ProgressCounter, RunReport
from gpte_ray.sources import ShardError
from gpte_ray.spec import ModelSpec, resolve_model
from gpte_ray.stages import LENGTH_EDGES, EmbedStage, TokenizeStage, WindowWriter, read_shard, scan_shard
from gpte_ray.storage import lance_options
from gpte_ray.table import CommitPlan, TableStore, table_schema
from gpte_ray.upkeep import finish_table

__all__ = ["connect_ray", "run_index"]

log = logging.getLogger("gpte_ray")

DEFAULT_BUDGET = {"cpu": 8192, "cuda": 32768}


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (a job's own cluster under `ray job submit`), or start a
    private local one for address 'local'/None. Never attaches to a stray cluster by accident."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "", "local"):
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


def _device(cfg: JobConfig) -> str:
    import ray

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
        from gpte_ray.tokenize import TextTokenizer

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
        if isinstance(e, (ShardError, ConfigError)) and not isinstance(e, RayTaskError):
            # our messages are one line; Ray may append its retry advice below it
            return type(e)(str(e).splitlines()[0])
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _scan(shards: list[str], cfg: JobConfig) -> list[tuple]:
    import ray.data

    items = [{"shard": i, "uri": u} for i, u in enumerate(shards)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        scan_shard, fn_kwargs={"cfg": cfg.input}, batch_size=1, batch_format="pyarrow",
        num_cpus=cfg.resources.read_cpus,
    )
    rows = []
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows.extend(zip(*(b[c].to_pylist() for c in ("shard", "row", "doc_id", "content_hash", "reason"))))
    return rows


def _calibrate(spec: ModelSpec, cfg: JobConfig, shards: list[str], plan: Plan, device: str) -> dict:
    """int8 ranges from a fixed sample of this corpus, computed once per table."""
    import ray

    from gpte_ray.sources import read_prepared

    sample = sorted(plan.embed_docs)[: cfg.model.calibration_sample]
    by_shard = plan.rows_by_shard(sample)

    gpus = cfg.resources.gpus_per_actor if device == "cuda" or cfg.resources.fake_gpus else 0

    @ray.remote(num_cpus=cfg.resources.cpus_per_actor, num_gpus=gpus)
    def calibrate() -> dict:
        import dataclasses

        import numpy as np

        from gpte_ray.embedder import Embedder, postprocess
        from gpte_ray.quantize import calibrate_int8
        from gpte_ray.tokenize import TextTokenizer

        texts = []
        for shard, rows in by_shard.items():
            for t in read_prepared(shards[shard], shard, cfg.input, rows=set(rows)):
                texts.extend(t["text"].to_pylist())
        tok, emb = TextTokenizer(spec), Embedder(spec, device)
        chunks = [c for c in tok.encode(texts) if c.chunk == 0]
        pooled = np.concatenate([
            emb.embed([c.input_ids for c in chunks[i : i + 32]], [c.prompt_len for c in chunks[i : i + 32]])
            for i in range(0, len(chunks), 32)
        ])
        floats = postprocess(pooled, dataclasses.replace(spec, precision="float32"), None)
        low, high = calibrate_int8(floats)
        return {"low": low, "high": high, "sample": len(chunks)}

    if not sample:
        raise ConfigError("config error: model.precision: int8 needs documents to calibrate on")
    return ray.get(calibrate.remote())


def _embed(cfg: JobConfig, spec: ModelSpec, shards: list[str], plan: Plan, doc_ids: list[str],
           staged: frozenset, store: TableStore, schema: pa.Schema, run_id: str, device: str,
           calibration: dict | None, overwrite: bool, report: RunReport) -> None:
    """Stream the selected documents through tokenize -> embed -> write."""
    import ray.data
    from ray.data import ActorPoolStrategy

    r, b = cfg.resources, cfg.batch
    items = [{"shard": s, "uri": shards[s], "rows": rows} for s, rows in plan.rows_by_shard(doc_ids).items()]
    budget = b.token_budget or DEFAULT_BUDGET[device]
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    writer = WindowWriter(store.db, store.table, store.storage_options, schema, run_id, overwrite)
    embed_resources = {"num_cpus": r.cpus_per_actor}
    if device == "cuda" or r.fake_gpus:
        embed_resources["num_gpus"] = r.gpus_per_actor
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(read_shard, fn_kwargs={"cfg": cfg.input}, batch_size=1, batch_format="pyarrow",
                     num_cpus=r.read_cpus)
        .map_batches(TokenizeStage, fn_constructor_args=(spec, staged), batch_size=b.window_rows,
                     batch_format="pyarrow", num_cpus=r.tokenize_cpus,
                     # grown by Ray Data while its input queues up: capacity follows the embedders
                     compute=ActorPoolStrategy(min_size=1, max_size=r.max_actors * r.tokenize_actors_per_embed_actor))
        .map_batches(EmbedStage, fn_constructor_args=(spec, device, budget, b.max_rows, b.min_fill, r.torch_threads,
                                                      calibration, counter, writer),
                     batch_size=b.window_rows, batch_format="pyarrow",
                     # two windows per actor: one on the device while the other's fragment is written
                     compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors,
                                               max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
                     **embed_resources)
    )
    progress = Progress(len(doc_ids))
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


def _staged_state(store: TableStore, run_id: str, plan: Plan) -> tuple[list, frozenset, list[str]]:
    """(fragments, staged keys, docs still to embed) from this run's markers.

    A marker whose keys overlap an earlier one (a retried batch) is dropped, so no
    (doc_id, chunk) is ever committed twice; its documents are embedded again.
    """
    from lance.fragment import FragmentMetadata

    fragments, keys, n_chunks = [], set(), {}
    for m in store.read_markers(run_id):
        mkeys = {(d, c) for d, c in m["keys"]}
        if mkeys & keys:
            continue
        keys |= mkeys
        n_chunks.update(m["n_chunks"])
        fragments += [FragmentMetadata.from_json(json.dumps(f)) for f in m["fragments"]]
    done = {}
    for d, _ in keys:
        done[d] = done.get(d, 0) + 1
    todo = [d for d in sorted(plan.embed_docs) if done.get(d, 0) != n_chunks.get(d, -1)]
    return fragments, frozenset(keys), todo


def run_index(cfg: JobConfig, ray_address: str | None = "local", num_cpus: int | None = None) -> RunReport:
    """Make the table reflect the corpus; returns the run report."""
    t0 = time.perf_counter()
    report = RunReport(table=cfg.output.table)
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"config error: --num-cpus: {num_cpus} (a local Ray needs at least 1 CPU)")
    opts = lance_options(cfg.output.storage_options, cfg.output.db)
    store = TableStore(cfg.output.db, cfg.output.table, opts)  # validates the table name
    spec = resolve_model(cfg.model)
    report.set_model(spec.fingerprint())
    shards = preflight(cfg)  # the user's columns and template, checked before Ray starts
    connect_ray(ray_address, num_cpus)
    device = _device(cfg)
    _check_fits(cfg, device)
    if cfg.model.max_length is not None:
        _check_room(spec, cfg.resources.tokenize_cpus)
    report.device = device
    lock = TableLock(cfg.output.db, cfg.output.table, opts, lease_s=cfg.output.lease_seconds)
    lock.acquire(run_id="planning")
    try:
        _run_locked(cfg, spec, shards, device, store, lock, report)
    finally:
        lock.release()
    report.seconds = time.perf_counter() - t0
    report.finish()
    if report.run_id:
        from gpte_ray.html_report import render_html_report

        report.report_file = store.report_uri(report.run_id)
        line = report.to_json()
        store.write_report(report.run_id, line, render_html_report(json.loads(line)))
    return report


def _run_locked(cfg: JobConfig, spec: ModelSpec, shards: list[str], device: str, store: TableStore,
                lock: TableLock, report: RunReport) -> None:
    current = store.open()
    rebuild = current is not None and store.fingerprint(current) != spec.fingerprint()
    # a rebuild needs the old ids too: the mass-delete guard compares old and new documents
    existing = store.existing_docs(current) if current is not None else {}
    report.version_before = current.version if current is not None else None

    t = time.perf_counter()
    try:
        scan = _scan(shards, cfg)
    except Exception as e:
        raise (_user_error(e) or e) from None
    plan = make_plan(scan, shards, existing, rebuild, cfg.output.max_delete_fraction, cfg.output.allow_mass_delete)
    report.stage_seconds["scan"] = time.perf_counter() - t
    for k in ("rows_read", "new", "changed", "unchanged", "quarantined", "deleted", "bad_shards", "rebuild"):
        setattr(report, k, getattr(plan, k))
    report.add_quarantine(plan.quarantine, shards)
    report.source_rows = source_rows(shards, cfg.input, plan.quarantine, cfg.resources.read_cpus)

    calibration = None
    if spec.precision == "int8":
        calibration = (store.calibration(current) if current is not None and not rebuild else None) or \
            _calibrate(spec, cfg, shards, plan, device)
    schema = table_schema(spec, cfg.output.store_text, calibration)
    key = f"{report.version_before}|{spec.fingerprint_digest()}|{plan.digest()}|{cfg.output.store_text}"
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    report.run_id = run_id
    lock.relabel(run_id)
    for stale in store.stale_staging(keep=run_id):
        store.drop_staging(stale)  # staged under another table version or corpus: never committable

    t = time.perf_counter()
    fragments, staged, todo = _staged_state(store, run_id, plan)
    if store.missing_files(fragments):
        # staged for a table folder that was deleted since: its fragments can never be committed
        log.warning("run %s: staged data files are gone; embedding again", run_id)
        store.drop_staging(run_id)
        fragments, staged, todo = _staged_state(store, run_id, plan)
    report.chunks_resumed = len(staged)
    for _ in range(3):
        if not todo:
            break
        try:
            _embed(cfg, spec, shards, plan, todo, staged, store, schema, run_id, device, calibration,
                   rebuild or current is None, report)
        except Exception as e:
            raise (_user_error(e) or e) from None
        fragments, staged, todo = _staged_state(store, run_id, plan)
    if todo:
        raise RuntimeError(f"{len(todo)} documents could not be staged after 3 attempts (first: {todo[0]})")
    report.stage_seconds["embed"] = time.perf_counter() - t
    report.docs_embedded = len(plan.embed_docs)
    report.chunks_written = len(staged)

    t = time.perf_counter()
    ds = current
    if plan.embed_docs or plan.delete_doc_ids or rebuild or current is None:
        commit = CommitPlan(run_id=run_id, read_version=report.version_before, overwrite=rebuild or current is None,
                            delete_doc_ids=plan.delete_doc_ids, fragments=fragments)
        latest = store.open()
        if latest is not None and store.committed_run(latest, commit):
            # a run with the very same work (same version, corpus and model: same run id) that
            # took over while this one was paused has committed it already
            log.warning("run %s: the same work was already committed by another run", run_id)
            ds = latest
        else:
            try:
                ds = store.commit(commit, schema, lock)
            except FenceError:
                store.drop_staging(run_id)  # never committable now: the table moved on without it
                raise
            report.committed = True
    report.version = ds.version if ds is not None else None
    report.stage_seconds["commit"] = time.perf_counter() - t
    if plan.quarantine and cfg.output.quarantine:
        report.quarantine_file = store.write_quarantine(run_id, plan.quarantine, shards)
    store.drop_staging(run_id)

    t = time.perf_counter()
    if ds is not None and lock.lost_to is None:
        # (a run that lost its lease after committing leaves upkeep to the new holder)
        report.upkeep = finish_table(ds, cfg.output, run_id, spec.fingerprint(), report.committed)
        report.version = ds.version
    report.stage_seconds["upkeep"] = time.perf_counter() - t
