"""Feed: can the CPU side keep an accelerator busy? The whole pipeline with a stand-in model.

The stand-in is a one-layer BERT with hidden size 32 and the real all-MiniLM-L6-v2 tokenizer,
packaged as a sentence-transformers folder (mean pooling, normalise, 256 tokens), so its
forward costs almost nothing and every second the job spends is feeding cost: reading,
tokenising, moving token ids, padding, writing. Per corpus (docstrings of the installed
packages, `gpte_ray.demo.corpus.docstring_docs`; and the seeded long-tailed `synthetic_docs`):

  tokenizer   the bare fast tokenizer over the same texts on one core (TOKENIZERS_PARALLELISM
              off), as `TextTokenizer` calls it: the ceiling a single core could feed.
  job         `run_index` end to end on Parquet shards (1,000 rows each) up to the committed
              table, in a fresh subprocess with its own local Ray (`num_cpus` = --cpus; Ray's
              start is timed apart and not counted). With --baseline DIR the same run is also
              made with the gpte_ray package of DIR (e.g. a `git worktree` of an older commit),
              alternating with this tree's, so both see the same load from other work.

Printed per run: documents/s and tokens/s, and both per CPU core (divided by --cpus); the run
report's embed-actor figures where the tree has them: the share of embed actor wall time
spent outside the model's forward, and the seconds embed actors waited for input. Targets
(issue 15) are checked against the baseline measured in the same run.

  python benchmarks/feed.py --docs 60000 --baseline /tmp/base --out feed.json
  python benchmarks/feed.py --docs 3000 --model minilm --corpora real     # real MiniLM on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


def make_standin(folder: str) -> str:
    """One BERT layer, hidden 32, random weights (seeded), the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gpte_ray.model.spec import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}, f)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 256, "do_lower_case": False}, f)
    return folder


def load_docs(corpus: str, n: int) -> list[dict]:
    from gpte_ray.demo.corpus import docstring_docs, synthetic_docs

    gen = docstring_docs(2 * n + 100) if corpus == "real" else synthetic_docs(n)
    docs, seen = [], set()
    for d in gen:  # unique ids: a property's getter and setter share a qualname
        if d["id"] not in seen:
            seen.add(d["id"])
            docs.append({"id": d["id"], "text": d["text"]})
            if len(docs) == n:
                break
    return docs


