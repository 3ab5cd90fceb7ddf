"""Ray Data stages: callables over pyarrow batches. Heavy imports live in `__init__`.

scan_shard / read_planned (CPU tasks) -> TokenizeStage (CPU actors) -> EmbedStage (GPU or
CPU actor pool, each window staged by its WindowWriter as a Lance fragment and a marker).
On a CPU run, TokenizeEmbedStage runs the last two in the embed actors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.config import InputConfig
from gpte_ray.input.sources import ShardError
from gpte_ray.model.batching import plan_micro_batches
from gpte_ray.model.spec import ModelSpec
from gpte_ray.plan.files import planned_rows
from gpte_ray.storage import join
from gpte_ray.store.staging import StagingWriter

__all__ = ["PIN_COLUMN", "ActorFigures", "EmbedOptions", "EmbedStage", "TokenizeEmbedStage", "TokenizeStage",
           "WindowWriter",
           "default_budget", "read_planned", "scan_shard"]

SCAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string()),
     ("content_hash", pa.string()), ("reason", pa.string()), ("meta_hash", pa.string())]
)


def scan_shard(batch: pa.Table, cfg: InputConfig, types_dir: str | None = None,
               storage_options: dict | None = None, pins_dir: str | None = None,
               forced_bad: dict[str, str] | None = None, keep_rows: bool = False):
    """Manifest pass: ids, hashes and quarantine reasons of one shard (no texts), read whole
    under one pin (pins.py), which goes to a file in `pins_dir`; the types of its kept columns,
    if any, go to a file in `types_dir` (kept.write_shard_types). `forced_bad`: shards (uri ->
    reason) this run must leave as they are, unread (they changed under an earlier attempt).
    `keep_rows`: the shard's rows and manifest entry go beside its pin too (for the shard
    manifest: the runs that skip the shard while it stays unchanged count them)."""
    from gpte_ray.input.pins import scan_pinned, write_pin
    from gpte_ray.plan.kept import unify_kept, write_shard_types

    shard, uri = batch["shard"][0].as_py(), batch["uri"][0].as_py()
    types = None
    # a shard's rows go out only once all of it was read: a shard that fails half way (a
    # corrupt gzip tail, a kept column's type changing) is skipped whole, never half planned
    try:
        if forced_bad and uri in forced_bad:
            raise ShardError(forced_bad[uri])
        pin, tables = scan_pinned(uri, shard, cfg)
        rows = []
        for t in tables:
            if cfg.keep_columns:
                types = unify_kept(uri, types, t.select(cfg.keep_columns).schema)
            rows.append(t.select(SCAN_SCHEMA.names))
        if types is not None and types_dir is not None:
            write_shard_types(types_dir, shard, types, storage_options)
        if pins_dir is not None:
            write_pin(pins_dir, shard, pin, storage_options)
            if keep_rows:
                _keep_shard_rows(pins_dir, shard, pin.to_json(), rows, storage_options)
        yield from rows
    except ShardError as e:
        if not cfg.skip_bad_shards:
            raise
        yield pa.table(
            {"shard": [shard], "row": [-1], "doc_id": [None], "content_hash": [None],
             "reason": [f"bad shard: {e}"], "meta_hash": [None]},
            schema=SCAN_SCHEMA,
        )


def _keep_shard_rows(pins_dir: str, shard: int, pin: str, rows: list[pa.Table], storage_options: dict | None) -> None:
    """The shard's rows and its manifest entry, beside its pin in the plan folder; the run
    publishes them with its manifest (store.manifest.publish_rows), so a run that fails leaves
    nothing behind."""
    import json

    from gpte_ray.storage import filesystem
    from gpte_ray.store.manifest import rows_key, write_shard_rows

    table = pa.concat_tables(rows) if rows else SCAN_SCHEMA.empty_table()
    write_shard_rows(join(pins_dir, f"{shard:010d}.rows.parquet"), table, storage_options)
    entry = {"pin": pin, "rows_key": rows_key(pin), "rows": table.num_rows,
             "bad": table.num_rows - table["reason"].null_count}
    fs, path = filesystem(pins_dir, storage_options)
    with fs.open_output_stream(f"{path}/{shard:010d}.entry") as f:
        f.write(json.dumps(entry).encode())


# the pin (JSON) of the shard a document was read from, carried to its chunks' staging marker
PIN_COLUMN = "source_pin"


def read_planned(batch: pa.Table, cfg, plan_dir: str, storage_options: dict | None,
                 kept_schema: pa.Schema | None = None):
    """Embed pass read task: the prepared rows of one shard that the plan selected, read under
    the shard's scan pin and matched to the plan by id and hashes (pins.read_pinned), with the
    pin on every row so that the staged window records where it came from (kept columns cast
    to the table's `kept_schema`, so every block has the same schema)."""
    from gpte_ray.input.pins import Pin, read_pinned

    shard, pin = batch["shard"][0].as_py(), batch["pin"][0].as_py()
    plan = planned_rows(plan_dir, shard, storage_options)
    for t in read_pinned(Pin.from_json(pin), shard, cfg, plan, kept_schema=kept_schema):
        t = t.drop_columns(["reason", "row", "shard"])
        yield t.append_column(PIN_COLUMN, pa.array([pin] * t.num_rows, pa.string()))


CHUNK_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("chunk", pa.int32()), ("n_chunks", pa.int32()),
     ("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("prompt_len", pa.int32()),
     ("text", pa.string()), ("char_start", pa.int32()), ("char_end", pa.int32()),
     ("content_hash", pa.string()), ("truncated", pa.bool_())]
)
# what a document carries to each of its chunks beside CHUNK_SCHEMA: meta_hash and the kept columns
_DOC_COLUMNS = ("doc_id", "text", "content_hash")


