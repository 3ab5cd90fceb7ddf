"""CPU lanes against one multi-threaded forward, in one process, no Ray: the same micro-batches
(the job's own plan_micro_batches over the job's own token ids), quiet and beside a competing
process, for the real model and the stand-in.

  one     torch.set_num_threads(T); the micro-batches one after another (the job before lanes)
  lanes   torch.set_num_threads(1); T threads take the micro-batches first come, first served
          (run.lanes.Lanes, as the CPU embed actor runs them)

`--noise F` runs a second process that keeps one core busy a fraction F of the time (4 ms
periods), standing in for the tokenize actor, reads and Ray's own processes beside the embed
actor. The two methods alternate per round; the best round of each is printed, and the ratio.

  python benchmarks/lanes.py --docs 1000 --noise 0,0.4 --models minilm,standin --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CPU embed actor sets it

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from throughput import load_docs  # noqa: E402

NOISE = "import time, sys\nf = float(sys.argv[1])\nwhile True:\n    t = time.perf_counter()\n" \
        "    while time.perf_counter() - t < 0.004 * f: pass\n    time.sleep(0.004 * (1 - f))\n"


def one(emb, batches: list, threads: int) -> float:
    """The micro-batches one after another, each forward over `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    t = time.perf_counter()
    for b in batches:
        emb.embed(b)
    return time.perf_counter() - t


def side_by_side(emb, batches: list, lanes) -> float:
    """The micro-batches in `lanes`, each forward on one thread."""
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    for f in [lanes.submit(emb.embed, b) for b in batches]:
        f.result()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--noise", default="0,0.4", help="comma list of busy fractions of the competing process")
    ap.add_argument("--models", default="minilm,standin")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from feed import make_standin

    from gpte_ray.config import ModelConfig
    from gpte_ray.model.batching import plan_micro_batches
    from gpte_ray.model.embedder import Embedder
    from gpte_ray.model.spec import resolve_model
    from gpte_ray.model.tokenize import TextTokenizer
    from gpte_ray.run.lanes import Lanes

    texts = [d["text"] for d in load_docs("real", args.docs)]
    print(f"# {len(texts)} real documents, {args.threads} threads, token budget {args.budget}")
    print(f"{'model':<9}{'noise':>6}{'one s':>9}{'lanes s':>9}{'one/lanes':>11}")
    for model in args.models.split(","):
        path = make_standin(os.path.join(tempfile.mkdtemp(), "standin")) if model == "standin" else None
        spec = resolve_model(ModelConfig(path=path, long_documents="truncate", dtype="float32"))
        ids = [c.input_ids for c in TextTokenizer(spec).encode(texts)]
        lengths = np.array([len(x) for x in ids])
        plan = [b for s in range(0, len(ids), 2048)
                for b in (s + m for m in plan_micro_batches(lengths[s : s + 2048], args.budget, 256, 0.95))]
        emb = Embedder(spec, "cpu")
        lanes = Lanes(args.threads)
        batches = [[ids[i] for i in rows] for rows in plan]
        emb.embed(batches[0])  # warm-up
        for noise in (float(x) for x in args.noise.split(",")):
            hog = subprocess.Popen([sys.executable, "-c", NOISE, str(noise)]) if noise > 0 else None
            try:
                best = {"one": float("inf"), "lanes": float("inf")}
                for _ in range(args.rounds):
                    best["one"] = min(best["one"], one(emb, batches, args.threads))
                    best["lanes"] = min(best["lanes"], side_by_side(emb, batches, lanes))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            print(f"{model:<9}{noise:>6.2f}{best['one']:>9.2f}{best['lanes']:>9.2f}"
                  f"{best['one'] / best['lanes']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
