"""Search latency: a cold `gpte-ray search` (new process) beside warm queries through the API.

    python benchmarks/search_latency.py --db DB --table TABLE [--queries 100] [--cold 3]

Cold: wall time of whole `gpte-ray search` processes (imports, table open, model load, one
query). Warm: one `gpte_ray.Searcher`, then each query timed alone (`search(q, k)`), and the
same queries in one `search_many` call. Queries are the first sentences of the table's own
chunk texts. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--queries", type=int, default=100, help="warm queries (default: 100)")
    ap.add_argument("--cold", type=int, default=3, help="cold CLI runs (default: 3)")
    ap.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    args = ap.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cold = []
    for _ in range(args.cold):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpte_ray.cli", "search", "--db", args.db, "--table", args.table,
                        "-k", str(args.k), "how to read a file"], check=True, capture_output=True, env=env)
        cold.append(time.perf_counter() - t)

    import lance

    from gpte_ray import Searcher

    texts = lance.dataset(f"{args.db}/{args.table}.lance").to_table(columns=["text"], limit=args.queries)
    queries = [t.split(".")[0][:200] for t in texts["text"].to_pylist()]
    t = time.perf_counter()
    searcher = Searcher(args.db, args.table)
    open_s = time.perf_counter() - t
    searcher.search(queries[0], args.k)  # first query: lazy initialisation inside torch and Lance
    each = []
    for q in queries:
        t = time.perf_counter()
        searcher.search(q, args.k)
        each.append(time.perf_counter() - t)
    t = time.perf_counter()
    searcher.search_many(queries, args.k)
    batch_s = time.perf_counter() - t
    each_ms = sorted(1000 * s for s in each)
    print(json.dumps({
        "table_rows": searcher.ds.count_rows(),
        "cold_cli_s": [round(s, 2) for s in cold],
        "searcher_open_s": round(open_s, 2),
        "warm_queries": len(queries),
        "warm_total_s": round(sum(each), 3),
        "warm_median_ms": round(statistics.median(each_ms), 1),
        "warm_p95_ms": round(each_ms[int(0.95 * (len(each_ms) - 1))], 1),
        "search_many_s": round(batch_s, 3),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
