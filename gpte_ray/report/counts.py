"""The counts of one run, declared once: the diff computes them, the report carries them."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["RunCounts"]


@dataclass
class RunCounts:
    """What a run found in the corpus against the table (documents, except `rows_read`)."""

    rows_read: int = 0  # input rows read (a bad shard skipped whole counts as one)
    rows_skipped: int = 0  # rows of shards not read because they did not change (counted as they were)
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    metadata_updated: int = 0  # same text, new kept column values: rows copied, not embedded
    quarantined: int = 0  # rows not embedded, with a reason
    deleted: int = 0  # documents the table loses
    bad_shards: int = 0  # shards skipped whole (unreadable, or changed under the run)
    rebuild: bool = False  # a new model fingerprint: every document embedded again

    def take_counts(self, other: RunCounts) -> None:
        """Set these counts to `other`'s (the report takes the diff's)."""
        for f in fields(RunCounts):
            setattr(self, f.name, getattr(other, f.name))
