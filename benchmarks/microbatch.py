"""Embed compute only, in one process, no Ray: which micro-batch shapes cost least per token.

Runs the same texts through several batchings, with the same thread count:

  st-forward     sentence-transformers' own batches (sorted by text length, 32 rows) through
                 ST's own modules (tokenize + forward + pool + normalise): what encode() does
  st-batches     the same batches through the job's `Embedder.embed` (implementation parity)
  job b=B r=R    the job's `plan_micro_batches` (token budget B, max_rows R, min_fill, window)
                 through `Embedder.embed`

The methods are INTERLEAVED micro-batch by micro-batch (always advancing the one that is
furthest behind, by share of its tokens done), so that load from other processes hits all
methods alike; each method's time is the sum of its batches' wall times. CPU seconds of this
process are summed per batch too. Use --rounds K to repeat and keep each method's best round.

  python benchmarks/microbatch.py --docs 1000 --corpus synthetic
  python benchmarks/microbatch.py --docs 1000 --corpus real --budgets 1024,2048,4096,8192 --max-rows 64,256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from throughput import MAX_LEN, load_docs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--corpus", default="synthetic", choices=["real", "synthetic"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="2048,8192")
    ap.add_argument("--max-rows", default="256")
    ap.add_argument("--min-fill", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from gpte_ray.config import ModelConfig
    from gpte_ray.model.batching import padding_efficiency, plan_micro_batches
    from gpte_ray.model.embedder import Embedder
    from gpte_ray.model.spec import default_model_path, resolve_model
    from gpte_ray.model.tokenize import TextTokenizer

    torch.set_num_threads(args.threads)
    texts = [d["text"] for d in load_docs(args.corpus, args.docs)]
    spec = resolve_model(ModelConfig(long_documents="truncate", dtype="float32"))
    ids = [c.input_ids for c in TextTokenizer(spec).encode(texts)]
    lengths = np.array([len(x) for x in ids])
    tokens = int(lengths.sum())
    emb = Embedder(spec, "cpu")
    st = SentenceTransformer(default_model_path(), device="cpu")
    st.max_seq_length = MAX_LEN

    def st_forward(b):
        feats = st.tokenize([texts[i] for i in b])
        with torch.inference_mode():
            out = st.forward(feats)["sentence_embedding"]
        return out

    def job_embed(b):
        return emb.embed([ids[i] for i in b])

    st_order = np.argsort([-len(t) for t in texts], kind="stable")
    st_plan = [st_order[i : i + 32] for i in range(0, len(st_order), 32)]
    methods = [("st-forward", st_plan, st_forward), ("st-batches via Embedder", st_plan, job_embed)]
    for max_rows in (int(x) for x in args.max_rows.split(",")):
        for budget in (int(x) for x in args.budgets.split(",")):
            plan = []
            for s in range(0, len(ids), args.window):
                w = np.arange(s, min(s + args.window, len(ids)))
                plan += [w[b] for b in plan_micro_batches(lengths[w], budget, max_rows, args.min_fill)]
            methods.append((f"job b={budget} r={max_rows}", plan, job_embed))
    for _, plan, fn in methods:
        fn(plan[len(plan) // 2])  # warm-up

    print(f"# {args.corpus}: {len(texts)} docs, {tokens} tokens, {args.threads} threads, "
          f"loadavg {[round(x, 1) for x in os.getloadavg()]}", flush=True)
    best = {name: (float("inf"), 0.0) for name, _, _ in methods}
    for r in range(args.rounds):
        wall = {name: 0.0 for name, _, _ in methods}
        cpu = dict(wall)
        done = {name: 0 for name, _, _ in methods}
        pos = {name: 0 for name, _, _ in methods}
        while True:
            live = [m for m in methods if pos[m[0]] < len(m[1])]
            if not live:
                break
            name, plan, fn = min(live, key=lambda m: done[m[0]])
            b = plan[pos[name]]
            t, c = time.perf_counter(), time.process_time()
            fn(b)
            wall[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
            done[name] += int(lengths[b].sum())
            pos[name] += 1
        for name in wall:
            best[name] = min(best[name], (wall[name], cpu[name]))
        print(f"  round {r + 1}: loadavg {[round(x, 1) for x in os.getloadavg()]}", flush=True)

    out = {"corpus": args.corpus, "docs": len(texts), "tokens": tokens, "threads": args.threads, "rows": []}
    ref = best["st-forward"][0]
    for name, plan, _ in methods:
        w, c = best[name]
        real, comp = padding_efficiency(lengths, plan)
        sizes = [len(b) for b in plan]
        out["rows"].append({"name": name, "wall": w, "cpu": c, "padding_efficiency": real / comp,
                            "batches": len(plan), "speedup_vs_st": ref / w})
        print(f"{name:<26} {w:7.2f} s {tokens / w:7.0f} tok/s  cpu {c:7.2f} s  x{ref / w:5.2f} vs st  "
              f"pad eff {real / comp:.3f}  {len(plan):4d} batches rows mean {np.mean(sizes):4.0f} "
              f"max {max(sizes)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