def tokenizer_rate(model: str, texts: list[str], rounds: int = 3) -> dict:
    """Documents/s of the bare fast tokenizer on one core (best of `rounds`), called two ways:
    the transformers call (`tok(texts)`, ids + masks as Python lists), and the Rust backend's
    `encode_batch_fast` (ids only), which the job's tokenize stage calls."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 1 << 30
    calls = {
        "transformers": lambda: tok(texts, add_special_tokens=True)["input_ids"],
        "backend": lambda: [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)],
    }
    out = {}
    for name, call in calls.items():
        best, tokens = float("inf"), 0
        for _ in range(rounds):
            t = time.perf_counter()
            ids = call()
            best = min(best, time.perf_counter() - t)
            tokens = sum(map(len, ids))
        out[name] = {"seconds": best, "docs_per_s": len(texts) / best, "tokens_per_s": tokens / best}
    out["docs_per_s"] = max(v["docs_per_s"] for v in out.values())  # the stricter reference
    return out


def run_tree(tree: str, model: str, shards: str, cpus: int, docs: int, overrides: dict | None = None) -> dict:
    """One `run_index` in a fresh subprocess importing gpte_ray from `tree` (`overrides`: job
    config keys, as --set gives them)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    db = tempfile.mkdtemp(prefix="feed-db-")
    args = json.dumps({"model": model, "shards": shards, "cpus": cpus, "db": db, "docs": docs,
                       "overrides": overrides or {}})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"job under {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    """Inside the subprocess: Ray start (timed apart), then one run_index; prints one JSON line."""
    import logging

    import ray

    import gpte_ray
    from gpte_ray.config import load_config
    from gpte_ray.run.pipeline import run_index

    t = time.perf_counter()
    ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t
    cfg = load_config(None, {
        "input.paths": [spec["shards"]], "output.db": spec["db"], "output.table": "feed",
        "model.path": spec["model"], "model.dtype": "float32", "resources.device": "cpu", **spec["overrides"],
    })
    t = time.perf_counter()
    report = run_index(cfg)
    wall = time.perf_counter() - t
    ray.shutdown()
    out = json.loads(report.to_json())
    out = {k: v for k, v in out.items() if k not in ("timeline", "length_histogram", "buckets", "upkeep")}
    out.update(ray_start=ray_start, wall=wall, package=os.path.dirname(gpte_ray.__file__))
    print(json.dumps(out))


def stages_child(spec: dict) -> None:
    """Inside a subprocess: the tokenize and embed stages called directly on 2,048-row windows
    (no Ray, no writer, one torch thread), tokenize then embed per window, each timed."""
    import pyarrow.parquet as pq
    import torch

    import gpte_ray
    from gpte_ray.config import ModelConfig
    from gpte_ray.model.spec import resolve_model
    from gpte_ray.run.stages import EmbedOptions, EmbedStage, TokenizeStage

    torch.set_num_threads(1)
    model = resolve_model(ModelConfig(path=spec["model"], dtype="float32"))
    import pyarrow as pa

    shards = pq.read_table(spec["shards"])
    docs = pa.table({"doc_id": shards["id"], "text": shards["text"], "content_hash": shards["id"]})
    tok, emb = TokenizeStage(model), EmbedStage(model, EmbedOptions("cpu", 8192, 256, 0.9, 1))
    emb(tok(docs.slice(0, 64)))  # warm-up
    fig = getattr(emb, "figures", None)  # the embed actor's own accounting, where the tree has it
    forward0 = fig.forward if fig else 0.0
    tok_s = emb_s = 0.0
    chunks = 0
    for start in range(0, docs.num_rows, 2048):
        t = time.perf_counter()
        w = tok(docs.slice(start, 2048))
        t2 = time.perf_counter()
        emb(w)
        tok_s, emb_s = tok_s + t2 - t, emb_s + time.perf_counter() - t2
        chunks += w.num_rows
    print(json.dumps({"docs": docs.num_rows, "chunks": chunks, "tokenize_s": tok_s, "embed_s": emb_s,
                      "forward_s": fig.forward - forward0 if fig else None,
                      "package": os.path.dirname(gpte_ray.__file__)}))


def run_stages(tree: str, model: str, shards: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--stages-child",
                           json.dumps({"model": model, "shards": shards})], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"stages under {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(r: dict, cpus: int) -> dict:
    """The figures this benchmark prints, from one run's report."""
    wall = r["wall"]
    s = {
        "docs": r["docs_embedded"], "tokens": r["tokens"], "seconds": wall,
        "docs_per_s": r["docs_embedded"] / wall, "tokens_per_s": r["tokens"] / wall,
        "stages": r.get("stage_seconds", {}), "padding_efficiency": r.get("padding_efficiency"),
    }
    s["docs_per_s_core"] = s["docs_per_s"] / cpus
    s["tokens_per_s_core"] = s["tokens_per_s"] / cpus
    cost = r.get("cost") or {}
    if cost.get("outside_forward_share") is not None:
        s["outside_forward"] = cost["outside_forward_share"]  # of the actors' time after model load
        s["input_wait_s"] = cost["embed_input_wait_seconds"]
        s["cost"] = cost
    return s


