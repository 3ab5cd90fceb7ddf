"""A night costs what changed, down to the shard (issue 23): N documents in S Parquet shards.

Builds the corpus and a table that already holds it (the vectors are zeros: no model pass is
measured here, the corpus is written and hashed as the scan prepares it), then times, on one
local Ray started beforehand (its start is not counted):

  full scan        --full-scan: every shard read and diffed against the whole table (what
                   every night cost before the shard manifest); `--warmup` runs one before it
  nothing changed  the next night: each shard's fingerprint against the manifest, nothing read
  0.1% changed     `--changed` of the shards rewritten, one document edited in each: rows
                   read, and the night's wall time (their documents embedded with the stand-in)

and each night's driver peak RSS above the driver's RSS before it (a psutil sampler). Target:
the nothing-changed night at most 10% of the full scan's time; rows read proportional to the
changed shards.

    python benchmarks/shards.py --docs 5000000 --shards 5000 --out /tmp/shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = np.array("lance ray table vector index night shard embed model token chunk query cluster driver "
                 "worker commit fence lease arrow batch window".split())
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])


def shard_rows(s: int, per: int, rng: np.random.Generator) -> pa.Table:
    words = WORDS[rng.integers(0, len(WORDS), size=(per, 8))]
    texts = [" ".join(w) + f" {s}.{i}" for i, w in enumerate(words)]
    return pa.table({"id": [f"s{s:06d}-{i:05d}" for i in range(per)], "text": texts}, schema=SCHEMA)


def build(work: Path, docs: int, shards: int, cfg) -> list[Path]:
    """The corpus, and a table holding it as a first build would (zero vectors)."""
    import lance

    from gpte_ray.input.prepare import content_hash
    from gpte_ray.model.spec import resolve_model
    from gpte_ray.store.table import table_schema, vector_type

    spec = resolve_model(cfg.model)
    schema = table_schema(spec, True, None)
    per = docs // shards
    rng = np.random.default_rng(7)
    paths = []
    zeros = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(per * spec.dim, np.float32)),
                                              vector_type(spec).list_size)

    def batches():
        for s in range(shards):
            t = shard_rows(s, per, rng)
            path = work / "corpus" / f"part-{s:06d}.parquet"
            pq.write_table(t, path)
            paths.append(path)
            texts = t["text"].to_pylist()
            yield pa.table({"doc_id": t["id"], "chunk": pa.array(np.zeros(per, np.int32)), "vector": zeros,
                            "text": t["text"], "content_hash": [content_hash(x) for x in texts],
                            "char_start": pa.array(np.zeros(per, np.int32)),
                            "char_end": pa.array([len(x) for x in texts], pa.int32())},
                           schema=schema).to_batches()[0]

    (work / "corpus").mkdir(parents=True)
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    lance.write_dataset(reader, str(work / "db" / "docs.lance"), schema=schema, max_rows_per_file=1_000_000)
    return paths


class Peak:
    """The driver's RSS peak above its RSS at the start, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def mib(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def night(name: str, cfg) -> dict:
    from gpte_ray.run.pipeline import run_index

    t = time.perf_counter()
    with Peak() as peak:
        r = run_index(cfg)
    line = {"night": name, "seconds": round(time.perf_counter() - t, 2), "driver_peak_mib": peak.mib,
            "rows_read": r.rows_read, "rows_skipped": r.rows_skipped, "shards_read": r.shards_read,
            "shards_skipped": r.shards_skipped, "changed": r.changed, "unchanged": r.unchanged,
            "committed": r.committed, "counts_add_up": r.counts_add_up, "stage_seconds": r.stage_seconds}
    print(json.dumps(line), flush=True)
    return line


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=5_000_000)
    p.add_argument("--shards", type=int, default=5000)
    p.add_argument("--changed", type=float, default=0.001, help="share of the shards rewritten on the last night")
    p.add_argument("--warmup", action="store_true", help="a first full scan before the measured one")
    p.add_argument("--work", help="a folder for the corpus and the table (default: a temporary one)")
    p.add_argument("--out", help="write the results JSON here too")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from benchmarks.soak import tiny_st_model
    from gpte_ray.config import load_config
    from gpte_ray.run.cluster import connect_ray

    work = Path(args.work or tempfile.mkdtemp(prefix="gpte-shards-"))
    model = tiny_st_model(str(work / "model"))
    over = {"input.paths": [str(work / "corpus")], "output.db": str(work / "db"), "output.table": "docs",
            "model.path": model, "model.dim": 8, "output.index_min_rows": 10**12, "output.fts_index": False}
    cfg = load_config(None, over)
    t = time.perf_counter()
    paths = build(work, args.docs, args.shards, cfg)
    setup = round(time.perf_counter() - t, 1)
    connect_ray("local")
    full_scan = load_config(None, {**over, "input.full_scan": True})
    if args.warmup:
        night("first night (its upkeep indexes the table)", full_scan)
    out = {"docs": args.docs, "shards": args.shards, "setup_seconds": setup,
           "nights": [night("full scan", full_scan), night("nothing changed", cfg)]}
    rng = random.Random(3)
    changed = rng.sample(paths, max(1, int(len(paths) * args.changed)))
    for path in changed:
        t = pq.read_table(path)
        texts = t["text"].to_pylist()
        texts[0] = texts[0] + " (edited)"
        pq.write_table(t.set_column(1, "text", pa.array(texts)), path)
    out["nights"].append(night(f"{len(changed)} shards changed", cfg))
    full, quiet = out["nights"][0]["seconds"], out["nights"][1]["seconds"]
    out["nothing_changed_vs_full_scan"] = round(quiet / full, 3)
    print(json.dumps({k: v for k, v in out.items() if k != "nights"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
