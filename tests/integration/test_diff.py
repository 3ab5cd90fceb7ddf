"""The cluster diff (`gpte_ray.plan.diff`) against the reference `make_plan`, on random corpora with
duplicates, quarantined rows, unreadable shards, deletions, rebuilds and kept-column changes."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpte_ray.input.prepare import content_hash
from gpte_ray.input.sources import ShardError
from gpte_ray.plan.diff import MassDeleteError, check_mass_delete, compute_diff
from gpte_ray.plan.files import ids_from, planned_rows
from gpte_ray.plan.grouping import SMALL_ROWS
from gpte_ray.run.stages import SCAN_SCHEMA
from tests.support.reference_plan import make_plan

SHARDS = ["s0.parquet", "s1.parquet", "s2.parquet"]


def _scan_ds(scan, blocks, here=False):
    """The scan as a Ray dataset of `blocks` blocks, or (`here`) as the list of Arrow tables
    a driver that scanned a small input passes."""
    import ray.data

    scan = [(*r, None)[:6] for r in scan]  # meta_hash: None unless given
    cols = list(zip(*scan)) if scan else [[]] * 6
    table = pa.table(dict(zip(SCAN_SCHEMA.names, cols)), schema=SCAN_SCHEMA)
    if table.num_rows == 0:
        return [] if here else ray.data.from_arrow(table)
    step = max(1, -(-table.num_rows // blocks))
    tables = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return tables if here else ray.data.from_arrow(tables)


def _table_ds(existing):
    import ray.data

    if existing is None:
        return None
    values = [v if isinstance(v, tuple) else (v, None) for v in existing.values()]
    return ray.data.from_arrow(pa.table({"doc_id": pa.array(list(existing), pa.string()),
                                         "content_hash": pa.array([c for c, _ in values], pa.string()),
                                         "meta_hash": pa.array([m for _, m in values], pa.string())}))


def _read(folder):
    try:
        return pads.dataset(folder, format="parquet").to_table()
    except FileNotFoundError:
        return None


def _diff(tmp_path, scan, existing, rebuild, blocks=3, frac=1.0, allow=True, shuffle=False, copy_all=False,
          here=False):
    plan_dir = str(tmp_path / f"plan-{uuid.uuid4().hex}")
    d = compute_diff(_scan_ds(scan, blocks, here), _table_ds(existing), plan_dir=plan_dir, shards=SHARDS,
                     storage_options=None, rebuild=rebuild, rows_hint=len(scan), max_delete_fraction=frac,
                     allow_mass_delete=allow, small_rows=-1 if shuffle else SMALL_ROWS, kept_changed=lambda: copy_all)
    return d, plan_dir


doc_ids = st.sampled_from(["a", "b", "c", "d", "e", "f", "x'y", "ü"])
metas = st.sampled_from([None, "m1", "m2"])  # hash of the kept columns' values (None: none kept)
scan_rows = st.lists(st.tuples(st.integers(0, 2), doc_ids, st.sampled_from(["t1", "t2"]),
                               st.sampled_from([None, None, None, None, "bad text"]), metas), max_size=40)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scan_rows,
       st.one_of(st.none(), st.dictionaries(st.sampled_from(["a", "b", "c", "x'y", "y", "z"]),
                                            st.tuples(st.sampled_from(["t1", "t2"]), metas))),
       st.booleans(), st.booleans(), st.integers(1, 4), st.booleans(), st.booleans(), st.booleans())
def test_cluster_diff_equals_reference(ray_session, tmp_path, rows, existing, rebuild, bad_shard, blocks, shuffle,
                                       copy_all, here):
    """Every grouping (one task for small diffs, a hash shuffle for large ones, the driver for a
    scan it read itself, with its fallback to a shuffle past small_rows) matches the reference."""
    rebuild = rebuild and existing is not None
    scan = []
    for shard, d, t, reason, meta in rows:
        row = sum(1 for s, *_ in scan if s == shard)
        scan.append((shard, row, None if reason and d == "f" else d, None if reason else content_hash(t), reason,
                     None if reason else meta))
    if bad_shard:
        scan.append((2, -1, None, None, "bad shard: s2.parquet: unreadable", None))
    existing = {k: (content_hash(t), m) for k, (t, m) in existing.items()} if existing is not None else None

    if copy_all and bad_shard and not rebuild:
        # copying the table into new columns would leave out the unread shard's documents
        with pytest.raises(ShardError, match=r"^input error: 1 shard\(s\) could not be read; a new set of kept"):
            _diff(tmp_path, scan, existing, rebuild, blocks, shuffle=shuffle, copy_all=copy_all, here=here)
        return
    ref = make_plan(scan, SHARDS, existing, rebuild, 1.0, True, copy_all=copy_all)
    d, plan_dir = _diff(tmp_path, scan, existing, rebuild, blocks, shuffle=shuffle, copy_all=copy_all, here=here)

    got = (d.rows_read, d.new, d.changed, d.unchanged, d.metadata_updated, d.quarantined, d.deleted, d.bad_shards)
    assert got == (ref.rows_read, ref.new, ref.changed, ref.unchanged, ref.metadata_updated, ref.quarantined,
                   ref.deleted, ref.bad_shards)
    assert d.existing == len(existing or {})
    assert d.overwrite == (rebuild or ref.copy_all)

    copies = _read(f"{plan_dir}/meta/embed")
    got_copies = set() if copies is None else set(zip(*(copies[c].to_pylist() for c in ("doc_id", "shard", "row",
                                                                                         "content_hash"))))
    assert got_copies == {(k, *v[:3]) for k, v in ref.copy_docs.items()}
    assert d.meta_shards == sorted({s for s, *_ in ref.copy_docs.values()})

    embed = _read(f"{plan_dir}/embed")
    rows = set() if embed is None else set(zip(*(embed[c].to_pylist() for c in ("doc_id", "shard", "row",
                                                                              "content_hash"))))
    assert rows == {(k, *v) for k, v in ref.embed_docs.items()}
    assert d.embed == len(ref.embed_docs)
    assert d.shards == sorted({s for s, _, _ in ref.embed_docs.values()})
    for s in d.shards:
        rows = set(planned_rows(plan_dir, s, None)["row"].to_pylist())
        assert rows == {r for sh, r, _ in ref.embed_docs.values() if sh == s}
    # the plan is partitioned by shard: a read task reads its own shard's file only
    files = sorted(os.listdir(f"{plan_dir}/embed")) if d.shards else []
    assert files == [f"{s:010d}.parquet" for s in d.shards]

    deletes = [x for a in d.delete_batches(batch_rows=2) for x in a.to_pylist()]
    assert sorted(deletes) == sorted(ref.delete_doc_ids)

    q = _read(f"{plan_dir}/quarantine")
    got_q = set() if q is None else set(zip(q["source"].to_pylist(), q["row"].to_pylist(),
                                            q["doc_id"].to_pylist(), q["reason"].to_pylist()))
    assert got_q == {(SHARDS[r["shard"]], r["row"], r["doc_id"], r["reason"]) for r in ref.quarantine}
    assert q is None or q["shard"].to_pylist() == [SHARDS.index(s) for s in q["source"].to_pylist()]
    assert len(got_q) == ref.quarantined


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scan_rows, st.dictionaries(st.sampled_from(["a", "b", "c", "y"]), st.sampled_from(["t1", "t2"])),
       st.randoms(), st.integers(1, 4))
def test_same_work_same_digest_in_any_order(ray_session, tmp_path, rows, existing, rnd, blocks):
    scan = [(s, i, d, None if r else content_hash(t), r, m) for i, (s, d, t, r, m) in enumerate(rows)]
    existing = {k: content_hash(v) for k, v in existing.items()}
    shuffled = scan[:]
    rnd.shuffle(shuffled)
    a, _ = _diff(tmp_path, scan, existing, False, 1)
    b, _ = _diff(tmp_path, shuffled, existing, False, blocks, shuffle=True)
    assert a.digest() == b.digest()
    ref = make_plan(scan, SHARDS, existing, False, 1.0, True)
    if ref.embed_docs or ref.delete_doc_ids:
        # different work, different digest: one more document to embed
        c, _ = _diff(tmp_path, [*scan, (0, 10_000, "new-doc", content_hash("t"), None)], existing, False)
        assert c.digest() != a.digest()
    if ref.copy_docs:
        # the same documents to copy with other kept values: another digest
        other = [(*r[:5], "m3" if r[2] in ref.copy_docs and r[4] is None else r[5]) for r in scan]
        c, _ = _diff(tmp_path, other, existing, False)
        assert c.digest() != a.digest()


def test_mass_delete_guard_counts_rebuilds(ray_session, tmp_path):
    existing = {f"d{i}": content_hash("t") for i in range(10)}
    scan = [(0, i, f"d{i}", content_hash("t"), None) for i in range(5)]
    with pytest.raises(MassDeleteError, match="refusing to delete 5 of 10"):
        _diff(tmp_path, scan, existing, False, frac=0.1, allow=False)
    # a new model rebuilds the table: leaving out half the corpus is refused just the same
    with pytest.raises(MassDeleteError, match="refusing to delete 5 of 10"):
        _diff(tmp_path, scan, existing, True, frac=0.1, allow=False)
    with pytest.raises(MassDeleteError):
        make_plan(scan, SHARDS, existing, True, 0.1, False)
    d, _ = _diff(tmp_path, scan, existing, True, frac=0.1, allow=True)
    assert (d.new, d.deleted, d.existing) == (5, 5, 10)
    # an unreadable shard keeps its documents in a nightly run, so nothing is deleted
    d, plan_dir = _diff(tmp_path, [*scan, (1, -1, None, None, "bad shard: x")], existing, False, frac=0.1,
                        allow=False)
    assert d.deleted == 0 and d.bad_shards == 1 and list(d.delete_batches()) == []
    assert [x for b in ids_from(f"{plan_dir}/vanished", None) for x in b.to_pylist()] != []
    assert d.whole_shards() == {1}
    q = pads.dataset(d.write_quarantine(str(tmp_path / "q" / "r.parquet"), "r1"), format="parquet").to_table()
    assert q.to_pylist() == [{"source": SHARDS[1], "row": -1, "doc_id": None, "reason": "bad shard: x", "run_id": "r1"}]


def test_guard_function():
    check_mass_delete(1, 10, 0.1, False)
    check_mass_delete(10, 10, 0.1, True)
    check_mass_delete(5, 0, 0.1, False)
    with pytest.raises(MassDeleteError):
        check_mass_delete(2, 10, 0.1, False)
