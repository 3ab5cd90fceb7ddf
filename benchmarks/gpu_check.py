"""GPU precision check (issue: the GPTE embedder): float16 / bfloat16 forward vs float32.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_check.py
Prints the minimum cosine per dtype for the packaged all-MiniLM-L6-v2 and a random
BERT-base built from a config (no download); the bar is >= 0.999.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np
import torch

from gpte_ray.batching import plan_micro_batches
from gpte_ray.config import ModelConfig
from gpte_ray.corpus import docstring_docs
from gpte_ray.embedder import Embedder, postprocess
from gpte_ray.spec import default_model_path, resolve_model
from gpte_ray.tokenize import TextTokenizer


def embed(spec, texts, device):
    chunks = TextTokenizer(spec).encode(texts)
    emb = Embedder(spec, device)
    out = np.zeros((len(chunks), spec.full_dim), np.float32)
    for rows in plan_micro_batches(TextTokenizer.lengths(chunks), 32768, 256):
        out[rows] = emb.embed([chunks[i].input_ids for i in rows], [chunks[i].prompt_len for i in rows])
    return postprocess(out, spec, None)


def random_bert_base() -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tempfile.mkdtemp(prefix="bert-base-")
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)  # BertConfig() defaults are BERT-base
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--docs", type=int, default=500)
    args = p.parse_args()
    texts = [d["text"] for d in docstring_docs(args.docs)]
    print(f"device={args.device} torch={torch.__version__} docs={len(texts)}")
    for name, path in [("all-MiniLM-L6-v2", None), ("random-bert-base", random_bert_base())]:
        spec = resolve_model(ModelConfig(path=path, dtype="float32", long_documents="truncate"))
        ref = embed(spec, texts, args.device)
        for dtype in ("float16", "bfloat16"):
            if args.device == "cpu" and dtype == "float16":
                continue
            got = embed(dataclasses.replace(spec, dtype=dtype), texts, args.device)
            cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
            verdict = "ok" if cos.min() >= 0.999 else "BELOW 0.999"
            print(f"{name:18s} {dtype:9s} min cosine vs float32 = {cos.min():.6f}  mean = {cos.mean():.6f}  {verdict}")


if __name__ == "__main__":
    main()
