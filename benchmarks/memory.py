"""Driver memory does not grow with the corpus: peak RSS of the process calling `run_index`
while indexing N1 and N2 short documents (default 5,000 and 50,000), each in a fresh
subprocess so the peaks are independent. Target: peak(N2) / peak(N1) <= 1.2.

The driver is measured two ways: a psutil RSS sampler thread (every 20 ms; also gives the
RSS just before `run_index`, after imports, so the growth during the run shows on its own)
and `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's exact high-water mark of the
driver process alone (Ray's raylet, workers and object store are other processes). Linux
keeps ru_maxrss across fork+exec, so a child would inherit its parent's peak: the parent
here imports nothing heavy, and builds the model and the shards in a subprocess of its own.
With --profile the child also records the RSS peak inside each pipeline step (the
module-level functions `run_index` calls); --trace adds the top Python allocation sites
after each step (tracemalloc).

Corpus: synthetic short documents (5 to 30 words), written by the parent as Parquet shards of
--rows-per-shard rows before the child starts (the child never holds the corpus). Model: by
default a tiny random BERT (2 layers, hidden 64, the MiniLM tokenizer) so that 50,000
documents index in a minute or two on 2 CPUs; --model minilm uses the packaged
all-MiniLM-L6-v2, or give a folder.

  python benchmarks/memory.py                       # 5,000 vs 50,000, tiny model
  python benchmarks/memory.py --sizes 5000,50000 --model minilm --out memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)

WORDS = (
    "the a of to in and is for on with as by vector index shard ray cluster embedding token batch "
    "model query document search table lance storage object bucket night change update delete "
    "insert chunk window budget accelerator memory stream actor pool worker driver commit version"
).split()


def short_docs(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        words = rng.randint(5, 30)
        yield {"id": f"doc-{i:08d}", "text": " ".join(rng.choice(WORDS) for _ in range(words))}


def tiny_bert(folder: str) -> str:
    """A 2-layer random BERT (hidden 64) with the MiniLM tokenizer, as in tests/conftest.py."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gpte_ray.model.spec import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


STEPS = ("compute_diff", "_staged_state", "_embed", "_collect", "run_upkeep", "render_html_report")