class TokenizeStage:
    """Documents -> one row per chunk, with token ids. Skips chunks already staged.

    Other columns of the documents (meta_hash, kept source columns) are repeated on each of
    their chunks, after CHUNK_SCHEMA's."""

    def __init__(self, spec: ModelSpec, staged: frozenset[tuple[str, int]] = frozenset(), threads: int = 1):
        # A worker does not inherit the driver's environment: left unset, the Rust tokenizer
        # spreads every call over all of the node's cores, far past the CPUs this actor holds.
        # Read at each call; the thread pool's size at its first parallel call.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        from gpte_ray.model.tokenize import TextTokenizer

        self.tok = TextTokenizer(spec)
        self.staged = staged

    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = self.tok.encode_arrays(batch["text"].to_pylist(), role="document")
        doc = pa.array(enc.doc_index)
        n_chunks = np.bincount(enc.doc_index, minlength=batch.num_rows).astype(np.int32)
        lengths = enc.lengths.astype(np.int32)
        text = batch["text"].take(doc)
        split = np.flatnonzero(n_chunks[enc.doc_index] > 1)
        if len(split):  # chunks of long documents carry their own span of the text
            pieces = text.to_pylist()
            for i in split:
                pieces[i] = pieces[i][enc.char_start[i] : enc.char_end[i]]
            text = pa.array(pieces, pa.string())
        out = pa.table({
            "doc_id": batch["doc_id"].take(doc),
            "chunk": enc.chunk,
            "n_chunks": n_chunks[enc.doc_index],
            # ids stay flat from the tokenizer to the embedder: an Arrow list over one buffer
            "input_ids": pa.ListArray.from_arrays(pa.array(enc.offsets, pa.int32()), pa.array(enc.values, pa.int32())),
            "n_tokens": lengths,
            "prompt_len": enc.prompt_len,
            "text": text,
            "char_start": enc.char_start,
            "char_end": enc.char_end,
            "content_hash": batch["content_hash"].take(doc),
            "truncated": enc.truncated,
        }, schema=CHUNK_SCHEMA)
        for name in batch.column_names:
            if name not in _DOC_COLUMNS:
                out = out.append_column(name, batch[name].take(doc))
        return out.filter(self._unstaged(out)) if self.staged else out

    def _unstaged(self, chunks: pa.Table) -> np.ndarray:
        """Rows whose (doc_id, chunk) no earlier attempt of this run staged."""
        keys = zip(chunks["doc_id"].to_pylist(), chunks["chunk"].to_pylist())
        return np.fromiter(((d, c) not in self.staged for d, c in keys), dtype=np.bool_, count=chunks.num_rows)


# token-count bin edges for the report's histograms: bin i holds lengths in (edge[i-1], edge[i]]
LENGTH_EDGES = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])


class OutOfMemory(RuntimeError):
    """Raised by a micro-batch that did not fit the device (real or injected)."""


