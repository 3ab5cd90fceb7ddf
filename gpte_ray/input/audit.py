"""Counting the rows in the source files, independently of the code that reads them.

`counts_add_up` in the run report compares this count with what the run accounted for (new +
changed + unchanged + quarantined). The count takes another path to the same files (Parquet
footers, JSONL line breaks), so a reader that dropped or doubled rows would show.
"""

from __future__ import annotations

import gzip
import zlib

from gpte_ray.config import InputConfig
from gpte_ray.input.sources import shard_format
from gpte_ray.storage import filesystem

__all__ = ["count_rows", "source_rows"]

_BLOCK = 1 << 20


def count_rows(uri: str, cfg: InputConfig) -> int | None:
    """Rows of one shard: a Parquet footer's row count, or a JSONL file's lines (as Python
    iterates them: a last line without a newline counts). None when the file cannot be read."""
    fs, path = filesystem(uri, cfg.storage_options)
    try:
        if shard_format(uri, cfg.format) == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata.num_rows
        lines, last = 0, b"\n"
        with fs.open_input_stream(path, compression=None) as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            while block := stream.read(_BLOCK):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    except (OSError, EOFError, zlib.error, ValueError, ImportError):
        return None
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors (ArrowInvalid) mean unreadable too
        if type(e).__module__.startswith("pyarrow"):
            return None
        raise


def source_rows(shards: list[str], cfg: InputConfig, quarantine: list[dict], read_cpus: float,
                only: list[int] | None = None, here: bool = False) -> int:
    """Rows in all shards (`only`: in the shards at these positions), counted in Ray tasks (one
    per shard; only ints come back), or with `here` (a few small shards) in this process.

    A shard the run quarantined whole (a bad shard: `row` -1 in `quarantine`) counts as the one
    row that stands for it, as it does in the run's own counts; so does one that cannot be read.
    """
    import ray

    whole = {q["shard"] for q in quarantine if q["row"] == -1}
    positions = range(len(shards)) if only is None else only
    todo = [shards[i] for i in positions if i not in whole]
    if not todo:
        return len(whole)
    if here:
        counts = [count_rows(uri, cfg) for uri in todo]
    else:
        count = ray.remote(num_cpus=read_cpus)(count_rows)
        counts = ray.get([count.remote(uri, cfg) for uri in todo])
    return len(whole) + sum(1 if n is None else n for n in counts)
