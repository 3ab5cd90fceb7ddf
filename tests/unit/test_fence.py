"""The table lock and the commit fence, without Ray: two runs never both commit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from gpte_ray.config import ConfigError, load_config
from gpte_ray.store.lock import (
    LockLostError,
    TableBusyError,
    TableLock,
    TableMovedError,
    claimed_versions,
    create_exclusive,
)
from gpte_ray.store.table import CommitPlan, TableStore


def _schema() -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("chunk", pa.int32()), ("vector", pa.list_(pa.float32(), 4))])


def _rows(ids: list[str]) -> pa.Table:
    vecs = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4 * len(ids), np.float32)), 4)
    return pa.table({"doc_id": ids, "chunk": pa.array([0] * len(ids), pa.int32()), "vector": vecs},
                    schema=_schema())


def _stage(store: TableStore, ids: list[str], overwrite: bool = False) -> list:
    return store.write_fragments(_rows(ids), _schema(), 1000, overwrite)


def _keys(store: TableStore) -> list[tuple[str, int]]:
    t = store.open().to_table(columns=["doc_id", "chunk"])
    return sorted(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))


@pytest.fixture
def store(tmp_path) -> TableStore:
    s = TableStore(str(tmp_path / "db"), "docs")
    s.commit(CommitPlan("a" * 16, None, True, fragments=_stage(s, ["x", "y"], overwrite=True)), _schema())
    return s


def test_two_runs_planned_on_one_version_commit_once(store):
    v = store.open().version
    first = CommitPlan("1" * 16, v, False, fragments=_stage(store, ["new"]))
    second = CommitPlan("2" * 16, v, False, fragments=_stage(store, ["new"]))  # the same new key
    store.commit(first, _schema())
    with pytest.raises(TableMovedError, match="changed while this run worked"):
        store.commit(second, _schema())
    assert _keys(store) == [("new", 0), ("x", 0), ("y", 0)]  # Lance did not rebase the second append
    assert claimed_versions(store.db, store.table, None)[v + 1] == "1" * 16


def test_a_retried_commit_of_the_same_run_is_a_no_op(store):
    v = store.open().version
    plan = CommitPlan("3" * 16, v, False, fragments=_stage(store, ["z"]))
    store.commit(plan, _schema())
    assert store.commit(plan, _schema()).version == v + 1
    assert _keys(store) == [("x", 0), ("y", 0), ("z", 0)]


def test_racing_commits_on_one_version_one_wins(store):
    v = store.open().version
    plans = [CommitPlan(f"{i:016x}", v, False, fragments=_stage(store, [f"k{i}"])) for i in range(4)]
    results: list = [None] * 4

    def commit(i):
        try:
            store.commit(plans[i], _schema())
            results[i] = "ok"
        except TableMovedError:
            results[i] = "refused"

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and results.count("refused") == 3
    assert store.open().version == v + 1 and len(_keys(store)) == 3


def test_a_claim_that_cannot_be_read_yet_is_not_stale(store):
    """A claim is created first and written after (locally), and an S3 read can fail: an
    unreadable claim is judged by the file's age, never taken over as if it were ancient."""
    import os

    from gpte_ray.store.lock import claim_of, claims_uri

    v = store.open().version
    claim = os.path.join(claims_uri(store.db, store.table), f"{v + 1:020d}.0.json")
    os.makedirs(os.path.dirname(claim), exist_ok=True)
    open(claim, "w").close()  # its creator is still writing it (or was killed there just now)
    plan = CommitPlan("4" * 16, v, False, fragments=_stage(store, ["w"]))
    with pytest.raises(TableMovedError, match="its claim cannot be read yet"):
        store.commit(plan, _schema())
    assert claim_of(store.db, store.table, v + 1, None) is None and store.open().version == v
    old = time.time() - 700  # left by a run that died in its commit long ago: superseded
    os.utime(claim, (old, old))
    store.commit(plan, _schema())
    assert claim_of(store.db, store.table, v + 1, None) == "4" * 16
    assert _keys(store) == [("w", 0), ("x", 0), ("y", 0)]


def test_exclusive_create_is_exclusive_under_threads(tmp_path):
    wins = []
    barrier = threading.Barrier(8)

    def go(i):
        barrier.wait()
        wins.append(create_exclusive(str(tmp_path / "claim.json"), str(i).encode(), None))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_a_paused_holder_loses_the_lease_and_cannot_commit(store):
    a = TableLock(store.db, store.table, None, lease_s=0.4, settle_s=0.01)
    a.acquire("a" * 16)
    v = store.open().version
    plan_a = CommitPlan("a" * 16, v, False, fragments=_stage(store, ["from-a"]))
    a._stop.set()  # A "pauses": no heartbeat
    a._thread.join()
    time.sleep(0.6)
    b = TableLock(store.db, store.table, None, lease_s=0.4, settle_s=0.01)
    b.acquire("b" * 16)  # takes over the stale lease
    a._stop.clear()
    a._thread = threading.Thread(target=a._beat, daemon=True)
    a._thread.start()  # A wakes: its heartbeat must notice, not overwrite B's lease
    time.sleep(0.3)
    assert b._read()["token"] == b.token
    with pytest.raises(LockLostError, match=r"lost its lock to run b{16}"):
        store.commit(plan_a, _schema(), a)
    assert ("from-a", 0) not in _keys(store)
    store.commit(CommitPlan("b" * 16, v, False, fragments=_stage(store, ["from-b"])), _schema(), b)
    assert ("from-b", 0) in _keys(store)
    a.release()  # must not delete B's lease
    assert b._read()["token"] == b.token
    b.release()