def child(shard_dir: str, db: str, model: str | None, threads: int, num_cpus: int, profile: bool,
          trace: bool, overrides: dict) -> None:
    """Runs in a fresh interpreter: index the shards, print one JSON line with the peaks."""
    import logging

    import psutil

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import gpte_ray.run.pipeline as pipeline
    from gpte_ray.config import load_config

    proc = psutil.Process()
    peak = {"rss": proc.memory_info().rss}
    step = {"name": "setup"}
    step_peak: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            rss = proc.memory_info().rss
            peak["rss"] = max(peak["rss"], rss)
            step_peak[step["name"]] = max(step_peak.get(step["name"], 0), rss)

    sites: dict[str, list[str]] = {}
    if trace:
        import tracemalloc

        tracemalloc.start(1)

    def top_sites() -> list[str]:
        import tracemalloc

        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, "<frozen *>")])
        return [f"{st.size / 2**20:.1f} MiB {st.count} blocks {st.traceback[0]}"
                for st in snap.statistics("lineno")[:6]]

    if profile or trace:
        import functools

        def wrap(name, fn):
            @functools.wraps(fn)
            def inner(*a, **k):
                outer, step["name"] = step["name"], name
                try:
                    return fn(*a, **k)
                finally:
                    step_peak[name] = max(step_peak.get(name, 0), proc.memory_info().rss)
                    step["name"] = outer
                    if trace:
                        sites[f"after {name}"] = top_sites()
            return inner

        for name in STEPS:
            if hasattr(pipeline, name):
                setattr(pipeline, name, wrap(name, getattr(pipeline, name)))

    cfg = load_config(None, {"input.paths": [shard_dir], "output.db": db, "output.table": "mem",
                             "model.path": model, "resources.device": "cpu",
                             "resources.torch_threads": threads, **overrides})
    before = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    step["name"] = "run_index"
    report = pipeline.run_index(cfg, num_cpus=num_cpus)
    secs = time.perf_counter() - t
    stop.set()
    thread.join()
    peak["rss"] = max(peak["rss"], proc.memory_info().rss)
    out = {
        "docs_embedded": report.docs_embedded, "chunks_written": report.chunks_written,
        "committed": report.committed, "seconds": round(secs, 2),
        "rss_before_run_mb": round(before / 2**20, 1),
        "maxrss_before_run_mb": round(maxrss_before / 2**20, 1),
        "peak_rss_sampled_mb": round(peak["rss"] / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_run_mb": round(proc.memory_info().rss / 2**20, 1),
        "stage_seconds": report.stage_seconds, "upkeep": report.upkeep,
    }
    if profile or trace:
        out["step_peak_rss_mb"] = {k: round(v / 2**20, 1) for k, v in step_peak.items()}
    if trace:
        current, traced_peak = tracemalloc.get_traced_memory()
        out["python_heap_mb"] = {"current": round(current / 2**20, 1), "peak": round(traced_peak / 2**20, 1)}
        out["top_sites"] = sites
    print(json.dumps(out), flush=True)
    import ray

    ray.shutdown()


def prepare(work: str, sizes: list[int], rows_per_shard: int, model: str) -> None:
    """In a subprocess: the tiny model (if asked) and the shards, so the parent stays small."""
    from gpte_ray.demo.corpus import write_shards

    if model == "tiny":
        tiny_bert(os.path.join(work, "tiny-bert"))
    shards = {n: len(write_shards(short_docs(n), os.path.join(work, f"corpus{n}"), rows_per_shard=rows_per_shard))
              for n in sizes}
    print(json.dumps(shards))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,50000", help="corpus sizes, comma separated (first = base)")
    ap.add_argument("--rows-per-shard", type=int, default=5000)
    ap.add_argument("--model", default="tiny", help="tiny (random 2-layer BERT), minilm, or a folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="RSS peak per pipeline step")
    ap.add_argument("--trace", action="store_true",
                    help="also tracemalloc: Python heap peak, top allocation sites after each step (slow, "
                         "and its bookkeeping inflates RSS)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="job config override, e.g. output.fts_index=false (repeatable)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, metavar=("SHARDS", "DB", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", metavar="WORK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.child:
        shard_dir, db, model = args.child
        overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tfn\"" else v
                     for k, v in (kv.split("=", 1) for kv in args.set)}
        child(shard_dir, db, None if model == "-" else model, args.threads, args.num_cpus, args.profile, args.trace,
              overrides)
        return
    if args.prepare:
        prepare(args.prepare, sizes, args.rows_per_shard, args.model)
        return

    import shutil

    me = [sys.executable, os.path.abspath(__file__)]
    work = tempfile.mkdtemp(prefix="gpte_mem_")
    try:
        out = subprocess.run([*me, "--prepare", work, "--sizes", args.sizes, "--rows-per-shard",
                              str(args.rows_per_shard), "--model", args.model],
                             capture_output=True, text=True, timeout=1800, check=True)
        n_shards = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
        model = {"tiny": os.path.join(work, "tiny-bert"), "minilm": "-"}.get(args.model, args.model)
        results = {"model": args.model, "rows_per_shard": args.rows_per_shard, "overrides": args.set, "runs": {}}
        print(f"# driver peak RSS, model {args.model}, shards of {args.rows_per_shard} rows, "
              f"{args.num_cpus}-CPU local Ray, parent RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
              f"MiB, loadavg {[round(x, 1) for x in os.getloadavg()]}", flush=True)
        for n in sizes:
            cmd = [*me, "--threads", str(args.threads), "--num-cpus", str(args.num_cpus),
                   *(["--profile"] if args.profile else []), *(["--trace"] if args.trace else []),
                   *(x for kv in args.set for x in ("--set", kv)),
                   "--child", os.path.join(work, f"corpus{n}"), os.path.join(work, f"db{n}"), model]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"child for {n} documents failed ({out.returncode})")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["committed"] and r["docs_embedded"] == n, r
            r["shards"] = n_shards[n]
            results["runs"][str(n)] = r
            print(f"{n:>8} docs ({r['shards']} shards): driver peak RSS {r['ru_maxrss_mb']:.1f} MiB (ru_maxrss), "
                  f"{r['peak_rss_sampled_mb']:.1f} MiB (sampled); {r['rss_before_run_mb']:.1f} MiB before run_index, "
                  f"{r['rss_after_run_mb']:.1f} after; {r['seconds']:.1f} s", flush=True)
            if args.profile or args.trace:
                print(f"          RSS at the end of / peak within each step (MiB): {r['step_peak_rss_mb']}")
            if args.trace:
                print(f"          python heap (MiB): {r['python_heap_mb']}; top allocation sites:")
                for where, lines in r["top_sites"].items():
                    print(f"            {where}:")
                    for line in lines:
                        print(f"              {line}")
        base, big = results["runs"][str(sizes[0])], results["runs"][str(sizes[-1])]
        ratio = big["ru_maxrss_mb"] / base["ru_maxrss_mb"]
        ratio_s = big["peak_rss_sampled_mb"] / base["peak_rss_sampled_mb"]
        growth = {str(n): round(results["runs"][str(n)]["peak_rss_sampled_mb"]
                                - results["runs"][str(n)]["rss_before_run_mb"], 1) for n in sizes}
        results.update({"ratio_ru_maxrss": round(ratio, 3), "ratio_sampled": round(ratio_s, 3),
                        "growth_during_run_mb": growth})
        print(f"peak ratio {sizes[-1]}/{sizes[0]}: {ratio:.3f} (ru_maxrss), {ratio_s:.3f} (sampled); "
              f"growth during run_index (MiB): {growth}; "
              f"target <= 1.2: {'ok' if max(ratio, ratio_s) <= 1.2 else 'MISS'}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
            print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
