"""Issue 12's first finding, replayed: one table, many nights, one fragment per 2-row window.

120 documents, then +30 a night (and from the fifth night 2 edits and 2 deletes): the table
passes 16 fragments on night 2, compacts on night 3, and before the fence every later run
failed reading back the compaction's index-remap transaction. Each night is checked: committed,
the table equals the corpus (ids and content hashes), no duplicate (doc_id, chunk).

    python benchmarks/compaction_nights.py --work /tmp/nights --nights 44
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import lance
import pyarrow as pa
import pyarrow.parquet as pq

from gpte_ray.config import load_config
from gpte_ray.input.prepare import content_hash
from gpte_ray.run.pipeline import run_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="an empty folder for the corpus and the table")
    p.add_argument("--nights", type=int, default=44)
    args = p.parse_args()
    rng = random.Random(1)
    docs = {f"d{i}": f"document {i} on topic {i % 11}" for i in range(120)}
    db = os.path.join(args.work, "db")
    for n in range(args.nights):
        if n:
            docs.update({f"n{n}-{i}": f"night {n} document {i}" for i in range(30)})
        if n >= 4:
            for d in rng.sample(sorted(docs), 2):
                docs[d] += " edited"
            for d in rng.sample(sorted(docs), 2):
                del docs[d]
        src = os.path.join(args.work, f"corpus-{n:03d}")
        os.makedirs(src)
        pq.write_table(pa.Table.from_pylist([{"id": k, "text": v} for k, v in docs.items()]), f"{src}/a.parquet")
        cfg = load_config(None, {"input.paths": [src], "output.db": db, "output.table": "docs",
                                 "batch.window_rows": 2})
        t = time.time()
        r = run_index(cfg, num_cpus=2)
        tab = lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id", "chunk", "content_hash"])
        keys = list(zip(tab["doc_id"].to_pylist(), tab["chunk"].to_pylist()))
        exact = dict(zip(tab["doc_id"].to_pylist(), tab["content_hash"].to_pylist())) == \
            {k: content_hash(v) for k, v in docs.items()}
        print(json.dumps({"night": n + 1, "committed": r.committed, "version": r.version, "docs": len(docs),
                          "dup_keys": len(keys) - len(set(keys)), "exact": exact,
                          "compacted": r.upkeep.get("compacted_fragments"), "s": round(time.time() - t, 1)}),
              flush=True)
        assert r.committed and exact and len(keys) == len(set(keys)), f"night {n + 1}"
    print(f"all {args.nights} nights committed, exact, no duplicate key")


if __name__ == "__main__":
    main()
