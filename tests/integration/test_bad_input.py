"""Bad rows, bad shards, a killed actor, secrets: nothing lost, errors one can act on."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpte_ray.config import load_config
from gpte_ray.input.sources import ShardError
from gpte_ray.run.pipeline import run_index
from tests.support.files import write_parquet

pytestmark = pytest.mark.ray

VALID_ODD = {
    "ok-ctrl": "line\x01with control \x07 chars",
    "ok-zw": "zero\u200bwidth\u200djoiner\ufeff text",
    "ok-mixed": "English Русский 中文 العربية ελληνικά",
    "ok-emoji": "emoji 🎉🚀 party 👩‍👩‍👧",
    "ok-rtl": "\u202bשלום עולם مرحبا بالعالم\u202c",
}


def _bad_rows_corpus(root) -> list[str]:
    os.makedirs(root, exist_ok=True)
    lines = [json.dumps({"id": k, "text": v}).encode() for k, v in VALID_ODD.items()]
    lines += [
        json.dumps({"id": "null", "text": None}).encode(),
        json.dumps({"id": "empty", "text": ""}).encode(),
        json.dumps({"id": "blank", "text": "  \n\t "}).encode(),
        b'{"id": "bad-utf8", "text": "abc \xff\xfe def"}',
        json.dumps({"text": "no id here"}).encode(),
        json.dumps({"id": "dup", "text": "first wins"}).encode(),
        json.dumps({"id": "dup", "text": "same shard duplicate"}).encode(),
        json.dumps({"id": 12345, "text": "integer ids are strings"}).encode(),
    ]
    a = os.path.join(root, "a.jsonl")
    with open(a, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    b = write_parquet(os.path.join(root, "b.parquet"),
                      [{"id": "dup", "text": "cross-shard duplicate"}, {"id": "ok-b", "text": "fine"}])
    c = os.path.join(root, "c.parquet")
    pq.write_table(pa.table({"id": ["bytes-ok", "bytes-bad"],
                             "text": pa.array([b"valid bytes", b"\xff\xfe broken"], pa.binary())}), c)
    return [a, b, c]


@pytest.fixture(params=["driver", "cluster"])
def scan_where(request, monkeypatch):
    """The test twice: its small input scanned in the driver (the default), and on the cluster."""
    from gpte_ray.run import planning

    if request.param == "cluster":
        monkeypatch.setattr(planning, "SCAN_HERE_BYTES", -1)
    seen, real = [], planning.scan_here
    monkeypatch.setattr(planning, "scan_here", lambda ctx, positions: seen.append(real(ctx, positions)) or seen[-1])
    yield request.param
    assert seen and set(seen) == {request.param == "driver"}


def test_every_bad_row_is_quarantined_with_its_reason(ray_session, tmp_path, scan_where):
    shards = _bad_rows_corpus(str(tmp_path / "corpus"))
    db = str(tmp_path / "db")
    report = run_index(load_config(None, {"input.paths": shards, "output.db": db, "output.table": "docs"}))
    assert report.rows_read == 17 and report.counts_add_up
    assert (report.new, report.quarantined) == (9, 8)

    ids = set(lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id"])["doc_id"].to_pylist())
    assert ids == set(VALID_ODD) | {"dup", "12345", "ok-b", "bytes-ok"}
    text = lance.dataset(f"{db}/docs.lance").to_table(filter="doc_id = 'dup'", columns=["text"])
    assert text["text"].to_pylist() == ["first wins"]

    q = pq.read_table(report.quarantine_file).to_pylist()
    reasons = {(os.path.basename(r["source"]), r["row"]): r["reason"] for r in q}
    assert reasons[("a.jsonl", 5)] == "null text"
    assert reasons[("a.jsonl", 6)] == "empty text"
    assert reasons[("a.jsonl", 7)] == "whitespace-only text"
    assert "not valid UTF-8" in reasons[("a.jsonl", 8)]
    assert reasons[("a.jsonl", 9)] == "missing id"
    dup = reasons[("a.jsonl", 11)]
    assert dup.startswith("duplicate doc_id (kept ") and "a.jsonl row 10" in dup
    assert "a.jsonl row 10" in reasons[("b.parquet", 0)]
    assert "not valid UTF-8" in reasons[("c.parquet", 1)]
    assert all(r["reason"] for r in q) and len(q) == 8


def _bad_shards(root) -> dict[str, str]:
    os.makedirs(root, exist_ok=True)
    corrupt = os.path.join(root, "corrupt.parquet")
    with open(corrupt, "wb") as f:
        f.write(b"PAR1 this is not a parquet file at all" * 10)
    trunc = os.path.join(root, "trunc.jsonl.gz")
    data = gzip.compress(b"".join(json.dumps({"id": i, "text": f"doc {i}"}).encode() + b"\n" for i in range(500)))
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    missing = write_parquet(os.path.join(root, "missing.parquet"), [{"id": "m1", "body": "no text column"}])
    wrong = write_parquet(os.path.join(root, "wrong.parquet"), [{"id": "w1", "text": 42}])
    return {corrupt: "unreadable Parquet", trunc: "truncated or corrupt gzip",
            missing: "missing column 'text'", wrong: "column 'text' is int64, expected string"}


def test_bad_shards_fail_before_commit_or_are_skipped(ray_session, tmp_path, scan_where):
    good = write_parquet(str(tmp_path / "good" / "g.parquet"), [{"id": f"g{i}", "text": f"good {i}"} for i in range(5)])
    db = str(tmp_path / "db")
    first = run_index(load_config(None, {"input.paths": [good], "output.db": db, "output.table": "docs"}))
    for shard, problem in _bad_shards(str(tmp_path / "bad")).items():
        cfg = load_config(None, {"input.paths": [good, shard], "output.db": db, "output.table": "docs"})
        with pytest.raises(ShardError) as err:
            run_index(cfg)
        line = str(err.value)
        assert "\n" not in line and shard in line and problem in line
        assert lance.dataset(f"{db}/docs.lance").version == first.version

    bad = list(_bad_shards(str(tmp_path / "bad2")))
    cfg = load_config(None, {"input.paths": [good, *bad, write_parquet(str(tmp_path / "more.parquet"),
                                                                      [{"id": "new1", "text": "new"}])],
                             "output.db": db, "output.table": "docs", "input.skip_bad_shards": True})
    report = run_index(cfg)
    assert report.bad_shards == 4 and report.counts_add_up and report.new == 1 and report.deleted == 0
    reasons = pq.read_table(report.quarantine_file)["reason"].to_pylist()
    assert sum(r.startswith("bad shard: ") for r in reasons) == 4


def test_killed_embed_actor_loses_and_duplicates_nothing(ray_session, tmp_path, varied_docs):
    import psutil

    docs = varied_docs[:200]
    shards = [write_parquet(str(tmp_path / "c" / f"p{i}.parquet"), docs[i * 50:(i + 1) * 50]) for i in range(4)]
    db = str(tmp_path / "db")
    cfg = load_config(None, {"input.paths": shards, "output.db": db, "output.table": "docs",
                             "batch.window_rows": 16})
    killed = []

    def staged() -> int:
        return len([f for _, _, fs in os.walk(f"{db}/_gpte_staging/docs/runs") for f in fs if f.endswith(".parquet")])

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if staged() >= 1:
                # this session's Ray runs under this process: find its embed actor's worker
                for p in psutil.Process().children(recursive=True):
                    try:
                        title = " ".join(p.cmdline())
                    except psutil.Error:
                        continue
                    if "EmbedStage" in title:
                        p.kill()  # a real process death, mid-run
                        killed.append(p.pid)
                        break
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    report = run_index(cfg)
    t.join()
    assert killed, "no embed actor was killed"
    table = lance.dataset(f"{db}/docs.lance").to_table(columns=["doc_id", "chunk"])
    keys = list(zip(table["doc_id"].to_pylist(), table["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)) == report.chunks_written
    assert {d for d, _ in keys} == {d["id"] for d in docs} and report.counts_add_up


def test_secrets_never_leak(tmp_path):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEY1234567", "AWS_SECRET_ACCESS_KEY": "fakeSecret/Key+987654321",
               "AWS_SESSION_TOKEN": "FakeSessionToken555", "RAY_AUTH_TOKEN": "fake-ray-token-0042"}
    corpus = write_parquet(str(tmp_path / "c" / "p.parquet"), [{"id": f"d{i}", "text": f"text {i}"} for i in range(4)])
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input:\n  storage_options:\n    secret_access_key: ConfigSecretValue777\n")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, **secrets, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "RAY_TMPDIR": ray_tmp, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    env.pop("RAY_ADDRESS", None)
    db = str(tmp_path / "db")
    ok = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "index", "--config", str(cfg), "--input", corpus,
                         "--db", db, "--table", "docs", "--num-cpus", "2", "--report", str(tmp_path / "r.json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "index", "--config", str(cfg), "--input",
                          "s3://no-such-bucket/x/", "--db", db, "--table", "docs"],
                         env={**env, "GPTE_RAY_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "gpte-ray: error:" in bad.stderr
    haystack = {"stdout": ok.stdout + bad.stdout, "stderr": ok.stderr + bad.stderr}
    for top in (tmp_path, ray_tmp):  # every output, log and table file, Ray's session logs included
        for root, _, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path) and path != str(cfg):
                    with open(path, "rb") as f:
                        haystack[path] = f.read().decode("utf-8", errors="replace")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    haystack["metadata"] = json.dumps({k.decode(): v.decode() for k, v in
                                       lance.dataset(f"{db}/docs.lance").schema.metadata.items()})
    assert len(haystack) > 20  # the table's files, the report, Ray's logs were all searched
    for value in [*secrets.values(), "ConfigSecretValue777"]:
        leaks = [where for where, text in haystack.items() if value in text]
        assert not leaks, f"secret {value[:6]}... leaked into {leaks}"


def test_an_input_folder_that_holds_the_db_never_reads_the_job_s_own_files(tmp_path, monkeypatch):
    """`--input .` with the default `--db ./gpte_db`: the quarantine files the first night
    writes under the db folder must not be read back as shards on the next night."""
    from gpte_ray.input.preflight import preflight

    monkeypatch.chdir(tmp_path)
    write_parquet(str(tmp_path / "a.parquet"), [{"id": "1", "text": "one"}])
    os.makedirs("gpte_db/t.quarantine")
    pq.write_table(pa.table({"source": ["a.parquet"], "row": [0], "doc_id": ["x"], "reason": ["r"],
                             "run_id": ["0" * 16]}), "gpte_db/t.quarantine/0f4c2fe25f72aa9c.parquet")
    cfg = load_config(None, {"input.paths": ["."], "output.db": "./gpte_db", "output.table": "t"})
    assert preflight(cfg) == [str(tmp_path / "a.parquet")]
    cfg = load_config(None, {"input.paths": ["gpte_db"], "output.db": "./gpte_db", "output.table": "t"})
    with pytest.raises(ShardError, match="matches no shard files"):
        preflight(cfg)