def test_a_holder_is_judged_by_its_own_lease(store):
    """A holder on another machine beats every quarter of its own lease: a run configured with
    a shorter lease must not take over a holder that is merely between two beats."""
    import json
    import os

    a = TableLock(store.db, store.table, None, lease_s=0.5, settle_s=0.01)
    os.makedirs(os.path.dirname(a.path), exist_ok=True)
    with open(a.path, "w") as f:
        json.dump({"token": "t" * 32, "run_id": "h" * 16, "host": "another-machine", "pid": 1,
                   "heartbeat": time.time() - 2, "lease_s": 60}, f)
    with pytest.raises(TableBusyError, match="being written by run h{16}"):
        a.acquire()


def test_refused_run_is_told_the_real_run_id(store):
    a = TableLock(store.db, store.table, None, settle_s=0.01)
    a.acquire()
    a.relabel("c" * 16)
    with pytest.raises(Exception, match=f"run {'c' * 16}"):
        TableLock(store.db, store.table, None, settle_s=0.01).acquire()
    a.release()


def test_the_cluster_starts_inside_the_lease_settle_wait(store):
    """`meanwhile` (the cluster start) runs after the lease is written and before it is read
    back: a run that failed to start its cluster leaves no lease; one whose lease was taken
    meanwhile is refused."""
    import os

    a = TableLock(store.db, store.table, None, settle_s=0.2)
    seen = []
    t = time.monotonic()
    a.acquire("a" * 16, meanwhile=lambda: seen.append(a._read()["token"]))
    assert seen == [a.token] and time.monotonic() - t >= 0.2  # the settle wait is kept
    a.release()

    def no_cluster():
        raise ConnectionError("no Ray cluster at ray://nowhere:10001")

    with pytest.raises(ConnectionError):
        TableLock(store.db, store.table, None, settle_s=0.01).acquire("b" * 16, meanwhile=no_cluster)
    assert not os.path.exists(a.path)  # its lease went with it: the next run is not refused

    c = TableLock(store.db, store.table, None, settle_s=0.01)
    d = TableLock(store.db, store.table, None, settle_s=0.01)
    with pytest.raises(TableBusyError, match="at the same moment"):
        c.acquire("c" * 16, meanwhile=lambda: d._write())  # d's lease lands over c's meanwhile
    assert d._read()["token"] == d.token  # c's refusal leaves d's lease alone


def test_commits_survive_compaction_and_index_remaps(store):
    """The run record lives outside Lance's history: compaction with a remapped index
    (whose transaction pylance cannot read back) never blocks the next commit."""
    plans = []
    for night in range(6):
        ds = store.open()
        if night == 1:
            ds.create_scalar_index("doc_id", "BTREE")
        plans.append(CommitPlan(f"{night:016x}", ds.version, False, fragments=_stage(store, [f"n{night}"])))
        store.commit(plans[-1], _schema())
        ds = store.open()
        if night % 2:
            ds.optimize.compact_files(target_rows_per_fragment=1000, materialize_deletions_threshold=0.1)
            ds.optimize.optimize_indices()
    assert len(_keys(store)) == 8
    ds = store.open()
    assert all(store.committed_run(ds, p) for p in plans)
    assert not store.committed_run(ds, CommitPlan("e" * 16, plans[-1].read_version, False))
    claims = claimed_versions(store.db, store.table, None)
    assert sorted(claims.values()) == sorted(["a" * 16] + [f"{n:016x}" for n in range(6)])


@pytest.mark.parametrize("name", ["..", ".", "a/b", ".hidden", "a\\b", "", "x" * 129])
def test_table_names_that_could_escape_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="output.table"):
        load_config(None, {"output.table": name})
    with pytest.raises(ConfigError, match="output.table"):
        TableStore(str(tmp_path), name)


def test_a_db_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "mk.py").write_text("")
    with pytest.raises(ConfigError, match=r"^config error: output.db \(--db\): .*mk.py is a file"):
        TableStore(str(tmp_path / "mk.py"), "docs")
    TableStore(str(tmp_path / "new-folder"), "docs")  # a folder yet to be made is fine


def test_staging_deletes_only_run_folders(store):
    with pytest.raises(ValueError):
        store.drop_staging("..")
    with pytest.raises(ValueError):
        store.drop_staging("../other")


