"""`gpte-ray check-model`: a model through the job's own path, beside sentence-transformers.

A handful of texts are tokenised and embedded exactly as the embed actors do (TextTokenizer,
Embedder, the output kind's post-processing), as documents and as queries with their prompts,
and, when sentence-transformers is installed and the folder is one of its models, through its
`encode` too. The resolved settings and the largest difference come back, so a pooling or
prompt mismatch shows before a night of embedding, not after.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpte_ray.config import ModelConfig
from gpte_ray.model.spec import ModelSpec, backbone_class, resolve_model

__all__ = ["DEFAULT_TEXTS", "check_model", "embed_with_job", "settings"]

DEFAULT_TEXTS = (
    "How do I read a Parquet file into a table?",
    "short",
    "Ünïcödé, emoji 🎉 and punctuation: (a), [b]; {c}!",
    "A longer passage about batch embedding: documents are tokenised, sorted by length, cut into "
    "micro-batches by a token budget, run through the model and pooled into vectors.",
)
# the reference's class per output kind, as sentence-transformers 6 names them
_REFERENCE = {"dense": "SentenceTransformer", "multi-vector": "MultiVectorEncoder", "sparse": "SparseEncoder"}


def settings(spec: ModelSpec) -> dict:
    """What the job resolved from the model's files and the config, as check-model prints it."""
    return {"model": spec.model_id, "backbone": backbone_class(spec), "model_type": spec.model_type,
            "output": spec.output, "pooling": spec.pooling, "normalize": spec.normalize, "dim": spec.dim,
            "full_dim": spec.full_dim, "max_length": spec.max_length, "padding_side": spec.padding_side,
            "document_prompt": spec.document_prefix + ("{text}" + spec.document_suffix if spec.document_suffix else ""),
            "query_prompt": spec.query_prefix + ("{text}" + spec.query_suffix if spec.query_suffix else ""),
            "include_prompt_in_pooling": spec.include_prompt, "dense_layers": len(spec.dense),
            "dtype": "float32 (CPU check)" if spec.dtype == "auto" else spec.dtype, "precision": spec.precision}


def embed_with_job(spec: ModelSpec, texts: list[str], role: str) -> list:
    """Each text's stored output as the job computes it on the CPU, in float32 (rows of
    model.outputs.Embeddings: a vector, a (tokens, dim) array, or (ids, weights)); texts that
    do not fit are truncated here, one output per text."""
    from gpte_ray.model.embedder import Embedder
    from gpte_ray.model.tokenize import TextTokenizer

    spec = dataclasses.replace(spec, precision="float32", long_documents="truncate",
                               dtype="float32" if spec.dtype == "auto" else spec.dtype)
    chunks = TextTokenizer(spec).encode(texts, role)
    emb = Embedder(spec, "cpu", role=role).embed_outputs([c.input_ids for c in chunks],
                                                         [c.prompt_len for c in chunks])
    return [emb.row(i) for i in range(len(chunks))]


def _reference(spec: ModelSpec, texts: list[str], role: str) -> list | None:
    """sentence-transformers' encode of the same texts, or None where it does not apply."""
    try:
        import sentence_transformers as st
    except ImportError:
        return None
    folder = spec.local_folder()
    if not (folder / "modules.json").exists():
        return None  # a plain transformers model: sentence-transformers would guess a pooling
    model = getattr(st, _REFERENCE[spec.output])(str(folder), device="cpu", trust_remote_code=spec.trust_remote_code)
    prompt = spec.query_prefix if role == "query" else spec.document_prefix
    if spec.output == "multi-vector":
        task = "query" if role == "query" else None  # as encode_query: the skiplist is the documents'
        return [model.encode(t, prompt=prompt, task=task, convert_to_numpy=True) for t in texts]
    out = model.encode(texts, prompt=prompt)
    if spec.output == "sparse":
        dense = out.to_dense().numpy()
        return [(np.flatnonzero(r), r[np.flatnonzero(r)]) for r in dense]
    return list(np.asarray(out))


def _difference(spec: ModelSpec, ours, ref) -> float:
    """The largest absolute difference of one text's outputs (inf where their shapes differ);
    dense vectors are compared at unit length (sentence-transformers does not renormalise
    after truncate_dim)."""
    if spec.output == "sparse":
        (a_ids, a_w), (b_ids, b_w) = ours, ref
        if len(a_ids) != len(b_ids) or (a_ids != b_ids).any():
            return float("inf")
        return float(np.abs(a_w - b_w).max(initial=0.0))
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if spec.output == "dense":
        b = b[: spec.dim]
        a, b = a / max(np.linalg.norm(a), 1e-12), b / max(np.linalg.norm(b), 1e-12)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max(initial=0.0))


def check_model(cfg: ModelConfig, texts: list[str] | None = None, tolerance: float = 1e-4) -> dict:
    """The resolved settings, and the largest difference from sentence-transformers over
    `texts` as documents and as queries (None: no reference); `ok` when within `tolerance`."""
    spec = resolve_model(cfg)
    texts = list(texts or DEFAULT_TEXTS)
    result = {"settings": settings(spec), "texts": len(texts), "tolerance": tolerance}
    worst = None
    for role in ("document", "query"):
        ours = embed_with_job(spec, texts, role)
        ref = _reference(spec, texts, role)
        if ref is None:
            continue
        diffs = [_difference(spec, a, b) for a, b in zip(ours, ref)]
        result[f"{role}_difference"] = max(diffs)
        worst = max(diffs) if worst is None else max(worst, max(diffs))
    if worst is not None:
        import sentence_transformers

        result["reference"] = f"sentence-transformers {sentence_transformers.__version__} {_REFERENCE[spec.output]}"
    else:
        result["reference"] = None
    result["largest_difference"] = worst
    result["ok"] = worst is None or worst <= tolerance
    return result
