"""Shards that did not change are not read (issue 23): the shard manifest, incremental diffs over
the documents that new, changed and vanished shards touch, full scans, and a manifest that can
never disagree with the table after a crash."""

from __future__ import annotations

import glob
import json
import os

import lance
import pytest

from gpte_ray.config import load_config
from gpte_ray.input.prepare import content_hash
from gpte_ray.run.pipeline import run_index
from tests.support.files import write_parquet
from tests.support.tables import killed_before_the_commit

pytestmark = pytest.mark.ray


def _cfg(root, db, **over):
    return load_config(None, {"input.paths": [str(root)], "output.db": str(db), "output.table": "docs",
                              "output.max_delete_fraction": 0.5, **over})


def _write(root, name: str, docs: dict[str, str]) -> str:
    return write_parquet(os.path.join(root, name), [{"id": k, "text": v} for k, v in docs.items()])


def _table(db) -> dict[str, str]:
    """doc_id -> content_hash of chunk 0; each (doc_id, chunk) once."""
    t = lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id", "chunk", "content_hash"])
    keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)), "a (doc_id, chunk) is stored twice"
    return {d: h for d, c, h in zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist(), t["content_hash"].to_pylist())
            if c == 0}


def _expected(shards: dict[str, dict[str, str]]) -> dict[str, str]:
    """What a fresh index holds: the first occurrence of each id, in shard path order."""
    out: dict[str, str] = {}
    for name in sorted(shards):
        for doc_id, text in shards[name].items():
            out.setdefault(doc_id, content_hash(text))
    return out


def _docs(prefix: str, n: int = 4) -> dict[str, str]:
    return {f"{prefix}{i}": f"document {prefix}{i} about shard {prefix}" for i in range(n)}


def test_unchanged_shards_are_not_read_and_the_table_stays_exact(ray_session, tmp_path):
    root, db = tmp_path / "in", tmp_path / "db"
    shards = {f"part-{p}.parquet": _docs(p) for p in "abcd"}
    for name, docs in shards.items():
        _write(root, name, docs)
    first = run_index(_cfg(root, db))
    assert (first.shards_total, first.shards_read, first.shards_skipped) == (4, 4, 0) and first.full_scan

    quiet = run_index(_cfg(root, db))
    assert (quiet.shards_read, quiet.shards_skipped, quiet.rows_read, quiet.rows_skipped) == (0, 4, 0, 16)
    assert quiet.unchanged == 16 and quiet.counts_add_up and not quiet.committed and not quiet.full_scan

    shards["part-a.parquet"]["a1"] = "document a1, edited"  # rewritten
    del shards["part-b.parquet"]  # deleted: its documents go, through the mass-delete guard
    os.remove(root / "part-b.parquet")
    os.utime(root / "part-c.parquet", ns=(1, 10**18))  # touched: read, nothing changed
    shards["part-e.parquet"] = _docs("e", 2)  # appended
    _write(root, "part-a.parquet", shards["part-a.parquet"])
    _write(root, "part-e.parquet", shards["part-e.parquet"])
    night = run_index(_cfg(root, db))
    assert (night.shards_total, night.shards_read, night.shards_skipped) == (4, 3, 1)
    assert night.rows_read == 4 + 4 + 2 and night.rows_skipped == 4
    assert (night.new, night.changed, night.unchanged, night.deleted) == (2, 1, 11, 4)
    assert night.counts_add_up and night.committed
    assert _table(db) == _expected(shards)

    with pytest.raises(Exception, match="max_delete_fraction"):  # a half-listed input is still refused
        for name in ("part-a.parquet", "part-c.parquet"):
            os.remove(root / name)
        run_index(_cfg(root, db))
    after = run_index(_cfg(root, db, **{"output.allow_mass_delete": True}))
    assert after.deleted == 8 and after.rows_read == 0 and after.shards_skipped == 2
    del shards["part-a.parquet"], shards["part-c.parquet"]
    assert _table(db) == _expected(shards)


