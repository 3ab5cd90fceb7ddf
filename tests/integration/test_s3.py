"""LanceDB in object storage, against a real S3 endpoint (moto on 127.0.0.1, no AWS)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.config import load_config
from gpte_ray.run.pipeline import run_index
from gpte_ray.store.table import CommitPlan, TableStore
from tests.support.s3 import FaultProxy, free_port

pytestmark = pytest.mark.ray

KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint():
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="corpus-bkt")
    yield endpoint, port
    server.stop()


def _upload(endpoint: str, docs: list[dict], prefix: str, per_shard: int = 40) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    for i in range(0, len(docs), per_shard):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(docs[i:i + per_shard]), buf)
        s3.put_object(Bucket="corpus-bkt", Key=f"{prefix}/part-{i:05d}.parquet", Body=buf.getvalue())
    return f"s3://corpus-bkt/{prefix}/"


def _cfg(src, db, endpoint, **over):
    opts = {"endpoint": endpoint, **KEYS}
    return load_config(None, {"input.paths": [src], "input.storage_options": opts, "output.db": db,
                              "output.table": "docs", "output.storage_options": opts, **over})


def _count(db, endpoint):
    opts = {"aws_endpoint": endpoint, "allow_http": "true", "aws_region": "us-east-1",
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    ds = lance.dataset(f"{db}/docs.lance", storage_options=opts)
    return ds.version, ds.count_rows(), ds


def test_s3_to_s3_run_search_and_exactly_once(ray_session, moto_endpoint, varied_docs, tmp_path, monkeypatch):
    endpoint, _ = moto_endpoint
    docs = varied_docs[:120]
    src = _upload(endpoint, docs, "day1")
    db = "s3://corpus-bkt/lancedb"
    report = run_index(_cfg(src, db, endpoint))
    assert report.committed and report.new == 120 and report.counts_add_up
    version, rows, ds = _count(db, endpoint)
    assert rows == report.chunks_written and version == report.version
    assert len(ds.get_fragments()) <= 16
    assert any(t.transaction_properties.get("gpte_ray.run_id") == report.plan_id
               for t in ds.get_transactions(5) if t is not None)
    assert f"run-{report.run_id}" in ds.tags.list()

    # retrying the committed run's commit (on the version it planned on) is a no-op: no doubled rows
    store = TableStore(db, "docs", ds.storage_options_accessor and None or
                       {"aws_endpoint": endpoint, "allow_http": "true", "aws_region": "us-east-1",
                        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    frags = [f.metadata for f in ds.get_fragments()]
    store.commit(CommitPlan(run_id=report.plan_id, read_version=report.version_before, overwrite=False,
                            fragments=frags), ds.schema)
    assert _count(db, endpoint)[:2] == (version, rows)

    # search through the CLI, credentials from the config file
    cfg = tmp_path / "search.yaml"
    cfg.write_text(json.dumps({"output": {"storage_options": {"endpoint": endpoint, **KEYS}}}))
    out = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "search", "--db", db, "--table", "docs",
                          "--config", str(cfg), "-k", "2", docs[3]["text"]],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0])["doc_id"] == docs[3]["id"]

    # killed after fragments were written, before the commit: readers stay on the old version
    day2 = [dict(d, text=d["text"] + " v2") for d in docs[:10]] + docs[10:]
    src2 = _upload(endpoint, day2, "day2")
    monkeypatch.setattr(TableStore, "commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_index(_cfg(src2, db, endpoint))
    monkeypatch.undo()
    assert _count(db, endpoint)[:2] == (version, rows)
    resumed = run_index(_cfg(src2, db, endpoint))
    assert resumed.changed == 10 and resumed.chunks_embedded == 0 and resumed.chunks_resumed > 0
    assert _count(db, endpoint)[1] == rows


def test_s3_transient_faults_are_retried_and_permanent_ones_fail_cleanly(ray_session, moto_endpoint, varied_docs):
    endpoint, port = moto_endpoint
    docs = varied_docs[120:180]
    src = _upload(endpoint, docs, "faults")
    db = "s3://corpus-bkt/faultdb"
    with FaultProxy(port) as proxy:
        via = f"http://127.0.0.1:{proxy.port}"
        # every 4th request fails with 503 SlowDown-like errors: the clients must retry them
        proxy.fault = lambda method, path, n: 503 if n % 4 == 0 else None
        report = run_index(_cfg(src, db, via))
        assert proxy.injected >= 5
        assert report.committed and report.new == 60
        version, rows, _ = _count(db, endpoint)
        assert rows == report.chunks_written

        edited = [dict(d, text=d["text"] + " edited") for d in docs]
        src2 = _upload(endpoint, edited, "faults2")
        proxy.fault = lambda method, path, n: 403 if method == "PUT" and "/faultdb/" in path else None
        with pytest.raises(Exception) as err:
            run_index(_cfg(src2, db, via))
        assert "403" in str(err.value) or "Forbidden" in str(err.value) or "denied" in str(err.value).lower()
    assert _count(db, endpoint)[:2] == (version, rows)  # previous version intact


def test_s3_shard_overwritten_while_a_run_reads_it(ray_session, moto_endpoint, tmp_path, monkeypatch):
    """Issue 25 on S3: an object overwritten (same rows reordered) once the run has planned. The
    embed pass reads with If-Match on the pinned ETag, so it never reads the new bytes as the
    planned ones: the night is refused naming the object, the rerun plans afresh, and the table
    equals a fresh index of the corpus."""
    import boto3
    import numpy as np

    import gpte_ray.run.planning as planning
    from gpte_ray.input.pins import ShardChangedError
    from gpte_ray.input.prepare import content_hash

    endpoint, _ = moto_endpoint
    docs = [{"id": f"r{i:03d}", "text": f"object store document {i} about shard {i % 5}"} for i in range(120)]
    src = _upload(endpoint, docs, "rewrite", per_shard=60)
    db = "s3://corpus-bkt/rewritedb"
    run_index(_cfg(src, db, endpoint))
    edited = [dict(d, text=d["text"] + " edited") if i % 10 == 0 else d for i, d in enumerate(docs)]
    _upload(endpoint, edited, "rewrite", per_shard=60)

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    real = planning.read_pins

    def read_then_overwrite(*a, **k):
        pins = real(*a, **k)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(edited[:60][::-1]), buf)
        s3.put_object(Bucket="corpus-bkt", Key="rewrite/part-00000.parquet", Body=buf.getvalue())
        return pins

    monkeypatch.setattr(planning, "read_pins", read_then_overwrite)
    with pytest.raises(ShardChangedError, match="rewrite/part-00000.parquet"):
        run_index(_cfg(src, db, endpoint))
    monkeypatch.undo()
    rerun = run_index(_cfg(src, db, endpoint))
    assert rerun.committed and rerun.changed == 12
    run_index(_cfg(src, db, endpoint))

    _, _, ds = _count(db, endpoint)
    t = ds.to_table(columns=["doc_id", "chunk", "content_hash", "vector"])
    keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)), "a (doc_id, chunk) key is stored twice"
    assert dict(zip(t["doc_id"].to_pylist(), t["content_hash"].to_pylist())) == \
        {d["id"]: content_hash(d["text"]) for d in edited}
    fresh = str(tmp_path / "fresh")
    run_index(load_config(None, {"input.paths": [src], "input.storage_options": {"endpoint": endpoint, **KEYS},
                                 "output.db": fresh, "output.table": "docs"}))
    want = lance.dataset(f"{fresh}/docs.lance").to_table(columns=["doc_id", "chunk", "vector"])
    got = {k: v for k, v in zip(keys, t["vector"].to_pylist())}
    for d, c, v in zip(want["doc_id"].to_pylist(), want["chunk"].to_pylist(), want["vector"].to_pylist()):
        np.testing.assert_allclose(got[(d, c)], v, atol=1e-5)


def test_an_s3_corpus_through_s3fs_reads_only_the_shards_that_changed(ray_session, moto_endpoint, tmp_path):
    """Listed and fingerprinted by s3fs (one listing, ETags), read through s3fs as a pyarrow
    filesystem (requester_pays is an s3fs option pyarrow's native client lacks)."""
    endpoint, _ = moto_endpoint
    docs = [{"id": f"s{i}", "text": f"short s3 document number {i}"} for i in range(30)]
    src = _upload(endpoint, docs, "viafsspec", per_shard=10)
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1",
            "requester_pays": "true"}
    cfg = load_config(None, {"input.paths": [src], "input.storage_options": opts, "output.db": str(tmp_path / "db"),
                             "output.table": "docs"})
    first = run_index(cfg)
    assert first.committed and first.new == 30 and first.shards_read == 3 and first.counts_add_up
    docs[12]["text"] = "an edited s3 document"
    import boto3

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(docs[10:20]), buf)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").put_object(Bucket="corpus-bkt", Key="viafsspec/part-00010.parquet",
                                                     Body=buf.getvalue())
    second = run_index(cfg)
    assert (second.shards_read, second.shards_skipped, second.rows_read) == (1, 2, 10)
    assert second.changed == 1 and second.unchanged == 29 and second.counts_add_up and second.committed
    assert "testing" not in json.dumps(second.__dict__, default=str)  # credentials never in the report
