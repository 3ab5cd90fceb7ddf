"""Scale: a nightly run's cost follows the change, and the driver's memory does not follow the corpus.

For each size N: an N-document corpus (short synthetic texts, Parquet shards) and a matching
table written directly (vectors from a stand-in model's dimension, random; schema, fingerprint
and content hashes made by the job's own functions: `resolve_model`, `table_schema`,
`read_prepared`), with the job's own upkeep building the default indexes (doc_id BTREE and the
default vector index). Then, each in a fresh process:

  (a) `run_index` over the same corpus: nothing changed;
  (b) `run_index` over the corpus with 0.1% of the texts edited, 0.1% deleted, 0.1% added.

Printed per run: the driver's peak RSS (VmHWM of the driver process alone: Ray's raylet,
GCS and workers are other processes), wall seconds, each stage's seconds from the run report,
the cluster's CPU-seconds (workers, raylet and GCS: the driver's live descendants and what
they reaped) per document; and between sizes the per-document slope of the driver peak.

--first-build N1,N2 also indexes two corpora from scratch with the stand-in model (the first
build embeds everything: its driver peak slope is the other target).

--check N builds a small corpus both ways (a real `run_index`, and directly) and checks that
the schemas (with the fingerprint) and the (doc_id, chunk, content_hash) rows are equal, and
that a run over the directly built table finds nothing to do.

  python benchmarks/scale.py --check 1000 --sizes 1000000,5000000 --out scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
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
TABLE = "scale"


def _text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))


def write_corpus(folder: str, n: int, rows_per_shard: int, change: float = 0.0, seed: int = 0) -> dict:
    """Shards of n documents; with `change`, the same corpus with that share of texts edited,
    as many deleted and as many added (new ids after the last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng, edit_rng = random.Random(seed), random.Random(seed + 1)
    every = int(1 / change) if change else 0
    counts = {"edited": 0, "deleted": 0, "added": 0}
    for s, start in enumerate(range(0, n, rows_per_shard)):
        ids, texts = [], []
        for i in range(start, min(n, start + rows_per_shard)):
            text = _text(rng)  # drawn for every document, so unchanged ones stay the same
            if every and i % every == 1:
                counts["deleted"] += 1
                continue
            if every and i % every == 2:
                text = f"edited {edit_rng.random():.6f} " + text
                counts["edited"] += 1
            ids.append(f"doc-{i:010d}")
            texts.append(text)
        pq.write_table(pa.table({"id": ids, "text": texts}), os.path.join(folder, f"part-{s:05d}.parquet"))
    if every:
        added = n // every
        ids = [f"doc-{n + i:010d}" for i in range(added)]
        pq.write_table(pa.table({"id": ids, "text": [_text(edit_rng) for _ in ids]}),
                       os.path.join(folder, "part-99999-added.parquet"))
        counts["added"] = added
    return counts


def stand_in_model(folder: str) -> str:
    """One layer, hidden 32, the MiniLM tokenizer: embeds fast, a small table."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gpte_ray.model.spec import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def _config(corpus: str, db: str, model: str, overrides: dict):
    from gpte_ray.config import load_config

    return load_config(None, {"input.paths": [corpus], "output.db": db, "output.table": TABLE,
                              "model.path": model, "resources.device": "cpu", **overrides})


def build_table(corpus: str, db: str, model: str, overrides: dict) -> dict:
    """The table a first build would leave, written directly: one chunk per document."""
    import lance
    import numpy as np
    import pyarrow as pa

    from gpte_ray.input.sources import list_shards, read_prepared
    from gpte_ray.model.spec import resolve_model
    from gpte_ray.store.table import table_schema, vectors_to_arrow
    from gpte_ray.store.upkeep import finish_table

    cfg = _config(corpus, db, model, overrides)
    spec = resolve_model(cfg.model)
    schema = table_schema(spec, cfg.output.store_text, None)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()

    def batches():
        for i, uri in enumerate(list_shards(cfg.input)):
            for p in read_prepared(uri, i, cfg.input, batch_rows=65536):
                p = p.filter(p["reason"].is_null())
                v = rng.normal(size=(p.num_rows, spec.dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                n = p.num_rows
                cols = {"doc_id": p["doc_id"], "chunk": pa.array(np.zeros(n, np.int32)),
                        "vector": vectors_to_arrow(v, schema.field("vector").type), "text": p["text"],
                        "content_hash": p["content_hash"], "char_start": pa.array(np.zeros(n, np.int32)),
                        "char_end": pa.compute.cast(pa.compute.utf8_length(p["text"]), pa.int32())}
                yield from pa.table([cols[f.name] for f in schema], schema=schema).to_batches()

    uri = os.path.join(db, f"{TABLE}.lance")
    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri, schema=schema,
                             mode="overwrite", max_rows_per_file=cfg.output.target_rows_per_fragment)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = finish_table(ds, cfg.output, "direct", spec.fingerprint(), committed=True)
    return {"rows": ds.count_rows(), "write_s": round(write_s, 1), "index_s": round(time.perf_counter() - t0, 1),
            "upkeep": done}


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which belongs to the process's own address space
    (ru_maxrss on Linux carries over the parent's peak through fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(corpus: str, db: str, model: str, num_cpus: int, overrides: dict) -> dict:
    """One `run_index` in this (fresh) process; the driver's figures."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("ray").setLevel(logging.WARNING)
    from gpte_ray.run.pipeline import run_index

    cfg = _config(corpus, db, model, overrides)
    before = _peak_rss()
    t0 = time.perf_counter()
    report = run_index(cfg, "local", num_cpus)
    wall = time.perf_counter() - t0
    peak = _peak_rss()
    import psutil
    import ray

    # the cluster's CPU: live descendants (raylet, GCS, workers) with what each has reaped, plus
    # what this process has reaped; read at one moment, so nothing is counted twice
    cluster_cpu = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            cluster_cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cluster_cpu += kids.ru_utime + kids.ru_stime
    ray.shutdown()
    r = json.loads(report.to_json())
    return {
        "driver_peak_mib": round(peak / 2**20, 1), "driver_before_run_mib": round(before / 2**20, 1),
        "wall_s": round(wall, 1), "cluster_cpu_s": round(cluster_cpu, 1),
        "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
        "counts": {k: r.get(k) for k in ("rows_read", "new", "changed", "unchanged", "deleted", "quarantined",
                                         "docs_embedded", "chunks_written", "committed")},
        "upkeep": report.upkeep,
    }


def check_small(work: str, n: int, model: str, num_cpus: int, overrides: dict) -> dict:
    """The direct table equals a real run's (schema with fingerprint, ids, chunks, hashes)."""
    import lance

    corpus = os.path.join(work, f"check-{n}")
    write_corpus(corpus, n, max(1, n // 4))
    real_db, direct_db = os.path.join(work, "check-real"), os.path.join(work, "check-direct")
    for d in (real_db, direct_db):
        shutil.rmtree(d, ignore_errors=True)
    _sub(["--run", corpus, real_db], model, num_cpus, overrides)
    _sub(["--build", corpus, direct_db], model, num_cpus, overrides)
    real = lance.dataset(os.path.join(real_db, f"{TABLE}.lance"))
    direct = lance.dataset(os.path.join(direct_db, f"{TABLE}.lance"))
    assert real.schema == direct.schema and real.schema.metadata == direct.schema.metadata, "schemas differ"
    cols = ["doc_id", "chunk", "content_hash", "text"]
    a = real.to_table(columns=cols).sort_by("doc_id")
    b = direct.to_table(columns=cols).sort_by("doc_id")
    assert a.equals(b), "rows differ"
    again = _sub(["--run", corpus, direct_db], model, num_cpus, overrides)
    assert again["counts"]["unchanged"] == n and again["counts"]["docs_embedded"] == 0, again["counts"]
    return {"n": n, "schema_equal": True, "rows_equal": True, "rerun_unchanged": again["counts"]["unchanged"]}


def _sub(args: list[str], model: str, num_cpus: int, overrides: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--num-cpus", str(num_cpus),
           "--overrides", json.dumps(overrides), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(results: dict, key: str, sizes: list[int]) -> float | None:
    if len(sizes) < 2:
        return None
    a, b = results[str(sizes[0])][key], results[str(sizes[-1])][key]
    return round((b["driver_peak_mib"] - a["driver_peak_mib"]) * 2**20 / (sizes[-1] - sizes[0]), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--first-build", default="", help="sizes to index from scratch, e.g. 20000,100000")
    ap.add_argument("--check", type=int, default=1000, help="size of the direct-vs-real check (0: skip)")
    ap.add_argument("--rows-per-shard", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/gpte-scale")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--fts", action="store_true", help="keep the full-text index (off: saves build time)")
    ap.add_argument("--build-only", action="store_true", help="build the corpora and tables, run nothing")
    ap.add_argument("--keep", action="store_true", help="keep corpora and tables (a later call reuses them)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=2, metavar=("CORPUS", "DB"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("CORPUS", "DB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    overrides = json.loads(args.overrides)
    if args.run:
        print(json.dumps(run_child(*args.run, args.model, args.num_cpus, overrides)))
        return
    if args.build:
        print(json.dumps(build_table(*args.build, args.model, overrides), default=str))
        return

    os.makedirs(args.work, exist_ok=True)
    overrides = {"output.fts_index": args.fts, "resources.torch_threads": 1}
    model = stand_in_model(os.path.join(args.work, "stand-in-model"))
    results: dict = {"argv": sys.argv[1:], "loadavg_start": os.getloadavg(), "overrides": overrides}
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.check:
        results["check"] = check_small(args.work, args.check, model, args.num_cpus, overrides)
        say(f"check at {args.check} docs: direct table == real run's table (schema, fingerprint, rows); "
            f"rerun over it: {results['check']['rerun_unchanged']} unchanged, nothing embedded")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    for n in sizes:
        base = os.path.join(args.work, str(n))
        a, b, db = os.path.join(base, "a"), os.path.join(base, "b"), os.path.join(base, "db")
        pristine = os.path.join(base, "db-pristine")
        t = time.perf_counter()
        if not os.path.exists(os.path.join(base, "built.json")):
            shutil.rmtree(base, ignore_errors=True)
            write_corpus(a, n, args.rows_per_shard)
            edits = write_corpus(b, n, args.rows_per_shard, change=0.001)
            built = _sub(["--build", a, pristine], model, args.num_cpus, overrides)
            with open(os.path.join(base, "built.json"), "w") as f:
                json.dump({"build": built, "edits": edits}, f, default=str)
            say(f"N={n:,}: corpus + table built in {time.perf_counter() - t:.0f} s "
                f"(write {built['write_s']} s, indexes {built['index_s']} s: {built['upkeep']})")
        with open(os.path.join(base, "built.json")) as f:
            saved = json.load(f)
        built, edits = saved["build"], saved["edits"]
        if args.build_only:
            continue
        shutil.rmtree(db, ignore_errors=True)
        shutil.copytree(pristine, db)  # runs change the table; the pristine copy serves the next try
        res = {"build": built, "edits": edits}
        for name, corpus in (("unchanged", a), ("changed", b)):
            r = _sub(["--run", corpus, db], model, args.num_cpus, overrides)
            res[name] = r
            say(f"N={n:,} {name}: driver peak {r['driver_peak_mib']} MiB (before run "
                f"{r['driver_before_run_mib']}), wall {r['wall_s']} s, cluster CPU {r['cluster_cpu_s']} s "
                f"= {r['cluster_cpu_s'] / n * 1e6:.1f} µs/doc, stages {r['stage_seconds']}, counts {r['counts']}, "
                f"upkeep {r['upkeep']}")
        results[str(n)] = res
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.build_only:
        return
    for key in ("unchanged", "changed"):
        s = _slope(results, key, sizes)
        if s is not None:
            results[f"slope_{key}_bytes_per_doc"] = s
            say(f"driver peak slope, {key}: {s} B/doc between {sizes[0]:,} and {sizes[-1]:,}")
    if len(sizes) >= 2:
        ratio = results[str(sizes[-1])]["unchanged"]["wall_s"] / results[str(sizes[0])]["unchanged"]["wall_s"]
        results["unchanged_wall_ratio"] = round(ratio, 2)
        say(f"nothing-changed wall ratio {sizes[-1]:,} / {sizes[0]:,}: {ratio:.2f} (sizes x{sizes[-1] / sizes[0]:g})")
    last = results.get(str(sizes[-1])) if sizes else None
    if last:
        st = last["changed"]["stage_seconds"]
        say(f"N={sizes[-1]:,} changed: upkeep {st.get('upkeep', 0):.1f} s vs embed {st.get('embed', 0):.1f} s "
            f"= {st.get('upkeep', 0) / max(st.get('embed', 1e-9), 1e-9):.2f}x")
    fb = [int(x) for x in args.first_build.split(",") if x]
    for n in fb:
        base = os.path.join(args.work, f"first-{n}")
        shutil.rmtree(base, ignore_errors=True)
        write_corpus(os.path.join(base, "a"), n, args.rows_per_shard)
        r = _sub(["--run", os.path.join(base, "a"), os.path.join(base, "db")], model, args.num_cpus, overrides)
        results[f"first-{n}"] = {"first": r}
        say(f"first build N={n:,}: driver peak {r['driver_peak_mib']} MiB, wall {r['wall_s']} s, "
            f"stages {r['stage_seconds']}")
        shutil.rmtree(base, ignore_errors=True)
    if len(fb) >= 2:
        s = round((results[f"first-{fb[-1]}"]["first"]["driver_peak_mib"]
                   - results[f"first-{fb[0]}"]["first"]["driver_peak_mib"]) * 2**20 / (fb[-1] - fb[0]), 1)
        results["slope_first_build_bytes_per_doc"] = s
        say(f"driver peak slope, first build: {s} B/doc between {fb[0]:,} and {fb[-1]:,}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
