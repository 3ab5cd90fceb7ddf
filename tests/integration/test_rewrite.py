"""A shard rewritten while a run reads it (issue 25): the table never holds a wrong or doubled row.

Two Parquet shards of 120 documents, windows of 16 rows. Night 2 edits 10% of the documents;
at some point of that night the shards are rewritten (the same rows in another order, rows
edited, rows removed), as an exporter re-publishing its corpus does. Whatever the night did
(refused, or committed the snapshot it planned on), after the rerun the table equals a fresh
index of the corpus: same keys once each, same hashes, same vectors.
"""

from __future__ import annotations

import os
import random
import threading
import time

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gpte_ray.run.planning as planning
from gpte_ray.config import load_config
from gpte_ray.input.pins import ShardChangedError
from gpte_ray.input.prepare import content_hash
from gpte_ray.run.pipeline import run_index
from gpte_ray.store.table import TableStore

pytestmark = pytest.mark.ray

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])


def _docs(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta shard table vector night index model token window".split()
    return [{"id": f"d{i:03d}", "text": f"document {i}: " + " ".join(rng.choice(words) for _ in range(12))}
            for i in range(n)]


def _write(folder: str, docs: list[dict], shards: int = 2) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    per = (len(docs) + shards - 1) // shards
    paths = []
    for s in range(shards):
        p = os.path.join(folder, f"part-{s}.parquet")
        _atomic_write(p, docs[s * per:(s + 1) * per])
        paths.append(p)
    return paths


def _atomic_write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)  # what exporters do; the new file has a new inode, size and mtime


def _rewrite(path: str, kind: str) -> None:
    rows = pq.read_table(path).to_pylist()
    if kind == "reorder":
        rows = rows[::-1]
    elif kind == "edit":
        rows = [{**r, "text": r["text"] + " (revised)"} if i % 3 == 0 else r for i, r in enumerate(rows)]
    elif kind == "remove":
        rows = [r for i, r in enumerate(rows) if i % 8 != 3]  # a few documents gone (under the guard)
    _atomic_write(path, rows)


def _cfg(folder: str, db: str, **over):
    return load_config(None, {"input.paths": [folder], "output.db": db, "output.table": "docs",
                              "batch.window_rows": 16, **over})


def _rows(db: str) -> dict[tuple[str, int], tuple[str, np.ndarray]]:
    t = lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id", "chunk", "content_hash", "vector"])
    keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)), "a (doc_id, chunk) key is stored twice"
    vectors = np.stack(t["vector"].to_numpy(zero_copy_only=False))
    return {k: (h, v) for k, h, v in zip(keys, t["content_hash"].to_pylist(), vectors)}


def assert_fresh(folder: str, db: str, tmp_path) -> None:
    """The table equals a fresh index of the corpus in `folder` (keys, hashes, vectors)."""
    corpus = {r["id"]: content_hash(r["text"]) for p in sorted(os.listdir(folder)) if p.endswith(".parquet")
              for r in pq.read_table(os.path.join(folder, p)).to_pylist()}
    got = _rows(db)
    assert {d: h for (d, _), (h, _) in got.items()} == corpus
    fresh_db = str(tmp_path / f"fresh-{time.monotonic_ns()}")
    run_index(_cfg(folder, fresh_db))
    want = _rows(fresh_db)
    assert got.keys() == want.keys()
    for k, (h, v) in want.items():
        assert got[k][0] == h
        np.testing.assert_allclose(got[k][1], v, atol=1e-5)


def _night2(folder: str, docs: list[dict]) -> list[dict]:
    """Edit 10% of the documents (every 10th), in place in their shards."""
    edited = [{**d, "text": d["text"] + " edited tonight"} if i % 10 == 0 else d for i, d in enumerate(docs)]
    _write(folder, edited)
    return edited


def _run_tolerating_refusal(cfg):
    """Run a night; a refusal naming the rewritten shard is one of the two right outcomes."""
    try:
        return run_index(cfg)
    except ShardChangedError as e:
        assert "part-" in str(e) and "changed while this run read it" in str(e), str(e)
        assert len(str(e).splitlines()) == 1
        return None


def _first_night(tmp_path) -> tuple[str, str, list[dict]]:
    folder, db = str(tmp_path / "corpus"), str(tmp_path / "db")
    docs = _docs()
    _write(folder, docs)
    run_index(_cfg(folder, db))
    return folder, db, _night2(folder, docs)


# the reorder (the reproduction) in every run; edits and removals, which tests/unit/test_pins.py
# covers without Ray, end to end in the long lane
LONG = pytest.mark.long


