"""Corpora built offline: docstrings of the installed Python packages, and a synthetic
long-tailed one. For the README demo, the benchmarks and the tests."""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["docstring_docs", "synthetic_docs", "write_shards"]


def docstring_docs(limit: int, root: str | None = None, min_chars: int = 40) -> Iterator[dict]:
    """Module, class and function docstrings under site-packages, parsed with ast (no imports).

    Deterministic: files are visited in sorted order. Each document has id `module:qualname`,
    a `title` and the docstring as `text`.
    """
    base = Path(root or sysconfig.get_paths()["purelib"])
    seen = 0
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            module = ".".join(path.relative_to(base).with_suffix("").parts)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for qualname, node in _documented(tree, module):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield {"id": f"{module}:{qualname}", "title": qualname, "module": module, "text": doc}
                    seen += 1
                    if seen >= limit:
                        return


def _documented(tree: ast.Module, module: str):
    yield "", tree
    stack = [(n, "") for n in tree.body]
    while stack:
        node, prefix = stack.pop(0)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = f"{prefix}{node.name}"
            yield qual, node
            if isinstance(node, ast.ClassDef):
                stack.extend((n, f"{qual}.") for n in node.body)


_WORDS = (
    "vector index shard ray cluster embedding token batch model query document search table "
    "lance storage object bucket night change update delete insert chunk window budget pad "
    "accelerator memory stream actor pool worker driver commit version fragment schema"
).split()


def synthetic_docs(n: int, seed: int = 0) -> Iterator[dict]:
    """Texts whose word counts follow a long tail (log-normal, 3 to ~3000 words)."""
    rng = random.Random(seed)
    for i in range(n):
        words = min(3000, max(3, int(rng.lognormvariate(3.6, 1.1))))
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        yield {"id": f"syn-{i:07d}", "title": f"doc {i}", "module": "synthetic", "text": text}


def write_shards(docs: Iterator[dict], out_dir: str, rows_per_shard: int = 1000) -> list[str]:
    """Write documents as Parquet shards part-00000.parquet, ...; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths, buf = [], []

    def flush() -> None:
        path = os.path.join(out_dir, f"part-{len(paths):05d}.parquet")
        pq.write_table(pa.Table.from_pylist(buf), path)
        paths.append(path)
        buf.clear()

    for d in docs:
        buf.append(d)
        if len(buf) >= rows_per_shard:
            flush()
    if buf:
        flush()
    return paths
