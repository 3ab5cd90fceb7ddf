"""Ray Data stages: callables over pyarrow batches. Heavy imports live in `__init__`.

scan_shard / read_shard (CPU tasks) -> TokenizeStage (CPU actors) -> EmbedStage (GPU or
CPU actor pool, each window staged by its WindowWriter as a Lance fragment and a marker).
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa

from gpte_ray.batching import plan_micro_batches
from gpte_ray.config import InputConfig
from gpte_ray.sources import ShardError, read_prepared
from gpte_ray.spec import ModelSpec

__all__ = ["EmbedStage", "TokenizeStage", "WindowWriter", "read_shard", "scan_shard"]

SCAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string()),
     ("content_hash", pa.string()), ("reason", pa.string())]
)


def scan_shard(batch: pa.Table, cfg: InputConfig):
    """Manifest pass: ids, hashes and quarantine reasons of one shard (no texts)."""
    shard, uri = batch["shard"][0].as_py(), batch["uri"][0].as_py()
    try:
        for t in read_prepared(uri, shard, cfg):
            yield t.drop_columns(["text"])
    except ShardError as e:
        if not cfg.skip_bad_shards:
            raise
        yield pa.table(
            {"shard": [shard], "row": [-1], "doc_id": [None], "content_hash": [None],
             "reason": [f"bad shard: {e}"]},
            schema=SCAN_SCHEMA,
        )


def read_shard(batch: pa.Table, cfg: InputConfig):
    """Embed pass: the prepared rows of one shard that the plan selected."""
    shard, uri = batch["shard"][0].as_py(), batch["uri"][0].as_py()
    rows = set(batch["rows"][0].as_py())
    for t in read_prepared(uri, shard, cfg, rows=rows):
        yield t.drop_columns(["reason", "row", "shard"])


CHUNK_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("chunk", pa.int32()), ("n_chunks", pa.int32()),
     ("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("prompt_len", pa.int32()),
     ("text", pa.string()), ("char_start", pa.int32()), ("char_end", pa.int32()),
     ("content_hash", pa.string()), ("truncated", pa.bool_())]
)


class TokenizeStage:
    """Documents -> one row per chunk, with token ids. Skips chunks already staged."""

    def __init__(self, spec: ModelSpec, staged: frozenset[tuple[str, int]] = frozenset()):
        from gpte_ray.tokenize import TextTokenizer

        self.tok = TextTokenizer(spec)
        self.staged = staged

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        ids = batch["doc_id"].to_pylist()
        hashes = batch["content_hash"].to_pylist()
        chunks = self.tok.encode(texts, role="document")
        n_chunks = np.bincount([c.doc_index for c in chunks], minlength=len(texts))
        cols: dict[str, list] = {name: [] for name in CHUNK_SCHEMA.names}
        for c in chunks:
            doc_id = ids[c.doc_index]
            if (doc_id, c.chunk) in self.staged:
                continue
            cols["doc_id"].append(doc_id)
            cols["chunk"].append(c.chunk)
            cols["n_chunks"].append(int(n_chunks[c.doc_index]))
            cols["input_ids"].append(c.input_ids)
            cols["n_tokens"].append(len(c.input_ids))
            cols["prompt_len"].append(c.prompt_len)
            cols["text"].append(texts[c.doc_index][c.char_start : c.char_end])
            cols["char_start"].append(c.char_start)
            cols["char_end"].append(c.char_end)
            cols["content_hash"].append(hashes[c.doc_index])
            cols["truncated"].append(c.truncated)
        return pa.table(cols, schema=CHUNK_SCHEMA)


# token-count bin edges for the report's histograms: bin i holds lengths in (edge[i-1], edge[i]]
LENGTH_EDGES = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])


class OutOfMemory(RuntimeError):
    """Raised by a micro-batch that did not fit the device (real or injected)."""


class EmbedStage:
    """Sort the window Ray hands over by length, cut micro-batches by a token budget, embed,
    and (with a writer) stage the window as a Lance fragment before returning its summary.

    Writing here, not in a later stage, makes each window durable as soon as it is embedded:
    Ray Data merges a task's small outputs into one block, so a downstream writer would only
    see them when the whole task ends, and a crash would lose the task's work.
    """

    def __init__(self, spec: ModelSpec, device: str, token_budget: int, max_rows: int, min_fill: float,
                 torch_threads: int | None, calibration: dict | None, progress=None, writer=None):
        import torch

        from gpte_ray.embedder import Embedder

        if device == "cpu":
            # Ray sets OMP_NUM_THREADS from num_cpus (often 1); choose deliberately instead
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.spec = spec
        self.embedder = Embedder(spec, device)
        self.budget = token_budget
        self.max_rows = max_rows
        self.min_fill = min_fill
        self.calibration = calibration
        self.oom_retries = 0
        self.progress = progress  # a ProgressCounter actor handle, or None
        self.writer = writer  # a WindowWriter, or None to return the vectors

    def _embed_safely(self, ids: list, plens: list, order: np.ndarray, out: np.ndarray,
                      padded: np.ndarray) -> None:
        """Embed rows `order`; on OOM halve the budget and retry in smaller pieces."""
        import torch

        pending = [order]
        while pending:
            rows = pending.pop()
            try:
                out[rows] = self.embedder.embed([ids[i] for i in rows], [plens[i] for i in rows])
                padded[rows] = max(len(ids[i]) for i in rows)
            except (torch.OutOfMemoryError, OutOfMemory):
                if self.embedder.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.oom_retries += 1
                if len(rows) == 1:
                    raise
                self.budget = max(1, self.budget // 2)
                half = len(rows) // 2
                pending += [rows[half:], rows[:half]]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from gpte_ray.embedder import postprocess
        from gpte_ray.table import vector_type, vectors_to_arrow

        start = time.perf_counter()
        ids = batch["input_ids"].to_pylist()
        plens = batch["prompt_len"].to_pylist()
        lengths = np.asarray(batch["n_tokens"].to_numpy(), dtype=np.int64)
        pooled = np.zeros((len(ids), self.spec.full_dim), dtype=np.float32)
        padded = np.zeros(len(ids), dtype=np.int32)  # padded length of each row's micro-batch
        first = np.zeros(len(ids), dtype=np.int32)  # 1 on the first row of each micro-batch
        for rows in plan_micro_batches(lengths, self.budget, self.max_rows, self.min_fill):
            self._embed_safely(ids, plens, rows, pooled, padded)
            first[rows[0]] = 1
        vectors = postprocess(pooled, self.spec, self.calibration)
        seconds = time.perf_counter() - start
        out = batch.drop_columns(["input_ids", "prompt_len"])
        out = out.append_column("vector", vectors_to_arrow(vectors, vector_type(self.spec)))
        out = out.append_column("padded_tokens", pa.array(padded))
        out = out.append_column("batch_first", pa.array(first))
        per_row = seconds / max(len(ids), 1)
        out = out.append_column("embed_seconds", pa.array(np.full(len(ids), per_row)))
        retries = np.zeros(len(ids), np.int32)
        retries[:1] = self.oom_retries  # counted once per window, summed by the writer
        out = out.append_column("oom_retries", pa.array(retries))
        out = out.append_column("token_budget", pa.array(np.full(len(ids), self.budget, np.int32)))
        self.oom_retries = 0
        if self.progress is not None:
            chunks, n_chunks = batch["chunk"].to_numpy(), batch["n_chunks"].to_numpy()
            self.progress.add.remote(int((chunks == n_chunks - 1).sum()), len(ids), int(lengths.sum()))
        return out if self.writer is None else self.writer(out)


class WindowWriter:
    """Write one window of embedded rows as a Lance fragment plus a durable staging marker;
    returns the window's summary (counts and histograms), never the vectors."""

    def __init__(self, db: str, table: str, storage_options: dict | None, schema: pa.Schema,
                 run_id: str, overwrite: bool):
        from gpte_ray.table import TableStore

        self.store = TableStore(db, table, storage_options)
        self.schema = schema
        self.run_id = run_id
        self.overwrite = overwrite

    def __call__(self, batch: pa.Table) -> pa.Table:
        summary = self._summary(batch)
        if batch.num_rows == 0:  # every chunk of this window was already staged
            return summary.slice(0, 0)
        data = batch.select(self.schema.names).cast(self.schema)
        fragments = self.store.write_fragments(data, self.schema, data.num_rows, self.overwrite)
        doc_ids = batch["doc_id"].to_pylist()
        marker = {
            "fragments": [f.to_json() for f in fragments],
            "keys": [[d, c] for d, c in zip(doc_ids, batch["chunk"].to_pylist())],
            "n_chunks": dict(zip(doc_ids, batch["n_chunks"].to_pylist())),
        }
        self.store.write_marker(self.run_id, uuid.uuid4().hex, marker)  # after the data files: durable
        return summary

    @staticmethod
    def _summary(batch: pa.Table) -> pa.Table:
        import ray

        n_tokens = batch["n_tokens"].to_numpy()
        padded = batch["padded_tokens"].to_numpy()
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
            "bucket_batches": [hist(bucket, batch["batch_first"].to_numpy())],
            "rows": [batch.num_rows],
            "docs_done": [int((chunks == n_chunks - 1).sum())],
            "tokens": [int(n_tokens.sum())],
            "padded_tokens": [int(padded.sum())],
            "embed_seconds": [float(batch["embed_seconds"].to_numpy().sum())],
            "truncated": [int(batch["truncated"].to_numpy(zero_copy_only=False).sum())],
            "oom_retries": [int(batch["oom_retries"].to_numpy().sum())],
            "token_budget": [int(batch["token_budget"].to_numpy().min()) if batch.num_rows else 0],
            "node": [ray.get_runtime_context().get_node_id()],  # where this window was embedded
        })