@pytest.mark.parametrize("kind", ["reorder", pytest.param("edit", marks=LONG), pytest.param("remove", marks=LONG)])
def test_shard_rewritten_after_planning(ray_session, tmp_path, monkeypatch, kind):
    """The issue's reproduction: rewritten once the run has planned (its pins are read)."""
    folder, db, _ = _first_night(tmp_path)
    real = planning.read_pins

    def read_then_rewrite(*a, **k):
        pins = real(*a, **k)
        _rewrite(os.path.join(folder, "part-0.parquet"), kind)
        return pins

    monkeypatch.setattr(planning, "read_pins", read_then_rewrite)
    with pytest.raises(ShardChangedError, match="part-0.parquet"):
        run_index(_cfg(folder, db))  # the embed pass finds part-0 is not what was planned
    monkeypatch.setattr(planning, "read_pins", real)
    run_index(_cfg(folder, db))  # the cron retry plans afresh
    run_index(_cfg(folder, db))  # and a quiet night
    assert_fresh(folder, db, tmp_path)


def test_shard_rewritten_mid_embed(ray_session, tmp_path):
    """Rewritten as soon as the first window is staged (while others are being embedded)."""
    folder, db, _ = _first_night(tmp_path)
    staging = os.path.join(db, "_gpte_staging", "docs", "runs")
    done = threading.Event()

    def watch():
        while not done.is_set():
            if os.path.isdir(staging) and any(f.endswith(".parquet") for _, _, fs in os.walk(staging) for f in fs):
                for p in ("part-0.parquet", "part-1.parquet"):
                    _rewrite(os.path.join(folder, p), "reorder")
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        _run_tolerating_refusal(_cfg(folder, db))
    finally:
        done.set()
        t.join()
    run_index(_cfg(folder, db))
    assert_fresh(folder, db, tmp_path)


@pytest.mark.parametrize("kind", ["reorder", pytest.param("edit", marks=LONG)])
def test_shard_rewritten_after_staging_before_the_commit(ray_session, tmp_path, monkeypatch, kind):
    """Rewritten once every window is staged: the run commits the snapshot it planned on (its
    rows were matched to the plan when read), the next night catches up."""
    folder, db, _ = _first_night(tmp_path)
    real = TableStore.commit

    def rewrite_then_commit(self, *a, **k):
        _rewrite(os.path.join(folder, "part-1.parquet"), kind)
        return real(self, *a, **k)

    monkeypatch.setattr(TableStore, "commit", rewrite_then_commit)
    report = run_index(_cfg(folder, db))
    assert report.committed
    monkeypatch.setattr(TableStore, "commit", real)
    run_index(_cfg(folder, db))
    assert_fresh(folder, db, tmp_path)


def test_staged_windows_of_a_rewritten_shard_are_never_resumed(ray_session, tmp_path, monkeypatch):
    """Killed before its commit, then the shard is rewritten (same rows reordered: the same plan,
    so the same run id): the rerun drops the windows read from the old bytes, keeps the others."""
    folder, db, _ = _first_night(tmp_path)
    monkeypatch.setattr(TableStore, "commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_index(_cfg(folder, db))
    monkeypatch.undo()
    staged = os.path.join(db, "_gpte_staging", "docs", "runs")
    assert os.listdir(staged), "the killed run left its staged windows"
    _rewrite(os.path.join(folder, "part-0.parquet"), "reorder")
    report = run_index(_cfg(folder, db))
    edited_in_part1 = sum(1 for i in range(120, 240) if i % 10 == 0)
    # windows mix both shards' rows: what is resumed holds part-1's documents at most (all 24
    # edited documents were staged; without the pins in the markers all 24 would be resumed)
    assert report.chunks_resumed <= edited_in_part1, report.chunks_resumed
    assert report.docs_embedded == 24
    assert_fresh(folder, db, tmp_path)


def test_skip_bad_shards_leaves_a_rewritten_shard_as_it_was(ray_session, tmp_path, monkeypatch):
    """With --skip-bad-shards the night plans again without the rewritten shard: its documents
    stay as they were (counted as a bad shard), the other shard's edits land."""
    folder, db, _ = _first_night(tmp_path)
    before = _rows(db)
    real = planning.read_pins
    calls = []

    def read_then_rewrite(*a, **k):
        pins = real(*a, **k)
        if not calls:
            _rewrite(os.path.join(folder, "part-0.parquet"), "edit")
        calls.append(1)
        return pins

    monkeypatch.setattr(planning, "read_pins", read_then_rewrite)
    report = run_index(_cfg(folder, db, **{"input.skip_bad_shards": True}))
    assert len(calls) == 2 and report.committed and report.bad_shards == 1
    assert any("changed while the run read it" in e["reason"] for e in report.quarantine_examples), \
        report.quarantine_examples
    after = _rows(db)
    part0 = {f"d{i:03d}" for i in range(120)}
    assert {k: h for k, (h, _) in after.items() if k[0] in part0} == \
        {k: h for k, (h, _) in before.items() if k[0] in part0}
    assert report.changed == sum(1 for i in range(120, 240) if i % 10 == 0)
    monkeypatch.setattr(planning, "read_pins", real)
    run_index(_cfg(folder, db))
    assert_fresh(folder, db, tmp_path)