def test_documents_moving_between_shards_and_duplicates_in_skipped_shards(ray_session, tmp_path):
    root, db = tmp_path / "in", tmp_path / "db"
    shards = {f"part-{p}.parquet": _docs(p) for p in "abc"}
    for name, docs in shards.items():
        _write(root, name, docs)
    run_index(_cfg(root, db))

    # a0 moves from a to c; b1 appears (other text) in a, which sorts before b: a's copy wins,
    # while b, not read tonight, still holds it
    shards["part-c.parquet"]["a0"] = shards["part-a.parquet"].pop("a0")
    shards["part-a.parquet"]["b1"] = "b1 as shard a has it"
    for name in ("part-a.parquet", "part-c.parquet"):
        _write(root, name, shards[name])
    moved = run_index(_cfg(root, db))
    assert (moved.shards_read, moved.shards_skipped, moved.rows_read) == (2, 1, 9)
    assert (moved.new, moved.changed, moved.deleted, moved.quarantined) == (0, 1, 0, 1)  # b's b1: a duplicate
    assert moved.counts_add_up and _table(db) == _expected(shards)

    # b1 leaves a: b's copy (in a shard not read tonight) is the document again, read through its pin
    del shards["part-a.parquet"]["b1"]
    _write(root, "part-a.parquet", shards["part-a.parquet"])
    back = run_index(_cfg(root, db))
    assert (back.shards_read, back.rows_read, back.changed, back.quarantined, back.docs_embedded) == (1, 3, 1, 0, 1)
    assert back.counts_add_up and _table(db) == _expected(shards)
    assert run_index(_cfg(root, db)).rows_read == 0


@pytest.mark.long
def test_full_scan_finds_an_edit_that_kept_size_and_mtime(ray_session, tmp_path):
    root, db = tmp_path / "in", tmp_path / "db"
    os.makedirs(root)
    lines = {p: [{"id": f"{p}{i}", "text": f"text number {i} of {p}"} for i in range(3)] for p in "xy"}
    for p, docs in lines.items():
        (root / f"{p}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    over = {"input.full_scan_every": 3}
    run_index(_cfg(root, db, **over))
    path = root / "x.jsonl"
    st = os.stat(path)
    path.write_text(path.read_text().replace("text number 1", "TEXT NUMBER 1"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size

    missed = run_index(_cfg(root, db, **over))  # the fingerprint did not move: not read
    assert missed.shards_read == 0 and missed.unchanged == 6 and not missed.committed
    found = run_index(_cfg(root, db, **{**over, "input.full_scan": True}))
    assert found.full_scan == "--full-scan" and found.shards_read == 2 and found.changed == 1
    assert found.shards_changed_in_place == [str(path)] and found.counts_add_up
    assert _table(db)["x1"] == content_hash("TEXT NUMBER 1 of x")

    # input.full_scan_every: 3 -> two runs read only what changed, the third reads everything
    nights = [run_index(_cfg(root, db, **over)) for _ in range(3)]
    assert [n.shards_read for n in nights] == [0, 0, 2] and nights[2].full_scan.startswith("every 3 runs")


@pytest.mark.long
def test_a_crash_around_the_commit_never_leaves_a_manifest_that_disagrees(ray_session, tmp_path, monkeypatch):
    root, db = tmp_path / "in", tmp_path / "db"
    shards = {f"part-{p}.parquet": _docs(p) for p in "ab"}
    for name, docs in shards.items():
        _write(root, name, docs)
    run_index(_cfg(root, db))

    # killed after its manifest was written, before its commit: that manifest is never believed
    shards["part-a.parquet"]["a2"] = "a2, edited before a crash"
    _write(root, "part-a.parquet", shards["part-a.parquet"])

    killed_before_the_commit(monkeypatch, _cfg(root, db))
    assert len(glob.glob(f"{db}/_gpte_staging/docs/manifests/*-c-*.parquet")) == 2  # the pending one too
    _write(root, "part-b.parquet", {**shards["part-b.parquet"], "b9": "b9, added after the crash"})
    shards["part-b.parquet"]["b9"] = "b9, added after the crash"
    night = run_index(_cfg(root, db))
    assert night.shards_read == 2 and night.changed == 1 and night.new == 1 and night.committed
    assert _table(db) == _expected(shards)

    # killed after the commit (in upkeep): its manifest is the table's, the next run reads nothing
    shards["part-b.parquet"]["b0"] = "b0, edited before a crash after the commit"
    _write(root, "part-b.parquet", shards["part-b.parquet"])

    def dies(*args, **kwargs):
        raise RuntimeError("killed after the commit")

    with monkeypatch.context() as m:
        m.setattr("gpte_ray.run.pipeline.finish", dies)
        with pytest.raises(RuntimeError, match="killed after the commit"):
            run_index(_cfg(root, db))
    assert _table(db) == _expected(shards)
    after = run_index(_cfg(root, db))
    assert after.shards_read == 0 and after.unchanged == 9 and not after.committed
