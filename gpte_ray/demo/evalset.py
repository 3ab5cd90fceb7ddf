"""An offline retrieval set in the BEIR layout, built from installed-package docstrings.

`python -m gpte_ray.demo.evalset OUT_DIR N_DOCS` writes OUT_DIR/corpus, queries.jsonl, qrels.tsv.
"""

from __future__ import annotations

import csv
import json
import os
import re

__all__ = ["build_docstring_retrieval_set", "split_first_sentence"]

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def split_first_sentence(doc: str) -> tuple[str, str]:
    """(first sentence, the rest) of a docstring; the sentence ends at . ! ? or its paragraph."""
    doc = doc.strip()
    para_end = doc.find("\n\n")
    para = doc if para_end < 0 else doc[:para_end]
    m = _SENTENCE_END.search(para)
    end = m.end() if m else len(para)
    return " ".join(doc[:end].split()), doc[end:].strip()


def _good_query(sentence: str) -> bool:
    words = sentence.split()
    return 4 <= len(words) <= 40 and not sentence.startswith((">>>", "..", ":", "-", "=", "|"))


def build_docstring_retrieval_set(out_dir: str, n_docs: int, rows_per_shard: int = 1000,
                                  root: str | None = None, max_chars: int | None = None) -> dict:
    """A small BEIR-layout retrieval set built offline from installed-package docstrings.

    Query = a docstring's first sentence; its one relevant document (grade 1) = the rest of
    that docstring, indexed WITHOUT the first sentence, so the query is not a substring of it.
    Docstrings whose first sentence is too short or long, whose rest is under 80 characters,
    or whose first sentence or rest repeats an earlier one are left out, so each query has a
    single right answer; with `max_chars`, so are those whose rest is longer (a quicker set).
    Writes out_dir/corpus/part-*.parquet (id, title, module, text), out_dir/queries.jsonl and
    out_dir/qrels.tsv; returns their paths and counts.
    """
    from gpte_ray.demo.corpus import docstring_docs, write_shards

    docs, queries = [], []
    seen_q: set[str] = set()
    seen_body: set[str] = set()
    for d in docstring_docs(10**9, root=root):
        first, rest = split_first_sentence(d["text"])
        key_q, key_b = first.lower(), " ".join(rest.split()).lower()
        too_long = max_chars is not None and len(rest) > max_chars
        if not _good_query(first) or len(rest) < 80 or too_long or key_q in seen_q or key_b in seen_body:
            continue
        seen_q.add(key_q)
        seen_body.add(key_b)
        docs.append({"id": d["id"], "title": d["title"], "module": d["module"], "text": rest})
        queries.append({"_id": f"q{len(queries):06d}", "text": first, "doc": d["id"]})
        if len(docs) >= n_docs:
            break
    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus")
    shards = write_shards(iter(docs), corpus, rows_per_shard=rows_per_shard)
    qpath, rpath = os.path.join(out_dir, "queries.jsonl"), os.path.join(out_dir, "qrels.tsv")
    with open(qpath, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({"_id": q["_id"], "text": q["text"]}, ensure_ascii=False) + "\n")
    with open(rpath, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["query-id", "corpus-id", "score"])
        for q in queries:
            w.writerow([q["_id"], q["doc"], 1])
    return {"corpus": corpus, "shards": shards, "queries": qpath, "qrels": rpath, "docs": len(docs)}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m gpte_ray.demo.evalset OUT_DIR N_DOCS")
    built = build_docstring_retrieval_set(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({k: v for k, v in built.items() if k != "shards"}))
