"""Resume state from Parquet markers, computed on the cluster: retried windows, split documents."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from gpte_ray.plan.files import EMBED_SCHEMA, write_file
from gpte_ray.plan.grouping import SMALL_ROWS
from gpte_ray.run.resume import read_skip, staged_state
from gpte_ray.store.staging import marker_files, write_marker


def _fragments(tmp_path, n):
    from lance.fragment import write_fragments

    frags = write_fragments(pa.table({"x": list(range(n))}), str(tmp_path / "t.lance"))
    return [f.to_json() for f in frags]


def _state(staging, plan_dir, out_dir, small_rows):
    return staged_state(staging, None, plan_dir=plan_dir, planned=4, planned_shards=[0, 1], out_dir=out_dir,
                        small_rows=small_rows)


def _keys(pairs, n_chunks):
    return pa.table({"doc_id": [d for d, _ in pairs], "chunk": pa.array([c for _, c in pairs], pa.int32()),
                     "n_chunks": pa.array([n_chunks[d] for d, _ in pairs], pa.int32())})


@pytest.mark.parametrize("small_rows", [SMALL_ROWS, -1], ids=["one task", "shuffle"])
def test_staged_state_drops_retried_windows_and_skips_staged_chunks(ray_session, tmp_path, small_rows):
    n_chunks = {"a": 2, "b": 1, "c": 3, "d": 1}
    plan_dir = str(tmp_path / "plan")
    plan = pa.table({"shard": pa.array([0, 0, 1, 1], pa.int32()), "row": pa.array([0, 1, 0, 1], pa.int64()),
                     "doc_id": ["a", "b", "c", "d"], "content_hash": ["h"] * 4, "meta_hash": [""] * 4},
                    schema=EMBED_SCHEMA)
    write_file(plan, f"{plan_dir}/embed", "p", None)
    staging = str(tmp_path / "staging")

    # nothing staged yet: the plan itself is the work
    s = _state(staging, plan_dir, str(tmp_path / "todo0"), small_rows)
    assert (s.todo, s.chunks, s.fragments, s.plan_dir, s.shards) == (4, 0, [], plan_dir, [0, 1])

    m1 = _keys([("a", 0), ("a", 1), ("c", 0), ("d", 0)], n_chunks)
    write_marker(staging, None, "m1", m1, _fragments(tmp_path, 4))
    write_marker(staging, None, "m2", _keys([("c", 1)], n_chunks), _fragments(tmp_path, 1))
    # a retried window: the same chunk again under a later name; committing both would double it
    write_marker(staging, None, "m3", _keys([("c", 1), ("d", 0)], n_chunks), _fragments(tmp_path, 2))
    assert len(marker_files(staging, None)) == 3

    todo_dir = str(tmp_path / "todo1")
    s = _state(staging, plan_dir, todo_dir, small_rows)
    assert [p.rsplit("/", 1)[1] for p in marker_files(staging, None)] == ["m1.parquet", "m2.parquet"]
    # read again (a driver that died after deleting the duplicate): the same state
    again = _state(staging, plan_dir, str(tmp_path / "todo1-again"), small_rows)
    assert (again.todo, again.chunks, again.shards, again.markers) == (2, 5, [0, 1], s.markers)
    assert s.chunks == 5 and len(s.fragments) == 2
    assert sum(f.num_rows for f in s.fragments) == 5
    left = pads.dataset(f"{todo_dir}/embed", format="parquet").to_table()
    assert sorted(left["doc_id"].to_pylist()) == ["b", "c"] and s.todo == 2
    assert s.shards == [0, 1]
    # c is split across windows: its staged chunks are skipped, the last one embedded
    assert read_skip(s.skip_dir, None) == {("c", 0), ("c", 1)}

    write_marker(staging, None, "m4", _keys([("b", 0), ("c", 2)], n_chunks), _fragments(tmp_path, 2))
    s = _state(staging, plan_dir, str(tmp_path / "todo2"), small_rows)
    assert (s.todo, s.chunks, s.skip_dir) == (0, 7, None)
    assert len(s.fragments) == 3
