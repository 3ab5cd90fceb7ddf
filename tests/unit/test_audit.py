"""The independent row count behind `counts_add_up`, and that the check can fail."""

from __future__ import annotations

import gzip

from gpte_ray.config import InputConfig
from gpte_ray.input.audit import count_rows
from gpte_ray.report.run_report import RunReport
from tests.support.files import write_parquet


def test_count_rows_from_the_files_themselves(tmp_path):
    cfg = InputConfig()
    assert count_rows(write_parquet(str(tmp_path / "a.parquet"), [{"id": str(i), "text": "t"} for i in range(7)]),
                      cfg) == 7
    lines = b'{"id": 1, "text": "a"}\n\n{"id": 2}\nnot json\n{"id": 3, "text": "no newline at the end"}'
    (tmp_path / "b.jsonl").write_bytes(lines)
    assert count_rows(str(tmp_path / "b.jsonl"), cfg) == 5  # blank and broken lines are rows too
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines + b"\n"))
    assert count_rows(str(tmp_path / "c.jsonl.gz"), cfg) == 5
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert count_rows(str(tmp_path / "empty.jsonl"), cfg) == 0
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet" * 10)
    assert count_rows(str(tmp_path / "bad.parquet"), cfg) is None
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(lines * 100)[:60])
    assert count_rows(str(tmp_path / "trunc.jsonl.gz"), cfg) is None


def test_counts_add_up_compares_the_files_with_the_run():
    def finished(source_rows, rows_read=10, new=6, unchanged=3, quarantined=1):
        return RunReport(source_rows=source_rows, rows_read=rows_read, new=new, unchanged=unchanged,
                         quarantined=quarantined).finish()

    assert finished(10).counts_add_up
    assert not finished(11).counts_add_up  # a row in the files that the run never saw
    assert not finished(10, rows_read=11).counts_add_up  # a row read twice
    assert not finished(10, new=5).counts_add_up  # a row read but not accounted for
    assert not finished(None).counts_add_up  # never counted: nothing to vouch for