@dataclass(frozen=True)
class EmbedOptions:
    """How an embed actor batches and runs its windows."""

    device: str  # "cpu" or "cuda"
    token_budget: int | None = None  # tokens per micro-batch (halved on OOM); None: default_budget()
    max_rows: int = 256  # rows per micro-batch at most
    min_fill: float = 0.0  # cut a micro-batch early below this fill of real tokens (padded batches)
    torch_threads: int | None = None  # CPU threads for the forward (None: every core of the node)
    cpu_lanes: int | None = None  # CPU micro-batches side by side (None: one per thread, at most 4)


# default CPU lanes at most: each lane holds a micro-batch's activations; more than 4 is unmeasured
MAX_DEFAULT_LANES = 4

# tokens per micro-batch by default. On a GPU, large batches fill the device. On CPU it depends
# on the threads per forward: one forward over 2 threads ran all-MiniLM-L6-v2 in 19.0 s at 8192
# against 22.6 s at 4096 (2,000 real documents, 2 cores), but a 1-thread lane keeps a smaller
# batch's activations in its core's cache: the 5,000-document job's forward took 24.4 s at 1024,
# 25.1 s at 2048 and 26.1 s at 8192 (benchmarks/throughput.py --variant, issue 24).
DEFAULT_BUDGET = {"cuda": 32768, "cpu": 8192, "cpu_lane": 1024}


def default_budget(device: str, lanes: int) -> int:
    """Tokens per micro-batch when batch.token_budget is not set."""
    if device != "cpu":
        return DEFAULT_BUDGET["cuda"]
    return DEFAULT_BUDGET["cpu_lane"] if lanes > 1 else DEFAULT_BUDGET["cpu"]


