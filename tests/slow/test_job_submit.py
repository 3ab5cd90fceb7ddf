"""`ray job submit` end to end: a real local head (dashboard on), the repo as working dir,
jobs/index_corpus.py as entrypoint, the table checked; a duplicate submission id is refused."""

from __future__ import annotations

import json
import uuid

import pytest
from _local_ray import REPO, LocalHead, last_json, require_job_submission

from gpte_ray.demo.corpus import docstring_docs, write_shards

pytestmark = pytest.mark.slow

# what --working-dir must not upload (Ray also honours .gitignore)
EXCLUDES = [".git", ".venv", "venv", "demo_data", ".hypothesis", ".pytest_cache", "*.lance"]


@pytest.fixture
def head():
    require_job_submission()
    h = LocalHead(num_cpus=2, dashboard=True).start()
    yield h
    h.stop()


def test_job_submit_indexes_and_refuses_duplicate_submission_id(head, tmp_path):
    docs = list(docstring_docs(30))
    corpus = tmp_path / "corpus"
    write_shards(iter(docs), str(corpus), rows_per_shard=15)
    db = tmp_path / "db"
    sid = f"gpte-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}}
    submit = [
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--submission-id", sid,
        "--", "python", "jobs/index_corpus.py", "--input", str(corpus), "--db", str(db), "--table", "docs",
    ]
    out = head.job_submit(*submit)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"Job '{sid}' succeeded" in log

    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(head.dashboard_url).get_job_status(sid) == JobStatus.SUCCEEDED

    report = last_json(out.stdout)  # the job's run report, tailed from its logs
    assert report["counts_add_up"] and report["rows_read"] == len(docs) and report["new"] == len(docs)
    assert report["committed"]

    import lancedb

    from tests.support.tables import check_table

    table = check_table(str(db), "docs", [d["id"] for d in docs], report["chunks_written"])
    assert table.num_rows >= len(docs)

    # the same submission id again: Ray refuses it, so a cron schedule is idempotent
    sep = submit.index("--")
    again = head.job_submit(*submit[:sep], "--no-wait", *submit[sep:], timeout=120)
    assert again.returncode != 0
    assert "already exists" in again.stdout + again.stderr
    assert lancedb.connect(str(db)).open_table("docs").count_rows() == table.num_rows
