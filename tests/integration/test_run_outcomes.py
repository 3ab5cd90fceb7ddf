"""What a run reports when something happens to it after it planned (issue 26, points 6, 8, 9):
a committed run whose upkeep fails stays committed; a lost lease stops the embed pass at the next
window; a resumed run says so (a lost lease keeping its error: tests/unit/test_fence.py)."""

from __future__ import annotations

import json
import os
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.config import load_config
from gpte_ray.run import finish, pipeline
from gpte_ray.run.pipeline import run_index
from gpte_ray.store.lock import LockLostError
from tests.support.tables import killed_before_the_commit

pytestmark = pytest.mark.ray


def _corpus(folder, n: int, shards: int = 1) -> str:
    os.makedirs(folder, exist_ok=True)
    ids = [f"d{i}" for i in range(n)]
    for s in range(shards):
        part = ids[s::shards]
        pq.write_table(pa.table({"id": part, "text": [f"document number {i[1:]}" for i in part]}),
                       os.path.join(folder, f"part-{s}.parquet"))
    return folder


def _cfg(src: str, db: str, **over):
    return load_config(None, {"input.paths": [src], "output.db": db, "output.table": "docs", **over})


def _steal_lease(db: str) -> None:
    """Another run takes the table's lease (as after this one was paused past it)."""
    lease = os.path.join(db, "_gpte_staging", "docs", "lease.json")
    with open(lease, "w") as f:
        json.dump({"token": "other", "run_id": "the-other-run", "host": socket.gethostname(), "pid": os.getpid(),
                   "heartbeat": time.time(), "lease_s": 120}, f)


def test_a_committed_run_stays_committed_when_its_upkeep_fails(ray_session, tmp_path, monkeypatch, capsys):
    db = str(tmp_path / "db")
    src = _corpus(str(tmp_path / "in"), 12)

    def refused(*args, **kwargs):
        raise RuntimeError("Retryable commit conflict for version 3")

    with monkeypatch.context() as m:
        m.setattr(finish, "run_upkeep", refused)
        report = run_index(_cfg(src, db))
    assert report.committed and report.version == 1 and report.upkeep == {
        "error": "RuntimeError: Retryable commit conflict for version 3"}
    assert f"run {report.run_id} committed version 1, but its upkeep did not finish" in capsys.readouterr().err
    assert os.path.exists(os.path.join(db, "docs.reports", f"{report.run_id}.json"))
    again = run_index(_cfg(src, db))  # nothing changed: the next run does the upkeep
    assert not again.committed and "error" not in again.upkeep and again.run_id != report.run_id
    trend = json.load(open(os.path.join(db, "docs.reports", f"{again.run_id}.json")))["trend"]
    assert [t["run_id"] for t in trend] == [report.run_id, again.run_id]  # every run kept


def test_a_run_that_lost_its_lease_stops_embedding_at_the_next_window(ray_session, tmp_path, monkeypatch):
    db = str(tmp_path / "db")
    src = _corpus(str(tmp_path / "in"), 40, shards=10)  # a read task, and an output block, per shard
    windows = []
    add_window = pipeline.RunReport.add_window

    def add_and_lose(self, row, edges):
        add_window(self, row, edges)
        windows.append(row["rows"])
        if len(windows) == 1:
            _steal_lease(db)
            time.sleep(1.0)  # the heartbeat (every lease_seconds / 4) sees it

    monkeypatch.setattr(pipeline.RunReport, "add_window", add_and_lose)
    with pytest.raises(LockLostError, match="lost its lock to run the-other-run"):
        run_index(_cfg(src, db, **{"batch.window_rows": 2, "output.lease_seconds": 2.0}))
    assert sum(windows) < 40  # stopped before embedding the whole plan


def test_a_resumed_run_says_so_and_counts_what_was_staged(ray_session, tmp_path, monkeypatch, capsys):
    db = str(tmp_path / "db")
    cfg = _cfg(_corpus(str(tmp_path / "in"), 20), db, **{"batch.window_rows": 4})

    killed_before_the_commit(monkeypatch, cfg, KeyboardInterrupt)
    capsys.readouterr()
    report = run_index(cfg)
    err = capsys.readouterr().err
    assert report.committed and report.chunks_resumed == 20 and report.docs_embedded == 20
    assert "gpte-ray: resuming 20 staged chunks (20 documents) of an earlier run of this plan; " \
           "0 documents left to embed" in err