def fmt(name: str, s: dict) -> str:
    outside = f"{s['outside_forward']:.3f}" if "outside_forward" in s else "  n/a"
    wait = f"{s['input_wait_s']:7.2f}" if "input_wait_s" in s else "    n/a"
    return (f"{name:<22} {s['seconds']:7.2f} s {s['docs_per_s']:8.0f} docs/s {s['tokens_per_s']:9.0f} tok/s"
            f"  per core {s['docs_per_s_core']:7.0f} docs/s {s['tokens_per_s_core']:8.0f} tok/s"
            f"  outside fwd {outside}  input wait {wait} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=60000)
    ap.add_argument("--corpora", default="real,synthetic")
    ap.add_argument("--model", default="standin", help="standin, minilm, or a model folder")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs per tree; the fastest counts")
    ap.add_argument("--baseline", default=None, help="a source tree whose gpte_ray is the baseline")
    ap.add_argument("--trees", default=None, help="only these trees: 'new', 'base' or 'new,base'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="job config override for every tree, e.g. resources.torch_threads=1 (repeatable)")
    ap.add_argument("--stages", action="store_true",
                    help="also time the tokenize and embed stages in one process, per tree (no Ray)")
    ap.add_argument("--no-jobs", action="store_true", help="only the bare tokenizer (and --stages)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stages-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.stages_child:
        return stages_child(json.loads(args.stages_child))

    sys.path.insert(0, TREE)
    from gpte_ray.demo.corpus import write_shards
    from gpte_ray.model.spec import default_model_path

    work = tempfile.mkdtemp(prefix="feed-")
    model = {"standin": None, "minilm": default_model_path()}.get(args.model, args.model)
    model = model or make_standin(os.path.join(work, "standin"))
    trees = {"new": TREE}
    if args.baseline:
        trees["base"] = os.path.abspath(args.baseline)
    if args.trees:
        trees = {k: v for k, v in trees.items() if k in args.trees.split(",")}
    overrides = dict(kv.split("=", 1) for kv in args.set)  # strings: the config parses them
    print(f"# model {args.model}, {args.cpus} CPUs for Ray, trees {trees}, overrides {overrides}, "
          f"loadavg {[round(x, 1) for x in os.getloadavg()]}", flush=True)
    results: dict = {"model": args.model, "cpus": args.cpus, "corpora": {}}
    for corpus in args.corpora.split(","):
        docs = load_docs(corpus, args.docs)
        shards = os.path.join(work, f"shards-{corpus}")
        write_shards(iter(docs), shards, rows_per_shard=1000)
        tok = tokenizer_rate(model, [d["text"] for d in docs])
        print(f"[{corpus}] {len(docs)} docs; bare tokenizer, one core: transformers call "
              f"{tok['transformers']['docs_per_s']:.0f} docs/s {tok['transformers']['tokens_per_s']:.0f} tok/s, "
              f"backend encode_batch_fast {tok['backend']['docs_per_s']:.0f} docs/s "
              f"{tok['backend']['tokens_per_s']:.0f} tok/s", flush=True)
        if args.stages:
            for name, tree in trees.items():
                r = run_stages(tree, model, shards)
                fwd = f"forward {r['forward_s']:.2f} s" if r["forward_s"] is not None else "forward n/a"
                print(f"  stages {name:<5} tokenize {r['docs'] / r['tokenize_s']:7.0f} docs/s  embed stage "
                      f"{r['docs'] / r['embed_s']:7.0f} docs/s ({r['embed_s']:.2f} s, {fwd})  "
                      f"both {r['docs'] / (r['tokenize_s'] + r['embed_s']):7.0f} docs/s on one core", flush=True)
                results.setdefault("stages", {}).setdefault(corpus, {})[name] = r
        runs: dict[str, list] = {k: [] for k in trees}
        for r in range(0 if args.no_jobs else args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                s = summarise(run_tree(trees[name], model, shards, args.cpus, len(docs), overrides), args.cpus)
                runs[name].append(s)
                print(f"  round {r + 1} " + fmt(name, s) + f"  loadavg {os.getloadavg()[0]:.1f}", flush=True)
        best = {k: min(v, key=lambda s: s["seconds"]) for k, v in runs.items() if v}
        for name, s in best.items():
            print("  best    " + fmt(name, s), flush=True)
        if "new" in best:
            new = best["new"]
            ratio_tok = new["docs_per_s"] / tok["docs_per_s"]
            print(f"  job docs/s / faster bare tokenizer (one core) = {ratio_tok:.2f} "
                  f"(target >= 0.5: {'ok' if ratio_tok >= 0.5 else 'MISSED'})")
            if "base" in best:
                ratio = new["docs_per_s"] / best["base"]["docs_per_s"]
                print(f"  job docs/s new / base = {ratio:.2f} (target >= 3: {'ok' if ratio >= 3 else 'MISSED'})")
            if "outside_forward" in new:
                print(f"  embed actor time outside forward: {new['outside_forward']:.3f}; "
                      f"input wait {new['input_wait_s']:.2f} s; cost {json.dumps(new['cost'])}")
        results["corpora"][corpus] = {"tokenizer": tok, "runs": runs, "best": best}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
