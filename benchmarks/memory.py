"""Driver memory does not grow with the corpus: peak RSS of the process calling `run_index`
while indexing N1 and N2 short documents (default 5,000 and 50,000), each in a fresh
subprocess so the peaks are independent. Target: peak(N2) / peak(N1) <= 1.2.

The driver is measured two ways: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's
exact high-water mark of the driver process alone; Ray's raylet, workers and object store
are other processes and are not counted) and a psutil RSS sampler thread (every 20 ms),
which also gives the RSS just before `run_index` (after imports), so the growth during the
run is visible on its own.

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

    from gpte_ray.spec import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def child(shard_dir: str, db: str, model: str | None, threads: int, num_cpus: int) -> None:
    """Runs in a fresh interpreter: index the shards, print one JSON line with the peaks."""
    import logging

    import psutil

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    from gpte_ray.config import load_config
    from gpte_ray.pipeline import run_index

    proc = psutil.Process()
    peak = {"rss": proc.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)

    cfg = load_config(None, {"input.paths": [shard_dir], "output.db": db, "output.table": "mem",
                             "model.path": model, "resources.device": "cpu",
                             "resources.torch_threads": threads})
    before = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    report = run_index(cfg, num_cpus=num_cpus)
    secs = time.perf_counter() - t
    stop.set()
    thread.join()
    peak["rss"] = max(peak["rss"], proc.memory_info().rss)
    print(json.dumps({
        "docs_embedded": report.docs_embedded, "chunks_written": report.chunks_written,
        "committed": report.committed, "seconds": round(secs, 2),
        "rss_before_run_mb": round(before / 2**20, 1),
        "maxrss_before_run_mb": round(maxrss_before / 2**20, 1),
        "peak_rss_sampled_mb": round(peak["rss"] / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stage_seconds": report.stage_seconds,
    }), flush=True)
    import ray

    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,50000", help="corpus sizes, comma separated (first = base)")
    ap.add_argument("--rows-per-shard", type=int, default=5000)
    ap.add_argument("--model", default="tiny", help="tiny (random 2-layer BERT), minilm, or a folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, metavar=("SHARDS", "DB", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shard_dir, db, model = args.child
        child(shard_dir, db, None if model == "-" else model, args.threads, args.num_cpus)
        return

    from gpte_ray.corpus import write_shards

    work = tempfile.mkdtemp(prefix="gpte_mem_")
    model = {"tiny": None, "minilm": "-"}.get(args.model, args.model)
    if model is None:
        model = tiny_bert(os.path.join(work, "tiny-bert"))
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {"model": args.model, "rows_per_shard": args.rows_per_shard, "runs": {}}
    print(f"# driver peak RSS, model {args.model}, shards of {args.rows_per_shard} rows, "
          f"{args.num_cpus}-CPU local Ray, loadavg {[round(x, 1) for x in os.getloadavg()]}", flush=True)
    for n in sizes:
        shard_dir = os.path.join(work, f"corpus{n}")
        paths = write_shards(short_docs(n), shard_dir, rows_per_shard=args.rows_per_shard)
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--num-cpus",
               str(args.num_cpus), "--child", shard_dir, os.path.join(work, f"db{n}"), model]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"child for {n} documents failed ({out.returncode})")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["committed"] and r["docs_embedded"] == n, r
        r["shards"] = len(paths)
        results["runs"][str(n)] = r
        print(f"{n:>8} docs ({len(paths)} shards): driver peak RSS {r['ru_maxrss_mb']:.1f} MiB (ru_maxrss), "
              f"{r['peak_rss_sampled_mb']:.1f} MiB (sampled); {r['rss_before_run_mb']:.1f} MiB before run_index; "
              f"{r['seconds']:.1f} s", flush=True)
    base, big = results["runs"][str(sizes[0])], results["runs"][str(sizes[-1])]
    ratio = big["ru_maxrss_mb"] / base["ru_maxrss_mb"]
    ratio_s = big["peak_rss_sampled_mb"] / base["peak_rss_sampled_mb"]
    growth = (big["peak_rss_sampled_mb"] - big["rss_before_run_mb"],
              base["peak_rss_sampled_mb"] - base["rss_before_run_mb"])
    results.update({"ratio_ru_maxrss": round(ratio, 3), "ratio_sampled": round(ratio_s, 3),
                    "growth_during_run_mb": {str(sizes[-1]): growth[0], str(sizes[0]): growth[1]}})
    print(f"peak ratio {sizes[-1]}/{sizes[0]}: {ratio:.3f} (ru_maxrss), {ratio_s:.3f} (sampled); "
          f"growth during run_index {growth[1]:.1f} -> {growth[0]:.1f} MiB; "
          f"target <= 1.2: {'ok' if max(ratio, ratio_s) <= 1.2 else 'MISS'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
