"""The command line as a first-time user meets it: quiet runs, one-line errors, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.files import write_parquet
from tests.support.tables import check_table

pytestmark = pytest.mark.ray


def _gpte_ray(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "gpte_ray.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_index_says_only_its_own_lines(tmp_path, varied_docs):
    docs = varied_docs[:40]
    corpus = tmp_path / "corpus"
    write_parquet(str(corpus / "a.parquet"), docs[:20])
    write_parquet(str(corpus / "b.parquet"), docs[20:])
    db = str(tmp_path / "db")
    out = _gpte_ray("index", "--input", str(corpus), "--db", db, "--table", "docs", "--num-cpus", "2",
                    "--window-rows", "16", "--report", str(tmp_path / "report.json"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines and all(x.startswith(("embedded ", "run report: ", "library output: ")) for x in lines), out.stderr
    assert lines[0].startswith("embedded 0/40 docs") and lines[-2].startswith("run report: ")
    # a successful run names its log, and the file is there
    assert lines[-1].startswith("library output: ") and os.path.isfile(lines[-1].split(": ", 1)[1])
    report = json.loads(out.stdout.splitlines()[-1])
    assert "timeline" not in report and report["counts_add_up"] and report["source_rows"] == 40
    assert report["model"]["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and report["model"]["dim"] == 384
    full = json.loads(open(tmp_path / "report.json").read())
    assert full["timeline"] and full["trend"][-1]["run_id"] == report["run_id"]
    assert {k: v for k, v in full.items() if k not in ("timeline", "trend")} == report
    check_table(db, "docs", [d["id"] for d in docs], report["chunks_written"])


def test_missing_column_in_a_later_shard_is_one_line_exit_2(tmp_path, varied_docs):
    corpus = tmp_path / "corpus"
    write_parquet(str(corpus / "a.parquet"), varied_docs[:5])  # the first shard passes the check before Ray
    bad = write_parquet(str(corpus / "b.parquet"), [{"id": "x", "body": "the text is elsewhere"}])
    db = tmp_path / "db"
    out = _gpte_ray("index", "--input", str(corpus), "--db", str(db), "--num-cpus", "2")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpte-ray: error: input error: {bad}: missing column 'text'")
    assert out.stdout == "" and not db.exists()


def test_the_log_path_printed_on_failure_stays_true(ray_session, tmp_path, monkeypatch):
    """The CLI moves its noise log beside Ray's logs on failure and again on exit: the path in
    the error line must be where the file is afterwards."""
    from gpte_ray import console

    log = tmp_path / "gpte-ray-index-1.log"
    log.write_text("library output\n")
    monkeypatch.setattr(console, "_noise_log", str(log))
    console.file_noise_log()
    printed = console.noise_log()
    console.file_noise_log()
    assert console.noise_log() == printed and os.path.exists(printed) and printed != str(log)
    os.unlink(printed)
