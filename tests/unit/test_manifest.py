"""The shard manifest without Ray: which manifest a table version believes, which shards a run
reads, and what the skipped ones count for (store.manifest, plan.shards)."""

from __future__ import annotations

import os

import pyarrow as pa

from gpte_ray.input.pins import Pin, same_fingerprint, take_pin
from gpte_ray.plan.shards import carried_all, choose_shards
from gpte_ray.store.manifest import (
    MANIFEST_SCHEMA,
    Manifest,
    ManifestLayout,
    believed,
    commit_name,
    load_manifest,
    prune,
    refresh_name,
    write_manifest,
)

A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_only_the_last_commits_own_manifest_or_a_later_refresh_of_it_is_believed():
    names = [commit_name(3, A), commit_name(4, B), commit_name(5, C)]
    # version 4 was claimed by B and made; C wrote its manifest for 5, then died before its commit
    assert believed(names, {3: A, 4: B}, version=4) == commit_name(4, B)
    # a manifest written by a run that lost the race for its version is never believed
    assert believed([commit_name(4, C)], {3: A, 4: B}, version=4) is None
    # upkeep made versions 5 and 6 (no claims): the last commit's manifest still describes the table
    assert believed(names[:2], {3: A, 4: B}, version=6) == commit_name(4, B)
    # a claim whose commit never landed (the table is still at 4) is not the last commit
    assert believed(names, {3: A, 4: B, 5: C}, version=4) == commit_name(4, B)
    # refreshes of the last commit win over its own manifest; those of an older commit never count
    old, new = refresh_name(3, A), refresh_name(6, B)
    assert believed([*names, old, new], {3: A, 4: B}, version=6) == new
    assert believed([*names[:2], old], {3: A, 4: B}, version=6) == commit_name(4, B)
    # a table whose commits left no claims: only refreshes made on it count
    assert believed(names, {}, version=4) is None
    legacy = refresh_name(2, "0" * 16)
    assert believed([*names, legacy], {}, version=4) == legacy


def test_fingerprints_decide_what_is_read(tmp_path):
    shards = [str(tmp_path / f"{n}.jsonl") for n in "abc"]
    for s in shards:
        open(s, "w").write('{"id": "x", "text": "y"}\n')
    pins = [take_pin(s, None) for s in shards]
    entries = [{"uri": s, "pin": p.with_rows("r").to_json(), "rows_key": f"k{i}", "rows": 3, "bad": 1}
               for i, (s, p) in enumerate(zip(shards, pins))]
    gone = {"uri": str(tmp_path / "gone.jsonl"), "pin": Pin("g", 1, 1).to_json(), "rows_key": "kg", "rows": 2,
            "bad": 0}
    base = Manifest(pa.Table.from_pylist(entries + [gone], schema=MANIFEST_SCHEMA), docs=5, since_full=0,
                    input_key="k")
    os.utime(shards[1], ns=(1, 10**18))  # touched
    now = [take_pin(s, None) for s in shards] + [take_pin(open(str(tmp_path / "new.jsonl"), "w").name, None)]
    choice = choose_shards([*shards, str(tmp_path / "new.jsonl")], now, base, "")
    assert not choice.full and choice.read == [1, 3] and sorted(choice.skipped) == [0, 2]
    assert [e["uri"] for e in choice.vanished] == [gone["uri"]] and [e["rows_key"] for e in choice.before] == ["k1"]
    assert choose_shards(shards, now[:3], base, "--full-scan").read == [0, 1, 2]
    # skipped shards: 6 rows, 2 bad; 5 documents in the corpus, 1 of them touched tonight and
    # seen in a skipped shard once: 4 untouched documents, 4 - 1 - 4 + 2 = 1 quarantined row
    c = carried_all(choice, loaded=1, held_touched=1)
    assert (c.unchanged, c.existing, c.rows_skipped, c.quarantined) == (4, 4, 6, 1)
    # a listing may know the ETag without the version id: the same bytes still
    assert same_fingerprint(Pin("s3://b/k", 3, etag='"e"'), Pin("s3://b/k", 3, etag='"e"', version_id="v"))
    assert not same_fingerprint(Pin("s3://b/k", 3, etag='"e"'), Pin("s3://b/k", 3, etag='"f"'))


def test_prune_keeps_the_believed_manifest_and_what_it_names(tmp_path, monkeypatch):
    layout = ManifestLayout(str(tmp_path))
    table = pa.Table.from_pylist([{"uri": "u", "pin": "{}", "rows_key": "keep", "rows": 1, "bad": 0}],
                                 schema=MANIFEST_SCHEMA)
    for name in (commit_name(1, A), commit_name(2, B), commit_name(3, C)):
        write_manifest(layout, name, Manifest(table, docs=1, since_full=0, input_key="k"), None)
    os.makedirs(layout.shards)
    for key in ("keep", "orphan", "young"):
        open(layout.rows_file(key), "w").write("x")
    for key in ("keep", "orphan"):
        os.utime(layout.rows_file(key), (1, 1))
    monkeypatch.setattr("gpte_ray.store.manifest.claimed_versions", lambda *a: {1: A, 2: B})
    base = load_manifest("db", "t", layout, 2, None)
    assert base.name == commit_name(2, B) and base.docs == 1
    prune(layout, base, None)
    assert sorted(os.listdir(layout.manifests)) == [commit_name(2, B), commit_name(3, C)]
    assert sorted(os.listdir(layout.shards)) == ["keep.parquet", "young.parquet"]
