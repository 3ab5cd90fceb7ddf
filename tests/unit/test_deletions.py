"""The commit's deletions from doc ids in Arrow batches, found by Lance (no Ray)."""

from __future__ import annotations

import lance
import pyarrow as pa

from gpte_ray.store.deletions import fragment_deletions, sql_list


def test_sql_list_quotes():
    assert sql_list(pa.array(["a", "x'y", "ü"])) == "'a', 'x''y', 'ü'"


def test_fragment_deletions_drop_and_trim(tmp_path):
    uri = str(tmp_path / "t.lance")
    ids = [f"d{i}" for i in range(100)] + ["o'k"]
    # chunks of one document may sit in different fragments
    table = pa.table({"doc_id": ids + ["d5", "d5"], "chunk": pa.array([0] * 101 + [1, 2], pa.int32())})
    ds = lance.write_dataset(table, uri, max_rows_per_file=20)
    ds.create_scalar_index("doc_id", "BTREE")
    gone = [f"d{i}" for i in range(20)] + ["d5", "d45", "o'k", "not-there"]
    removed, updated = fragment_deletions(ds, [pa.array(gone[:7]), pa.array(gone[7:])], lookup_rows=3)
    assert removed == [0, 5]  # d0..d19 filled the first fragment; o'k, d5, d5 the last
    op = lance.LanceOperation.Delete(updated_fragments=updated, deleted_fragment_ids=removed, predicate="x")
    after = lance.LanceDataset.commit(uri, op, read_version=ds.version)
    left = after.to_table(columns=["doc_id"])["doc_id"].to_pylist()
    assert sorted(left) == sorted(set(ids) - set(gone))
    assert fragment_deletions(after, [pa.array(["nothing"])]) == ([], [])
    assert fragment_deletions(after, []) == ([], [])


def test_delete_ids_must_be_all_the_diff_counted(tmp_path):
    """A plan folder deleted under its run (by a run that took the table over) must not read
    as 'nothing to delete': the commit would keep the old rows beside the new ones."""
    import pytest

    from gpte_ray.plan.diff import DeleteIds, Diff, PlanLostError
    from gpte_ray.plan.files import drop_plan, new_plan_dir, write_file

    plan_dir = new_plan_dir(str(tmp_path / "plans"))
    write_file(pa.table({"doc_id": ["a", "b"]}), f"{plan_dir}/changed", "p", None)
    write_file(pa.table({"doc_id": ["c"]}), f"{plan_dir}/vanished", "p", None)
    diff = Diff(plan_dir=plan_dir, changed=2, deleted=1)
    assert sorted(i for b in DeleteIds(diff) for i in b.to_pylist()) == ["a", "b", "c"]
    drop_plan(plan_dir, None)
    with pytest.raises(PlanLostError, match="lists 0 documents to delete where this run's diff counted 3"):
        list(DeleteIds(diff))


def test_only_old_plans_are_dropped_and_only_plan_folders(tmp_path):
    import os
    import time

    import pytest

    from gpte_ray.plan.files import PLAN_TTL_S, drop_old_plans, drop_plan, new_plan_dir

    root = tmp_path / "plans"
    fresh = new_plan_dir(str(root))
    old = str(root / f"plan-{int(time.time() - PLAN_TTL_S - 60):010d}-{'a' * 32}")
    legacy = str(root / f"plan-{'b' * 32}")  # named by an earlier version: no time in it
    other = str(root / "notes")
    for d in (fresh, old, legacy, other):
        os.makedirs(d)
    drop_old_plans(str(root), None)
    assert sorted(os.listdir(root)) == sorted([os.path.basename(fresh), "notes"])
    with pytest.raises(ValueError, match="not a plan folder"):
        drop_plan(other, None)
    drop_plan(fresh, None)
    assert os.listdir(root) == ["notes"]
