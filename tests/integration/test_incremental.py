"""Nightly reindexing: diff by doc_id and content hash, one commit, resume after a crash."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import lance
import numpy as np
import pytest

from gpte_ray.config import load_config
from gpte_ray.plan.diff import MassDeleteError
from gpte_ray.run.pipeline import run_index
from tests.support.files import write_parquet
from tests.support.procs import kill_session

pytestmark = pytest.mark.ray


def _cfg(inputs, db, **over):
    base = {"input.paths": inputs, "output.db": db, "output.table": "docs", "batch.window_rows": 64}
    return load_config(None, {**base, **over})


def _table(db):
    t = lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id", "chunk", "vector", "content_hash"])
    rows = {(d, c): (v, h) for d, c, v, h in zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist(),
                                               t["vector"].to_pylist(), t["content_hash"].to_pylist())}
    assert len(rows) == t.num_rows, "duplicate (doc_id, chunk)"
    return rows


def _same_tables(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][1] == b[k][1]
        assert np.abs(np.array(a[k][0]) - np.array(b[k][0])).max() <= 1e-5


@pytest.fixture
def days(tmp_path, varied_docs):
    docs = [dict(d) for d in varied_docs[:90]]
    day1 = [write_parquet(tmp_path / "day1" / f"part-{i}.parquet", docs[i * 30:(i + 1) * 30]) for i in range(3)]
    day2_docs = [dict(d) for d in docs[5:]]  # 5 deleted
    for d in day2_docs[:5]:
        d["text"] = d["text"] + " (edited)"  # 5 edited
    day2_docs += [{"id": f"new-{i}", "title": "t", "module": "m", "text": f"brand new document number {i}"}
                  for i in range(4)]  # 4 added
    day2 = [write_parquet(tmp_path / "day2" / f"part-{i}.parquet", day2_docs[i * 30:(i + 1) * 30])
            for i in range(3)]
    return day1, day2, docs, day2_docs


def test_day2_embeds_only_changes_and_equals_fresh_index(ray_session, tmp_path, days):
    day1, day2, docs, day2_docs = days
    db = str(tmp_path / "db")
    first = run_index(_cfg(day1, db))
    assert first.new == 90 and first.counts_add_up

    second = run_index(_cfg(day2, db))
    assert (second.new, second.changed, second.unchanged, second.deleted) == (4, 5, 80, 5)
    assert second.rows_read == 89 and second.counts_add_up and second.committed
    # only the 9 new or edited documents reached the model (short docs: one chunk each)
    edited_or_new = {d["id"] for d in day2_docs[:5]} | {f"new-{i}" for i in range(4)}
    table = _table(db)
    assert second.chunks_embedded == sum(1 for (d, _) in table if d in edited_or_new)

    fresh_db = str(tmp_path / "fresh")
    run_index(_cfg(day2, fresh_db))
    _same_tables(table, _table(fresh_db))

    third = run_index(_cfg(day2, db))
    assert not third.committed and third.chunks_embedded == 0 and third.unchanged == 89
    assert third.version == second.version


def test_mass_deletion_guard_and_model_change(ray_session, tmp_path, days):
    day1, _, _, _ = days
    db = str(tmp_path / "db")
    first = run_index(_cfg(day1, db))
    with pytest.raises(MassDeleteError, match="max_delete_fraction"):
        run_index(_cfg(day1[:1], db))  # two of three shards "vanished"
    assert lance.dataset(f"{db}/docs.lance").version == first.version

    rebuilt = run_index(_cfg(day1, db, **{"model.dim": 128, "output.rebuild": True}))
    assert rebuilt.rebuild and rebuilt.new == 90 and rebuilt.chunks_embedded >= 90
    ds = lance.dataset(f"{db}/docs.lance")
    assert ds.schema.field("vector").type.list_size == 128
    old = lance.dataset(f"{db}/docs.lance", version=first.version)
    assert old.schema.field("vector").type.list_size == 384  # the old version stays readable
    assert old.count_rows() == ds.count_rows()


def test_sigkill_mid_run_then_resume(ray_session, tmp_path, varied_docs):
    docs = varied_docs[:240]
    shards = [write_parquet(tmp_path / "c" / f"part-{i}.parquet", docs[i * 60:(i + 1) * 60]) for i in range(4)]
    db = str(tmp_path / "db")
    flags = ["--input", *shards, "--db", db, "--table", "docs", "--window-rows", "16",
             "--num-cpus", "2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "gpte_ray.cli", "index", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    markers = []
    while time.time() < deadline and proc.poll() is None:
        markers = glob.glob(f"{db}/_gpte_staging/docs/runs/*/*.parquet")
        if len(markers) >= 7:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    kill_session(proc.pid)  # the driver and its local Ray: workers too, which go on staging otherwise
    proc.wait()
    assert not os.path.exists(f"{db}/docs.lance/_versions") or lance.dataset(f"{db}/docs.lance") is None

    resumed = run_index(load_config(None, {"input.paths": shards, "output.db": db, "output.table": "docs",
                                           "batch.window_rows": 16}))
    staged_before = resumed.chunks_resumed
    assert staged_before >= 7 * 16 - 16
    # the rerun embedded only what was not staged (the staged chunks never reached the model)
    assert resumed.chunks_embedded + staged_before == resumed.chunks_written
    table = _table(db)
    fresh = str(tmp_path / "fresh")
    run_index(load_config(None, {"input.paths": shards, "output.db": fresh, "output.table": "docs"}))
    _same_tables(table, _table(fresh))
    assert not glob.glob(f"{db}/_gpte_staging/docs/runs/*/*.parquet")
    assert json.loads(json.dumps(resumed.upkeep))["fragments"] >= 1
