"""Writing small input files for tests."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet(path, rows: list[dict]) -> str:
    """One Parquet shard of `rows` (its folder made as needed); returns its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)
