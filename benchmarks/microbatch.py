"""Embed compute only, in one process, no Ray: the job's Embedder over `plan_micro_batches`
(several token budgets / max_rows / windows) vs sentence-transformers encode(batch_size=32),
on the same texts and thread count. Isolates the compute efficiency of the micro-batch shapes
from the pipeline's fixed costs (Ray start, scan, worker start-up, model load).

Reports wall seconds and process CPU seconds of whole passes (best of --repeat) and, with
--per-batch K, the sum over micro-batches of each batch's best-of-K wall time: a compute
estimate that is robust when other work loads the machine (a preempted run is discarded).
The same `Embedder.embed` runs both the job's micro-batches and ST's own batches (sorted by
text length, 32 rows), so the comparison isolates batch shapes; `st model forward` runs ST's
batches through ST's own module for an implementation parity check.

  python benchmarks/microbatch.py --docs 2000 --corpus synthetic
  python benchmarks/microbatch.py --docs 2000 --corpus real --budgets 1024,2048,4096,8192
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
from throughput import MAX_LEN, load_docs, st_padding  # noqa: E402


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best wall, CPU seconds of that run) over `repeat` runs."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        run = (time.perf_counter() - w, time.process_time() - c)
        best = min(best, run)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--corpus", default="synthetic", choices=["real", "synthetic"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="1024,2048,4096,8192")
    ap.add_argument("--max-rows", default="256")
    ap.add_argument("--min-fill", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-st", action="store_true")
    ap.add_argument("--per-batch", type=int, default=0, metavar="K",
                    help="also time each micro-batch K times and sum the per-batch minima")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from gpte_ray.batching import padding_efficiency, plan_micro_batches
    from gpte_ray.config import ModelConfig
    from gpte_ray.embedder import Embedder
    from gpte_ray.spec import default_model_path, resolve_model
    from gpte_ray.tokenize import TextTokenizer

    torch.set_num_threads(args.threads)
    texts = [d["text"] for d in load_docs(args.corpus, args.docs)]
    spec = resolve_model(ModelConfig(long_documents="truncate", dtype="float32"))
    chunks = TextTokenizer(spec).encode(texts)
    ids = [c.input_ids for c in chunks]
    lengths = np.array([len(x) for x in ids])
    tokens = int(lengths.sum())
    emb = Embedder(spec, "cpu")
    print(f"# {args.corpus}: {len(texts)} docs, {tokens} tokens, {args.threads} threads, "
          f"loadavg {os.getloadavg()}", flush=True)
    out = {"corpus": args.corpus, "docs": len(texts), "tokens": tokens, "rows": []}

    def row(name: str, wall: float, cpu: float, eff: float, extra: str = "") -> None:
        out["rows"].append({"name": name, "wall": wall, "cpu": cpu, "padding_efficiency": eff})
        print(f"{name:<34} wall {wall:7.2f} s {tokens / wall:7.0f} tok/s   cpu {cpu:7.2f} s "
              f"{tokens / cpu:7.0f} tok/cpu-s   pad eff {eff:.3f} {extra}", flush=True)

    emb.embed(ids[:32])  # warm-up

    def per_batch(plan, fn) -> float:
        total = 0.0
        for b in plan:
            best = float("inf")
            for _ in range(args.per_batch):
                t = time.perf_counter()
                fn(b)
                best = min(best, time.perf_counter() - t)
            total += best
        return total

    st_order = np.argsort([-len(t) for t in texts], kind="stable")
    st_plan = [st_order[i : i + 32] for i in range(0, len(st_order), 32)]
    if args.per_batch:
        real, comp = padding_efficiency(lengths, st_plan)
        w = per_batch(st_plan, lambda b: emb.embed([ids[i] for i in b]))
        row("ST batches via Embedder (min/batch)", w, float("nan"), real / comp)
        if not args.no_st:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(default_model_path(), device="cpu")
            st.max_seq_length = MAX_LEN

            def st_fwd(b):
                feats = st.tokenize([texts[i] for i in b])
                with torch.inference_mode():
                    st.forward(feats)

            w = per_batch(st_plan, st_fwd)
            row("ST batches via ST forward (min/batch)", w, float("nan"), real / comp)
            del st
    if not args.no_st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(default_model_path(), device="cpu")
        st.max_seq_length = MAX_LEN
        st.encode(texts[:32], batch_size=32)
        if args.repeat:
            wall, cpu = timed(lambda: st.encode(texts, batch_size=32), args.repeat)
            real, comp = st_padding(texts, lengths, 32)
            row("st encode bs=32", wall, cpu, real / comp)
        del st

    for max_rows in (int(x) for x in args.max_rows.split(",")):
        for budget in (int(x) for x in args.budgets.split(",")):
            plan = []
            for s in range(0, len(ids), args.window):
                w = np.arange(s, min(s + args.window, len(ids)))
                plan += [w[b] for b in plan_micro_batches(lengths[w], budget, max_rows, args.min_fill)]
            real, comp = padding_efficiency(lengths, plan)

            def go(plan=plan):
                for b in plan:
                    emb.embed([ids[i] for i in b])

            sizes = [len(b) for b in plan]
            if args.per_batch:
                w = per_batch(plan, lambda b: emb.embed([ids[i] for i in b]))
                row(f"job b={budget} r={max_rows} (min/batch)", w, float("nan"), real / comp,
                    f"({len(plan)} batches, rows mean {np.mean(sizes):.0f} max {max(sizes)})")
            if not args.repeat:
                continue
            wall, cpu = timed(go, args.repeat)
            row(f"job budget={budget} max_rows={max_rows}", wall, cpu, real / comp,
                f"({len(plan)} batches, rows mean {np.mean(sizes):.0f} max {max(sizes)})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
