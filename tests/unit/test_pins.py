"""Shard pins (issue 25), without Ray: a pinned read returns the planned rows or refuses."""

from __future__ import annotations

import os

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.config import InputConfig
from gpte_ray.input.pins import Pin, ShardChangedError, read_pinned, scan_pinned, take_pin
from gpte_ray.input.prepare import content_hash
from gpte_ray.store.deletions import kept_twice

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])


def _shard(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), str(path))
    return str(path)


def _plan(rows, positions):
    return pa.table({"row": pa.array(positions, pa.int64()),
                     "doc_id": [rows[p]["id"] for p in positions],
                     "content_hash": [content_hash(rows[p]["text"]) for p in positions],
                     "meta_hash": [""] * len(positions)})


ROWS = [{"id": f"d{i}", "text": f"text number {i}"} for i in range(10)]


def test_a_pinned_read_returns_exactly_the_planned_rows(tmp_path):
    uri = _shard(tmp_path / "s.parquet", ROWS)
    pin, tables = scan_pinned(uri, 0, InputConfig(paths=[uri]))
    assert sum(t.num_rows for t in tables) == 10 and pin.rows and pin.size == os.path.getsize(uri)
    got = pa.concat_tables(read_pinned(pin, 0, InputConfig(paths=[uri]), _plan(ROWS, [2, 5, 7])))
    assert got["doc_id"].to_pylist() == ["d2", "d5", "d7"]


@pytest.mark.parametrize("change", ["reorder", "edit", "remove", "touch"])
def test_a_shard_changed_after_its_pin_is_refused_naming_it(tmp_path, change):
    uri = _shard(tmp_path / "s.parquet", ROWS)
    cfg = InputConfig(paths=[uri])
    pin, _ = scan_pinned(uri, 0, cfg)
    rows = {"reorder": ROWS[::-1], "edit": [dict(r, text=r["text"] + "!") for r in ROWS], "remove": ROWS[:4],
            "touch": ROWS}[change]
    if change == "touch":
        os.utime(uri, ns=(pin.mtime_ns + 10**9, pin.mtime_ns + 10**9))  # same bytes, new mtime
    else:
        _shard(tmp_path / "s.parquet", rows)
    with pytest.raises(ShardChangedError, match="s.parquet") as err:
        list(read_pinned(pin, 0, cfg, _plan(ROWS, [2, 5, 7])))
    assert err.value.uri == uri and len(str(err.value).splitlines()) == 1


def test_rows_are_matched_by_id_even_when_the_fingerprint_holds(tmp_path):
    """Same size and mtime (an in-place edit that restores them): the ids and hashes still catch it."""
    uri = _shard(tmp_path / "s.parquet", ROWS)
    cfg = InputConfig(paths=[uri])
    pin = take_pin(uri, None)
    _shard(tmp_path / "s.parquet", [dict(r, id=r["id"].replace("d", "e")) for r in ROWS])
    st = os.stat(uri)
    forged = Pin(uri, size=st.st_size, mtime_ns=st.st_mtime_ns, rows=pin.rows)
    with pytest.raises(ShardChangedError, match="row 2 was 'd2' when planned, is now 'e2'"):
        list(read_pinned(forged, 0, cfg, _plan(ROWS, [2, 5])))


def test_the_commit_check_finds_a_document_kept_and_staged_again(tmp_path):
    ds = lance.write_dataset(pa.table({"doc_id": ["a", "b", "c"], "chunk": pa.array([0, 0, 0], pa.int32())}),
                             str(tmp_path / "t.lance"))
    staged = [pa.array(["b", "x"])]
    assert kept_twice(ds, iter(staged), [pa.array(["b"])]) is None  # b's old rows are deleted: fine
    assert kept_twice(ds, iter(staged), [pa.array(["c"])]) == ("b", 1)  # b would be stored twice
    assert kept_twice(ds, iter([pa.array(["x", "y"])]), []) is None  # new documents


