"""Night after night on one table: compaction and index remaps, guards on every path, bad ids.

One regression test per finding of issue 12 that shows at this tier (the races with paused
and killed drivers are in tests/slow/test_races.py, the months-long soak in benchmarks/soak.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.config import ConfigError, load_config
from gpte_ray.input.prepare import content_hash
from gpte_ray.plan.diff import MassDeleteError
from gpte_ray.run.pipeline import run_index
from tests.support.tables import killed_before_the_commit

pytestmark = pytest.mark.ray


def _write(folder, docs: list[dict], per_shard: int = 40) -> list[str]:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    paths = []
    for i in range(0, max(len(docs), 1), per_shard):
        p = os.path.join(folder, f"part-{i // per_shard:04d}.parquet")
        pq.write_table(pa.Table.from_pylist(docs[i : i + per_shard], schema=pa.schema([("id", pa.string()),
                                                                                       ("text", pa.string())])), p)
        paths.append(p)
    return paths


def _docs_in_table(db: str, table: str = "docs") -> dict[str, str]:
    t = lance.dataset(f"{db}/{table}.lance").to_table(columns=["doc_id", "chunk", "content_hash"])
    keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (doc_id, chunk) keys"
    return dict(zip(t["doc_id"].to_pylist(), t["content_hash"].to_pylist()))


def _cfg(paths, db, **over):
    return load_config(None, {"input.paths": paths, "output.db": db, "output.table": "docs", **over})


def test_compaction_and_index_remaps_never_block_the_next_night(ray_session, tmp_path):
    """The four-run reproduction (window of 2 rows, compaction past 16 fragments) and more
    nights, with a vector index small enough to be built and remapped by compaction."""
    rng = random.Random(12)
    docs = {f"d{i}": f"document {i} about topic {i % 7}" for i in range(48)}
    db = str(tmp_path / "db")
    over = {"batch.window_rows": 4, "output.max_fragments": 6, "output.index_min_rows": 40,
            "output.index_type": "IVF_PQ"}
    compactions = 0
    for night in range(4):
        if night:
            for i in range(12):  # +12 new documents
                docs[f"n{night}-{i}"] = f"night {night} added document {i}"
            for d in rng.sample(sorted(docs), 3):
                docs[d] += " (edited)"
            for d in rng.sample(sorted(docs), 2):
                del docs[d]
        paths = _write(str(tmp_path / f"night{night}"), [{"id": k, "text": v} for k, v in docs.items()])
        report = run_index(_cfg(paths, db, **over))
        assert report.counts_add_up and report.committed
        # the report beside the table shows every night so far, this one last
        assert [t["run_id"] for t in report.trend][-1] == report.run_id and len(report.trend) == night + 1
        assert report.trend[-1]["docs_embedded"] == report.docs_embedded
        compactions += "compacted_fragments" in report.upkeep
        assert _docs_in_table(db) == {k: content_hash(v) for k, v in docs.items()}
        assert not os.listdir(f"{db}/_gpte_staging/docs/runs")  # staging empty
        assert not os.path.exists(f"{db}/_gpte_staging/docs/lease.json")  # lock free
    assert compactions >= 2
    assert lance.dataset(f"{db}/docs.lance").describe_indices()


def test_a_model_change_does_not_skip_the_mass_delete_guard(ray_session, tmp_path):
    db = str(tmp_path / "db")
    docs = [{"id": f"d{i}", "text": f"text of document {i}"} for i in range(40)]
    run_index(_cfg(_write(str(tmp_path / "a"), docs), db))
    cut = _write(str(tmp_path / "b"), docs[:10])
    with pytest.raises(MassDeleteError, match="refusing to delete 30 of 40"):
        run_index(_cfg(cut, db, **{"model.dim": 128, "output.rebuild": True}))
    assert len(_docs_in_table(db)) == 40
    report = run_index(_cfg(cut, db, **{"model.dim": 128, "output.allow_mass_delete": True, "output.rebuild": True}))
    assert report.rebuild and report.deleted == 30 and len(_docs_in_table(db)) == 10


def test_bad_ids_are_quarantined_with_file_and_row(ray_session, tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    lines = [
        json.dumps({"id": "good-1", "text": "a fine document"}).encode(),
        b'{"id": "\\ud800", "text": "lone surrogate id"}',
        b'{"id": "raw-\xff-byte", "text": "invalid byte inside the id"}',
        json.dumps({"id": "good-2", "text": "another fine document"}).encode(),
    ]
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    db = str(tmp_path / "db")
    report = run_index(_cfg([str(src)], db))
    assert (report.new, report.quarantined) == (2, 2) and report.counts_add_up
    q = pq.read_table(report.quarantine_file).to_pylist()
    assert {(os.path.basename(r["source"]), r["row"]) for r in q} == {("a.jsonl", 1), ("a.jsonl", 2)}
    assert all("id is not valid UTF-8" in r["reason"] for r in q)


def test_a_jsonl_object_without_text_is_quarantined_wherever_it_is(ray_session, tmp_path):
    """The same bad object first in one shard and third in another: the same outcome."""
    src = tmp_path / "c"
    src.mkdir()
    for name, position in (("a", 0), ("b", 2)):
        objs = [{"id": f"{name}{i}", "text": f"document {name} {i}"} for i in range(4)]
        objs[position] = {"id": f"no-text-{name}", "title": "has no text field"}
        (src / f"{name}.jsonl").write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    report = run_index(_cfg([str(src)], str(tmp_path / "db")))
    assert (report.new, report.quarantined) == (6, 2)
    q = pq.read_table(report.quarantine_file).to_pylist()
    assert sorted((os.path.basename(r["source"]), r["row"], r["reason"]) for r in q) == [
        ("a.jsonl", 0, "missing field 'text'"), ("b.jsonl", 2, "missing field 'text'")]


def test_staged_work_of_a_deleted_table_is_embedded_again(ray_session, tmp_path, monkeypatch):
    """A first run staged every window and died before committing; then its half-written
    table folder was deleted by hand. The rerun (same work, same run id) must not commit
    fragments whose files are gone."""
    docs = [{"id": f"d{i}", "text": f"text of document {i}"} for i in range(30)]
    db = str(tmp_path / "db")
    cfg = _cfg(_write(str(tmp_path / "a"), docs), db, **{"batch.window_rows": 8})

    killed_before_the_commit(monkeypatch, cfg, KeyboardInterrupt)
    assert os.listdir(f"{db}/_gpte_staging/docs/plans") == []  # Ctrl-C drops its plan, keeps its staging
    runs = os.listdir(f"{db}/_gpte_staging/docs/runs")
    assert len(runs) == 1 and os.listdir(f"{db}/_gpte_staging/docs/runs/{runs[0]}")
    shutil.rmtree(f"{db}/docs.lance")
    report = run_index(cfg)
    assert report.plan_id == runs[0] and report.committed and report.chunks_resumed == 0
    assert _docs_in_table(db) == {d["id"]: content_hash(d["text"]) for d in docs}
    assert run_index(cfg).committed is False  # and the next night is a no-op


def test_a_plan_deleted_under_the_run_fails_its_commit(ray_session, tmp_path, monkeypatch):
    """A run paused past its lease finds its plan folder deleted by the run that took the table
    over. Read as 'nothing to delete', its commit would add the new chunks of changed documents
    beside the old ones; it must refuse instead, and the rerun must commit the night exactly."""
    from gpte_ray.plan.diff import PlanLostError
    from gpte_ray.store.table import TableStore

    docs = [{"id": f"d{i}", "text": f"text of document {i}"} for i in range(30)]
    db = str(tmp_path / "db")
    run_index(_cfg(_write(str(tmp_path / "a"), docs), db))
    night1 = _docs_in_table(db)
    night2 = [dict(d, text=d["text"] + " edited") if d["id"] in ("d0", "d1") else d for d in docs if d["id"] != "d2"]
    cfg = _cfg(_write(str(tmp_path / "a"), night2), db)
    real = TableStore.commit

    def plan_lost(self, plan, schema, lock=None):
        shutil.rmtree(f"{db}/_gpte_staging/docs/plans")
        return real(self, plan, schema, lock)

    with monkeypatch.context() as m:
        m.setattr(TableStore, "commit", plan_lost)
        with pytest.raises(PlanLostError, match="changed under the run"):
            run_index(cfg)
    assert _docs_in_table(db) == night1
    report = run_index(cfg)
    assert report.committed and (report.changed, report.deleted) == (2, 1)
    assert _docs_in_table(db) == {d["id"]: content_hash(d["text"]) for d in night2}


def test_changing_store_text_on_a_table_is_refused(ray_session, tmp_path):
    """Unchanged documents would keep (or lack) their text: the table would be a mix."""
    docs = [{"id": f"d{i}", "text": f"text of document {i}"} for i in range(6)]
    db = str(tmp_path / "db")
    paths = _write(str(tmp_path / "a"), docs)
    run_index(_cfg(paths, db, **{"output.store_text": False}))
    version = lance.dataset(f"{db}/docs.lance").version
    _write(str(tmp_path / "a"), [dict(docs[0], text="edited")] + docs[1:])
    with pytest.raises(ConfigError, match="output.store_text: true, but table 'docs' was built without the chunk "
                                          "texts; keep the table's setting, or index into a new table"):
        run_index(_cfg(paths, db))
    assert lance.dataset(f"{db}/docs.lance").version == version
    assert run_index(_cfg(paths, db, **{"output.store_text": False})).changed == 1


def test_max_length_without_room_for_text_is_refused(ray_session, tmp_path):
    paths = _write(str(tmp_path / "a"), [{"id": "d0", "text": "doc 0 and more words"}])
    with pytest.raises(ConfigError, match=r"model.max_length: 4 leaves 2 tokens for text"):
        run_index(_cfg(paths, str(tmp_path / "db"), **{"model.max_length": 4}))


def test_zero_cpus_is_refused(tmp_path):
    paths = _write(str(tmp_path / "a"), [{"id": "d0", "text": "doc"}])
    with pytest.raises(ConfigError, match="--num-cpus"):
        run_index(_cfg(paths, str(tmp_path / "db")), num_cpus=0)


def test_cuda_without_a_gpu_on_a_local_ray_fails_fast(ray_session, tmp_path):
    """(It used to wait forever for an embed actor Ray could never place.)"""
    paths = _write(str(tmp_path / "a"), [{"id": "d0", "text": "doc"}])
    with pytest.raises(ConfigError, match="resources.device: cuda, but this machine has no GPU that Ray can see"):
        run_index(_cfg(paths, str(tmp_path / "db"), **{"resources.device": "cuda"}))
    assert not os.path.exists(tmp_path / "db" / "docs.lance")


@pytest.mark.parametrize("name", ["..", ".", "a/b"])
def test_cli_refuses_escaping_table_names_and_touches_nothing(tmp_path, name):
    db = tmp_path / "db"
    (db / "docs.lance").mkdir(parents=True)
    (db / "docs.lance" / "keep").write_text("x")
    (db / "_gpte_staging" / "docs" / "runs" / "0123456789abcdef").mkdir(parents=True)
    paths = _write(str(tmp_path / "a"), [{"id": "d0", "text": "doc"}])
    before = sorted(str(p) for p in db.rglob("*"))
    out = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "index", "--input", *paths, "--db", str(db),
                          "--table", name], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "output.table" in out.stderr
    assert sorted(str(p) for p in db.rglob("*")) == before
