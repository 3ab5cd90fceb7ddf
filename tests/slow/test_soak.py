"""A short soak (benchmarks/soak.py, whose full run plays 45+ nights): nights on one local and
one S3 table with a paused run, two concurrent runs, shards rewritten mid-run and a late lease PUT, each night checked
against the corpus, the reference vectors and the diff (staging empty, lock free)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_short_soak_with_a_pause_a_race_a_rewrite_and_a_late_lease():
    from benchmarks.soak import main

    summary = main(["--nights", "6", "--s3-nights", "2", "--docs", "300", "--seed", "3",
                    "--faults", "local:1:pause,local:2:concurrent,local:3:rewrite,s3:1:late-lease",
                    "--model-change-every", "2"])
    assert summary["nights"] == 6
    assert summary["faults"]["pause"] == 1 and summary["faults"]["concurrent"] == 1
    assert summary["faults"]["late-lease"] == 1 and summary["faults"]["rewrite"] == 1
    assert summary["refused_runs"].get("lost-lock", 0) + summary["refused_runs"].get("moved", 0) >= 1
    assert summary["rebuilds"] >= 1