def test_s3_pinned_reads_ask_for_the_pinned_bytes(tmp_path):
    """Every range GET carries If-Match (or, on a versioned bucket, the version id)."""
    import io

    import boto3
    from moto.server import ThreadedMotoServer

    from gpte_ray.input.pins import open_pinned
    from tests.support.s3 import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        opts = {"endpoint": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        for bucket, versioned in (("plain-bkt", False), ("versioned-bkt", True)):
            s3.create_bucket(Bucket=bucket)
            if versioned:
                s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(ROWS, schema=SCHEMA), buf)
            s3.put_object(Bucket=bucket, Key="s.parquet", Body=buf.getvalue())
            uri = f"s3://{bucket}/s.parquet"
            cfg = InputConfig(paths=[uri], storage_options=opts)
            pin, _ = scan_pinned(uri, 0, cfg)
            assert pin.etag and (pin.version_id is not None) == versioned
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(ROWS[::-1], schema=SCHEMA), buf)
            s3.put_object(Bucket=bucket, Key="s.parquet", Body=buf.getvalue())  # overwritten since the scan
            if versioned:  # the pinned version is still there: read it, not the new bytes
                got = pa.concat_tables(read_pinned(pin, 0, cfg, _plan(ROWS, [1, 8])))
                assert got["doc_id"].to_pylist() == ["d1", "d8"]
            else:
                with pytest.raises(ShardChangedError, match="PreconditionFailed"):
                    with open_pinned(pin, opts) as f:
                        f.read(10)
    finally:
        server.stop()


def test_an_fsspec_memory_corpus_is_listed_fingerprinted_and_read_through_pins():
    import io
    import json

    import fsspec

    from gpte_ray.input.pins import take_pins
    from gpte_ray.input.sources import list_shards

    mem = fsspec.filesystem("memory")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS, schema=SCHEMA), buf)
    mem.pipe("/corpus/a.parquet", buf.getvalue())
    mem.pipe("/corpus/sub/b.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    cfg = InputConfig(paths=["memory://corpus"])
    shards = list_shards(cfg)
    assert shards == ["memory:///corpus/a.parquet", "memory:///corpus/sub/b.jsonl"]
    pins = take_pins(shards, None)
    assert [p.size for p in pins] == [len(buf.getvalue()), mem.info("/corpus/sub/b.jsonl")["size"]]
    assert all(p.mtime_ns for p in pins) and pins == [take_pin(s, None) for s in shards]

    pin, tables = scan_pinned(shards[1], 1, cfg)
    assert pa.concat_tables(tables)["doc_id"].to_pylist() == ["d0", "d1", "d2"]
    got = pa.concat_tables(list(read_pinned(pin, 1, cfg, _plan(ROWS, [2]))))
    assert got["text"].to_pylist() == ["text number 2"]
    mem.pipe("/corpus/sub/b.jsonl", b'{"id": "d0", "text": "rewritten"}\n')  # re-published: a new pin
    assert take_pins(shards, None)[1] != pins[1]
    with pytest.raises(ShardChangedError, match="b.jsonl"):
        list(read_pinned(pin, 1, cfg, _plan(ROWS, [2])))


def test_s3fs_takes_the_options_its_users_know_and_pyarrow_reads_unless_it_cannot(monkeypatch):
    import pyarrow.fs as pafs

    from gpte_ray.storage import filesystem, s3fs_options

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    opts = s3fs_options({"endpoint": "http://127.0.0.1:9", "aws_access_key_id": "AK", "aws_secret_access_key": "SK",
                         "profile": "nightly", "requester_pays": "true", "anon": "false"})
    assert opts == {"anon": False, "requester_pays": True, "client_kwargs": {"region_name": "eu-west-1"},
                    "endpoint_url": "http://127.0.0.1:9", "profile": "nightly", "key": "AK", "secret": "SK"}
    assert s3fs_options({"anon": "true", "endpoint_url": "http://x"})["anon"] is True
    assert isinstance(filesystem("s3://b/k", {"endpoint": "http://127.0.0.1:9"})[0], pafs.S3FileSystem)
    fs, path = filesystem("s3://b/k", {"endpoint": "http://127.0.0.1:9", "requester_pays": "true"})
    assert isinstance(fs, pafs.PyFileSystem) and path == "b/k"  # s3fs, which pyarrow reads through
