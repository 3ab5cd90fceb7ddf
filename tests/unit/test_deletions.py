"""The commit's deletions from doc ids in Arrow batches, found by Lance (no Ray)."""

from __future__ import annotations

import lance
import pyarrow as pa

from gpte_ray.diff import fragment_deletions, sql_list


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
