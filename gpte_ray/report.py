"""The run report: what one run read, embedded, wrote and skipped, and how fast."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from gpte_ray.console import console

__all__ = ["Progress", "ProgressCounter", "RunReport"]


@dataclass
class RunReport:
    run_id: str = ""
    table: str = ""
    version_before: int | None = None
    version: int | None = None
    committed: bool = False
    rebuild: bool = False
    rows_read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    quarantined: int = 0
    deleted: int = 0
    bad_shards: int = 0
    docs_embedded: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0  # chunks that went through the model in this run (resumed ones did not)
    chunks_resumed: int = 0
    truncated: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    padding_efficiency: float | None = None
    oom_retries: int = 0
    min_token_budget: int | None = None
    device: str = ""
    embed_nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> windows embedded there
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rows_per_s: float = 0.0
    tokens_per_s: float = 0.0
    counts_add_up: bool = False
    quarantine_file: str | None = None
    report_file: str | None = None
    upkeep: dict = field(default_factory=dict)
    length_histogram: dict = field(default_factory=dict)  # edges (upper bounds) and chunk counts
    buckets: list[dict] = field(default_factory=list)  # micro-batch fill per padded-length bucket
    timeline: list[list[float]] = field(default_factory=list)  # [seconds, docs done, tokens done]

    def add_histograms(self, edges: list[int], hist: list[int], real: list[int], computed: list[int],
                       batches: list[int]) -> None:
        if not self.length_histogram:
            self.length_histogram = {"edges": [*edges, None], "counts": [0] * len(hist)}
            self.buckets = [{"max_len": e, "real_tokens": 0, "computed_tokens": 0, "batches": 0}
                            for e in [*edges, None]]
        for i, n in enumerate(hist):
            self.length_histogram["counts"][i] += n
        for b, r, c, n in zip(self.buckets, real, computed, batches):
            b["real_tokens"] += r
            b["computed_tokens"] += c
            b["batches"] += n

    def finish(self) -> RunReport:
        self.counts_add_up = self.rows_read == self.new + self.changed + self.unchanged + self.quarantined
        if self.padded_tokens:
            self.padding_efficiency = round(self.tokens / self.padded_tokens, 4)
        if self.seconds > 0:
            self.rows_per_s = round(self.docs_embedded / self.seconds, 2)
            self.tokens_per_s = round(self.tokens / self.seconds, 1)
        self.seconds = round(self.seconds, 3)
        self.stage_seconds = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        self.buckets = [b for b in self.buckets if b["batches"]]
        if len(self.timeline) > 200:  # keep the report small on long runs; keep the last point
            step = len(self.timeline) // 200 + 1
            self.timeline = self.timeline[:-1:step] + self.timeline[-1:]
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


class Progress:
    """One progress line: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, total_docs: int, stream=None, every_s: float = 5.0):
        self.total = total_docs
        self.stream = stream or console()  # the terminal, also when the CLI silences libraries
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.every = every_s if not self.tty else 0.2
        self.docs = self.rows = self.tokens = 0
        self.printed: tuple[int, int] | None = None
        self.quiet_s = 30.0  # longest gap between two lines of a log

    def update(self, docs: int, rows: int, tokens: int) -> list[float]:
        """Set the totals so far; returns the timeline point [seconds, docs, tokens]."""
        self.docs, self.rows, self.tokens = docs, rows, tokens
        now = time.perf_counter()
        point = [round(now - self.start, 3), self.docs, self.tokens]
        self._print(now)
        return point

    def _print(self, now: float) -> None:
        if now - self.last < self.every and self.docs < self.total:
            return
        if not self.tty and (self.docs, self.rows) == self.printed and now - self.last < self.quiet_s:
            return  # a log gets a line when something moved, and a heartbeat while nothing does
        self.last, self.printed = now, (self.docs, self.rows)
        elapsed = max(now - self.start, 1e-9)
        rate = self.docs / elapsed
        eta = f"{(self.total - self.docs) / rate:.0f}s" if rate > 0 else "?"
        line = (
            f"embedded {self.docs}/{self.total} docs ({self.rows} chunks) "
            f"{rate:.1f} docs/s {self.tokens / elapsed:.0f} tok/s ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            if self.docs >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class ProgressCounter:
    """Totals the embed actors report after each window (a zero-CPU Ray actor)."""

    def __init__(self):
        self.docs = self.rows = self.tokens = 0

    def add(self, docs: int, rows: int, tokens: int) -> None:
        self.docs += docs
        self.rows += rows
        self.tokens += tokens

    def totals(self) -> tuple[int, int, int]:
        return self.docs, self.rows, self.tokens
