"""A short soak (benchmarks/soak.py, whose full run plays 45+ nights): nights on one local and
one S3 table with a paused run, two concurrent runs, shards rewritten mid-run, a late lease PUT
and the shard events (a shard appended, rewritten, touched, deleted, documents moved between
shards, an in-place edit found by a full scan), each night checked against the corpus, the
reference vectors and the diff (staging empty, lock free)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_short_soak_with_faults_and_shard_events():
    from benchmarks.soak import main

    summary = main(["--nights", "10", "--s3-nights", "2", "--docs", "300", "--per-shard", "30", "--seed", "3",
                    "--faults", "local:1:pause,local:2:concurrent,local:3:rewrite,s3:1:late-lease",
                    "--shard-events", "4:append+touch+move,6:rewrite+delete-shard,7:inplace",
                    "--model-change-every", "5"])
    assert summary["nights"] == 10
    assert summary["faults"]["pause"] == 1 and summary["faults"]["concurrent"] == 1
    assert summary["faults"]["late-lease"] == 1 and summary["faults"]["rewrite"] == 1
    assert summary["refused_runs"].get("lost-lock", 0) + summary["refused_runs"].get("moved", 0) >= 1
    assert summary["rebuilds"] >= 1
    assert all(summary["shard_events"].values()) and summary["in_place_found"] == 1
    assert summary["shards_skipped"] > 0