def test_staged_fragments_whose_files_vanished_are_not_committed(tmp_path):
    s = TableStore(str(tmp_path / "db"), "docs")
    frags = _stage(s, ["x"], overwrite=True)
    import shutil

    shutil.rmtree(s.uri)  # the half-written table folder deleted by hand
    with pytest.raises(Exception, match="staged data of run"):
        s.commit(CommitPlan("d" * 16, None, True, fragments=frags), _schema())
    assert s.open() is None


def test_the_fence_refuses_what_the_pre_check_cannot_see(store):
    """Two runs pass the version check at the same moment; inside Lance's commit only the
    first claim on the version wins, and a version other than planned is always refused."""
    from gpte_ray.store.lock import Fence

    v = store.open().version
    first = Fence(store.db, store.table, None, None, v, "f" * 16)
    second = Fence(store.db, store.table, None, None, v, "e" * 16)
    with first(v + 1):  # inside the first's commit, the second is refused
        with pytest.raises(TableMovedError, match="is committing version"), second(v + 1):
            pass
    with pytest.raises(TableMovedError, match="changed while this run worked"), second(v + 2):
        pass
    with first(v + 1):  # the same run again (a retried commit) keeps its own claim
        pass


def test_a_lease_released_by_the_run_that_took_it_over_is_not_taken_back(store):
    a = TableLock(store.db, store.table, None, lease_s=0.4, settle_s=0.01)
    a.acquire("a" * 16)
    a._stop.set()
    a._thread.join()
    time.sleep(0.6)
    b = TableLock(store.db, store.table, None, lease_s=0.4, settle_s=0.01)
    b.acquire("b" * 16)
    b.release()  # B finished its night while A slept
    a._stop.clear()
    a._thread = threading.Thread(target=a._beat, daemon=True)
    a._thread.start()
    time.sleep(0.3)
    assert a._read() is None  # A's heartbeat did not write its lease again
    with pytest.raises(LockLostError, match="released the table since"):
        a.check()
    a.release()


def test_a_claim_for_a_version_whose_table_was_deleted_does_not_block(store):
    """The fixture's run claimed version 1 and committed; then the table folder was deleted (an
    operator, a lifecycle rule). The rerun plans on no table and needs version 1 again: the old
    claim's commit has ended, and its version is gone, so it never blocks."""
    import shutil

    from gpte_ray.store.lock import claim_of

    shutil.rmtree(store.uri)
    assert store.open() is None
    store.commit(CommitPlan("b" * 16, None, True, fragments=_stage(store, ["x"], overwrite=True)), _schema())
    assert _keys(store) == [("x", 0)] and claim_of(store.db, store.table, 1, None) == "b" * 16


def _foreign_claim(store: TableStore, version: int, pid: int) -> None:
    """A claim made by another process on this host that never finished its commit."""
    import json
    import os
    import socket

    from gpte_ray.store.lock import claims_uri

    body = {"run_id": "c" * 16, "run": "their-run", "token": "t", "time": time.time(),
            "host": socket.gethostname(), "pid": pid}
    path = os.path.join(claims_uri(store.db, store.table), f"{version:020d}.0.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(body, f)


def test_a_claim_whose_maker_may_still_commit_blocks(tmp_path):
    """A live process's claim (paused inside its commit?) blocks its version even when the
    table folder is gone; once that process is dead, the claim no longer blocks."""
    import os
    import subprocess
    import sys

    store = TableStore(str(tmp_path / "db"), "docs")
    _foreign_claim(store, 1, os.getppid())  # alive
    plan = CommitPlan("d" * 16, None, True, fragments=_stage(store, ["x"], overwrite=True))
    with pytest.raises(TableMovedError, match=r"another run \(their-run\) is committing version 1"):
        store.commit(plan, _schema())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _foreign_claim(store, 1, int(gone.stdout))  # its process has exited
    store.commit(plan, _schema())
    assert _keys(store) == [("x", 0)]


def test_a_lost_lease_keeps_the_error_it_caused_and_the_plan_folder_goes(store, monkeypatch):
    """A run paused past its lease wakes and fails on a file the new holder cleaned up: the
    lost lease is the news, the error stays beside it, and its own plan folder is dropped."""
    import os
    import types

    from gpte_ray.run import pipeline

    lock = TableLock(store.db, store.table, None, settle_s=0.01)
    lock.acquire("our-run")
    ctx = types.SimpleNamespace(store=store, lock=lock, run_id="our-run", plan_dir="")

    def lost_then_failed(c):
        os.makedirs(c.plan_dir)  # what planning wrote
        open(os.path.join(c.plan_dir, "part-0.parquet"), "w").close()
        b = TableLock(store.db, store.table, None, settle_s=0.01)
        b._write()  # another run took the lease
        raise FileNotFoundError("plans/part-0.parquet")

    monkeypatch.setattr(pipeline, "plan_and_stage", lost_then_failed)
    with pytest.raises(LockLostError) as e:
        pipeline.locked(ctx)
    lock.release()
    assert str(e.value).endswith("nothing was committed (the error it caused: FileNotFoundError: plans/part-0.parquet)")
    assert ctx.plan_dir and os.listdir(store.staging.plans) == []