class EmbedStage:
    """Sort the window Ray hands over by length, cut micro-batches by a token budget, embed,
    and (with a writer) stage the window as a Lance fragment before returning its summary.

    Writing here, not in a later stage, makes each window durable as soon as it is embedded:
    Ray Data merges a task's small outputs into one block, so a downstream writer would only
    see them when the whole task ends, and a crash would lose the task's work.

    Calls may overlap (the pipeline runs two per actor): the device is held by one window at a
    time, and a window's fragment and marker are written after it lets the device go, so
    window k is written while window k + 1 is embedded. A failed write fails its own window.
    """

    def __init__(self, spec: ModelSpec, options: EmbedOptions, calibration: dict | None = None, progress=None,
                 writer=None):
        born, born_cpu, born_wall = time.perf_counter(), time.process_time(), time.time()
        device = options.device
        if device == "cpu":
            # idle OpenMP threads spin by default; on a node shared with tokenizers, reads and
            # other actors a spinning thread holds the core its peer waits for (a stand-in
            # model's window measured 0.7 s passive vs 35 s spinning, two threads, loaded
            # machine). Read when torch loads, so set before this process first imports it.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

        from gpte_ray.model.embedder import Embedder

        self.spec = spec
        self.embedder = Embedder(spec, device)
        self.lanes, self.threads = None, 1
        if device == "cpu":
            self.lanes = self._cpu_lanes(options)
        self.budget = options.token_budget or default_budget(device, self.lanes.n if self.lanes else 1)
        self.max_rows = options.max_rows
        self.min_fill = options.min_fill
        self.calibration = calibration
        self.oom_retries = 0
        self.progress = Throttled(progress) if progress is not None else None  # a ProgressCounter actor
        self.writer = writer  # a WindowWriter, or None to return the vectors
        # with lanes, two windows share the CPU: the second's micro-batches fill the first's tail
        self.figures = ActorFigures(born, born_cpu, born_wall, device, windows=2 if self.lanes else 1)

    def _cpu_lanes(self, options: EmbedOptions):
        """Set the torch threads (Ray sets OMP_NUM_THREADS from num_cpus, often 1: choose
        deliberately instead); the CPU lanes (run.lanes), or None for one forward over them all
        (one lane, or a model whose forward is not reentrant)."""
        import torch

        from gpte_ray.run.lanes import Lanes, forward_is_reentrant

        threads = self.threads = options.torch_threads or os.cpu_count() or 1
        lanes = options.cpu_lanes or min(threads, MAX_DEFAULT_LANES)
        if lanes > 1 and not forward_is_reentrant(self.embedder.model):
            logging.getLogger("gpte_ray").warning(
                "resources.cpu_lanes: %d lanes asked, but this model's rotary embedding changes its state in each "
                "forward; one forward at a time, on %d threads", lanes, threads)
            lanes = 1
        torch.set_num_threads(max(1, threads // lanes))
        return Lanes(lanes) if lanes > 1 else None

    def _embed_window(self, w: _Window) -> float | None:
        """Embed every row of the window; on OOM halve the budget and retry in smaller pieces.
        Progress goes out per micro-batch.
        On CPU lanes, returns the window's share of the CPU in seconds (see _embed_lanes).

        Micro-batch i + 1 is assembled while i runs (on CUDA the forward returns before the
        device finishes); results stay on the device until the window is done (one copy back).
        """
        import torch

        emb, fig = self.embedder, self.figures
        min_fill = 0.0 if emb.packed else self.min_fill  # packed rows are never padded: fill by budget only
        plan = plan_micro_batches(w.lengths, self.budget, self.max_rows, min_fill)
        if self.lanes is not None:
            return self._embed_lanes(plan, w)
        queue = deque(plan)
        ready = None  # (rows, prepared batch) for the head of the queue
        while queue:
            rows = queue.popleft()
            batch = ready[1] if ready is not None and ready[0] is rows else w.prepare(emb, rows)
            ready = None
            try:
                with fig.forward_timer(emb.device):
                    out = emb.forward(batch)
            except (torch.OutOfMemoryError, OutOfMemory):
                if emb.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.oom_retries += 1
                if len(rows) == 1:
                    raise
                self.budget = max(1, self.budget // 2)
                half = len(rows) // 2
                queue.extendleft([rows[half:], rows[:half]][::-1])
                continue
            if queue:
                ready = (queue[0], w.prepare(emb, queue[0]))
            self._done(rows, out, w)
        fig.sync(emb.device)

    def _done(self, rows: np.ndarray, out, w: _Window) -> None:
        """Book one embedded micro-batch: its outputs, padding figures and progress."""
        w.outputs.add(rows, out)  # model.outputs.WindowOutputs: kept on the device
        w.padded[rows] = w.lengths[rows] if self.embedder.packed else int(w.lengths[rows].max())
        w.first[rows[0]] = 1
        if self.progress is not None:  # a window can take minutes on a CPU
            self.progress.add(int(w.last_chunk[rows].sum()), len(rows), int(w.lengths[rows].sum()))

    def _embed_lanes(self, plan: list[np.ndarray], w: _Window) -> float:
        """CPU lanes: the window's micro-batches run side by side (run.lanes); an OOM halves the
        failed micro-batch as on the device path. Returns the window's lane-seconds / lanes."""
        import torch

        emb, lanes = self.embedder, self.lanes

        def run(rows):  # -> (outputs, forward seconds, seconds in this lane)
            start = time.perf_counter()
            batch = w.prepare(emb, rows)
            t = time.perf_counter()
            out = emb.forward(batch)
            end = time.perf_counter()
            return out, end - t, end - start

        pending = {lanes.submit(run, rows): rows for rows in plan}
        busy = 0.0
        try:
            while pending:
                for f in lanes.wait_any(pending):
                    rows = pending.pop(f)
                    try:
                        out, forward, spent = f.result()
                    except (torch.OutOfMemoryError, OutOfMemory):
                        self.oom_retries += 1
                        if len(rows) == 1:
                            raise
                        self.budget = max(1, self.budget // 2)
                        half = len(rows) // 2
                        pending.update({lanes.submit(run, part): part for part in (rows[:half], rows[half:])})
                        continue
                    busy += spent
                    self.figures.add_forward(forward / lanes.n)
                    self._done(rows, out, w)
        finally:
            for f in pending:
                f.cancel()
        return busy / lanes.n

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The window's rows with vectors; with a writer, the staged window's summary instead."""
        out, stats = self.embed(batch)
        if self.writer is None:
            return out
        summary = self.writer(out, stats)  # the device is free meanwhile: the next window embeds
        return self.figures.attach(summary)

    def embed(self, batch: pa.Table) -> tuple[pa.Table, WindowStats]:
        """(the window's rows with a `vector` column instead of token ids, its figures)."""
        from gpte_ray.model.outputs import WindowOutputs
        from gpte_ray.store.table import embedding_columns

        fig = self.figures
        arrived = time.perf_counter()
        ids = batch["input_ids"].combine_chunks()  # a ListArray: offsets + one flat values buffer
        offsets, n = ids.offsets.to_numpy(), batch.num_rows
        w = _Window(values=ids.values.to_numpy(), offsets=offsets, plens=batch["prompt_len"].to_numpy(),
                    lengths=np.diff(offsets).astype(np.int64), outputs=WindowOutputs(self.spec, n),
                    padded=np.zeros(n, dtype=np.int32), first=np.zeros(n, dtype=np.int32),
                    last_chunk=batch["chunk"].to_numpy() == batch["n_chunks"].to_numpy() - 1)
        with fig.device_held(arrived):
            start = time.perf_counter()
            shared = self._embed_window(w)
            if self.progress is not None:
                self.progress.flush()
            retries, budget = self.oom_retries, self.budget
            self.oom_retries = 0
            # lanes: the window's share of the CPU (windows overlap there), else its wall time
            seconds = shared if shared is not None else time.perf_counter() - start
        emb = w.outputs.finish(self.calibration)  # one copy back per window
        out = batch.drop_columns(["input_ids", "prompt_len"])
        for name, column in embedding_columns(self.spec, emb).items():  # `vector`, or the sparse pair
            out = out.append_column(name, column)
        return out, WindowStats(seconds, retries, budget, w.padded, w.first)


class TokenizeEmbedStage:
    """TokenizeStage then EmbedStage in one actor: the pipeline's shape where the embed actors
    compute on the CPU. Their lanes hold every core they were given, so a tokenize actor beside
    them only adds a process, a second load of the tokenizer and a hop through the object store
    (2.5 of the 62 CPU-seconds of a 5,000-document MiniLM run on 2 cores, docs/benchmarks.md).
    With two calls at a time, one window is tokenised while the other is embedded."""

    def __init__(self, tokenize: dict, embed: dict):
        self.embed = EmbedStage(**embed)
        # on the actor's threads: its lanes wait for the window being tokenised, or embed the other
        self.tokenize = TokenizeStage(**tokenize, threads=self.embed.threads)
        fig = self.embed.figures
        fig.released = time.perf_counter()
        fig.load = fig.released - fig.born  # the tokenizer's load is the actor's too, not a wait for input
        # the Hugging Face tokenizer keeps its truncation settings between calls: one at a time
        self.lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.lock:
            chunks = self.tokenize(batch)
        return self.embed(chunks)


@dataclass
class _Window:
    """One window's token ids (flat `values` cut by `offsets`), and what its micro-batches fill in."""

    values: np.ndarray
    offsets: np.ndarray
    plens: np.ndarray  # prompt tokens per row
    lengths: np.ndarray
    outputs: object  # model.outputs.WindowOutputs
    padded: np.ndarray  # padded length of each row's micro-batch
    first: np.ndarray  # 1 on the first row of each micro-batch
    last_chunk: np.ndarray  # True on rows that complete a document

    def prepare(self, emb, rows: np.ndarray) -> dict:
        return emb.prepare(self.values, self.offsets, rows, self.plens)


class Throttled:
    """Progress for a ProgressCounter actor, sent at most every `interval` seconds: one actor
    call per micro-batch cost the embed actor ~7% of its time with a cheap model."""

    def __init__(self, counter, interval: float = 1.0):
        self.counter, self.interval = counter, interval
        self.pending = np.zeros(3, dtype=np.int64)  # docs, rows, tokens not yet sent
        self.sent = time.perf_counter()
        self.lock = threading.Lock()  # two windows may report at once

    def add(self, docs: int, rows: int, tokens: int) -> None:
        with self.lock:
            self.pending += (docs, rows, tokens)
            due = time.perf_counter() - self.sent >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if self.pending.any():
                self.counter.add.remote(*map(int, self.pending))
                self.pending[:] = 0
            self.sent = time.perf_counter()


@dataclass
class WindowStats:
    """One embedded window's figures, handed to the writer beside its rows."""

    seconds: float  # on the device (the embedding of the whole window)
    oom_retries: int
    token_budget: int  # after any OOM halving
    padded: np.ndarray  # each row's padded length (its micro-batch's longest row, or its own if packed)
    first: np.ndarray  # 1 on the first row of each micro-batch


class ActorFigures:
    """What one embed actor cost and where its time went, cumulative since it started:
    held (wall seconds since its constructor began: the accelerator is the actor's all that
    time), load (constructor), forward (model forward + pooling), input wait (the device free
    and no window to embed), CPU seconds of its process. Attached to every window summary;
    the driver keeps each actor's latest."""

    COLUMNS = ("actor", "actor_device", "actor_node_type", "actor_born", "actor_end", "actor_held_s",
               "actor_load_s", "actor_forward_s", "actor_input_wait_s", "actor_cpu_s")

    def __init__(self, born: float, born_cpu: float, born_wall: float, device: str, windows: int = 1):
        self.id = uuid.uuid4().hex
        self.device = device
        self.born, self.born_cpu, self.born_wall = born, born_cpu, born_wall
        self.load = time.perf_counter() - born
        self.forward = self.input_wait = 0.0
        self.released = time.perf_counter()  # when the device last went idle
        self.slots = threading.Semaphore(windows)  # windows on the device at a time
        self.lock = threading.Lock()  # the figures below
        self.busy = 0  # windows on the device now
        self._events: list = []  # CUDA (start, end) event pairs not yet summed
        self.node_type: str | None = None

    @contextmanager
    def device_held(self, arrived: float):
        with self.slots:
            with self.lock:
                if not self.busy:  # idle for want of input: from the device's release to this window's arrival
                    self.input_wait += max(0.0, arrived - self.released)
                self.busy += 1
            try:
                yield
            finally:
                with self.lock:
                    self.busy -= 1
                    if not self.busy:
                        self.released = time.perf_counter()

    def add_forward(self, seconds: float) -> None:
        with self.lock:
            self.forward += seconds

    @contextmanager
    def forward_timer(self, device):
        if device.type == "cuda":  # the forward returns early: time it on the device
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.forward += time.perf_counter() - t

    def sync(self, device) -> None:
        if self._events:
            import torch

            torch.cuda.synchronize(device)
            self.forward += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events.clear()

    def attach(self, summary: pa.Table) -> pa.Table:
        if self.node_type is None:
            self.node_type = node_type(self.device)
        n = summary.num_rows
        now = time.perf_counter()  # one snapshot: another window may be on the device meanwhile
        values = (self.id, self.device, self.node_type, self.born_wall, self.born_wall + now - self.born,
                  now - self.born, self.load, self.forward, self.input_wait, time.process_time() - self.born_cpu)
        for name, v in zip(self.COLUMNS, values):
            summary = summary.append_column(name, pa.array([v] * n))
        return summary


def node_type(device: str) -> str:
    """The Ray node group this process runs on, else its accelerator type, else the device."""
    try:
        import ray

        labels = ray.get_runtime_context().get_node_labels() if ray.is_initialized() else {}
    except Exception:  # outside a Ray worker
        labels = {}
    return labels.get("ray.io/node-group") or labels.get("ray.io/accelerator-type") or device


class WindowWriter:
    """Stage one window of embedded rows (store.staging.StagingWriter: a Lance fragment plus a
    durable marker); returns the window's summary (counts and histograms), never the vectors."""

    def __init__(self, staging: StagingWriter):
        self.staging = staging

    def __call__(self, batch: pa.Table, stats: WindowStats) -> pa.Table:
        summary = self._summary(batch, stats)
        if batch.num_rows == 0:  # every chunk of this window was already staged
            return summary.slice(0, 0)
        pins = pc.unique(batch[PIN_COLUMN]).to_pylist() if PIN_COLUMN in batch.column_names else None
        self.staging.write(batch, batch.select(["doc_id", "chunk", "n_chunks"]), pins)
        return summary

    @staticmethod
    def _summary(batch: pa.Table, stats: WindowStats) -> pa.Table:
        import ray

        n_tokens = batch["n_tokens"].to_numpy()
        padded = stats.padded
        chunks, n_chunks = batch["chunk"].to_numpy(), batch["n_chunks"].to_numpy()
        # per length bucket (by padded length): real tokens, computed tokens, micro-batches
        bucket = np.searchsorted(LENGTH_EDGES, padded, side="left")
        nb = len(LENGTH_EDGES) + 1

        def hist(idx, weights=None) -> list[int]:
            return np.bincount(idx, weights=weights, minlength=nb).astype(int).tolist()

        return pa.table({
            "length_hist": [hist(np.searchsorted(LENGTH_EDGES, n_tokens, side="left"))],
            "bucket_real": [hist(bucket, n_tokens)],
            "bucket_computed": [hist(bucket, padded)],
            "bucket_batches": [hist(bucket, stats.first)],
            "rows": [batch.num_rows],
            "docs_done": [int((chunks == n_chunks - 1).sum())],
            "tokens": [int(n_tokens.sum())],
            "padded_tokens": [int(padded.sum())],
            "embed_seconds": [stats.seconds],
            "truncated": [int(batch["truncated"].to_numpy(zero_copy_only=False).sum())],
            "oom_retries": [stats.oom_retries],
            "token_budget": [stats.token_budget if batch.num_rows else 0],
            "node": [ray.get_runtime_context().get_node_id()],  # where this window was embedded
        })
