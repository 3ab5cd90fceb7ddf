"""The run report: what one run read, embedded, wrote and skipped, and how fast."""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from gpte_ray.console import console, end_line, left_open
from gpte_ray.report.counts import RunCounts

__all__ = ["Progress", "ProgressCounter", "RunReport", "quarantine_kind"]


@dataclass
class RunReport(RunCounts):
    """One run, as the JSON and HTML reports show it (the counts first, from RunCounts)."""

    run_id: str = ""  # this run's own id (never shared with another run)
    plan_id: str = ""  # the plan's identity: a rerun of the same work has the same one (and resumes it)
    started: str = ""  # UTC, ISO 8601 to the second
    table: str = ""
    model: dict = field(default_factory=dict)  # id, revision, weights hash, dim, precision... (set_model)
    version_before: int | None = None
    version: int | None = None
    committed: bool = False
    source_rows: int | None = None  # rows in the source files, counted apart from reading them (audit.py)
    shards_total: int = 0  # shards the input lists
    shards_read: int = 0  # of which read (new or changed since the table's last commit, or a full scan)
    shards_skipped: int = 0  # of which not read: unchanged, their documents counted as they were
    full_scan: str = ""  # why every shard was read ("" when only new and changed ones were)
    shards_changed_in_place: list[str] = field(default_factory=list)  # edited keeping size and mtime (full scan)
    docs_embedded: int = 0
    chunks_written: int = 0
    chunks_embedded: int = 0  # chunks that went through the model in this run (resumed ones did not)
    chunks_resumed: int = 0
    chunks_copied: int = 0  # rows copied from the table with new kept values (metadata_updated)
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
    docs_read_per_s: float = 0.0  # documents read (rows_read) per second of the whole run
    docs_embedded_per_s: float = 0.0  # documents embedded per second of the embed stage
    tokens_per_s: float = 0.0
    counts_add_up: bool = False
    quarantine_file: str | None = None
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # kind of reason -> rows
    quarantine_examples: list[dict] = field(default_factory=list)  # a few rows of each kind
    report_file: str | None = None
    upkeep: dict = field(default_factory=dict)
    length_histogram: dict = field(default_factory=dict)  # edges (upper bounds) and chunk counts
    buckets: list[dict] = field(default_factory=list)  # micro-batch fill per padded-length bucket
    timeline: list[list[float]] = field(default_factory=list)  # [seconds, docs done, tokens done]
    cost: dict = field(default_factory=dict)  # what the embed actors used and cost (add_embed_actors)
    trend: list[dict] = field(default_factory=list)  # this table's recent runs, oldest first (trend_row)

    def set_model(self, fingerprint: dict) -> None:
        """What the vectors are: the model and the settings a reader needs (from its fingerprint)."""
        keep = ("model_id", "revision", "weights_hash", "dim", "precision", "pooling", "normalize",
                "max_length", "dtype")
        self.model = {k: fingerprint.get(k) for k in keep}

    def set_shards(self, total: int, read: int, skipped: int, full_scan: str) -> None:
        """How many shards the input lists, were read and were skipped unchanged (and why all were read)."""
        self.shards_total, self.shards_read, self.shards_skipped, self.full_scan = total, read, skipped, full_scan

    def add_quarantine(self, rows: list[dict], shards: list[str], examples: int = 3) -> None:
        """Count quarantined rows by kind of reason, keeping the first few of each as examples."""
        for r in rows:
            kind = quarantine_kind(r["reason"])
            self.quarantine_reasons[kind] = self.quarantine_reasons.get(kind, 0) + 1
            if self.quarantine_reasons[kind] <= examples:
                self.quarantine_examples.append({"kind": kind, "source": shards[r["shard"]], "row": r["row"],
                                                 "doc_id": r["doc_id"], "reason": r["reason"]})

    def add_window(self, row: dict, edges: list[int]) -> None:
        """Add one staged window's figures (run.stages.WindowWriter's summary row)."""
        self.chunks_embedded += row["rows"]
        self.embed_nodes[row["node"]] = self.embed_nodes.get(row["node"], 0) + 1
        self.tokens += row["tokens"]
        self.padded_tokens += row["padded_tokens"]
        self.truncated += row["truncated"]
        self.oom_retries += row["oom_retries"]
        if row["rows"]:
            self.min_token_budget = min(self.min_token_budget or row["token_budget"], row["token_budget"])
        self.stage_seconds["embed_compute"] = self.stage_seconds.get("embed_compute", 0.0) + row["embed_seconds"]
        self.add_histograms(edges, row["length_hist"], row["bucket_real"], row["bucket_computed"],
                            row["bucket_batches"])

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

    def add_embed_actors(self, actors: list[dict], accelerators_per_actor: float,
                         price_per_hour: dict[str, float]) -> None:
        """Fold in embed actors' final figures (one dict per actor: `actor_*` summary columns
        and `node`). Accelerator-seconds are the actors' held seconds x accelerators each (0 on
        CPU); with prices, each node costs its span from first actor start to last window."""
        c = self.cost
        for key, col in (("embed_actor_seconds", "actor_held_s"), ("embed_load_seconds", "actor_load_s"),
                         ("embed_forward_seconds", "actor_forward_s"),
                         ("embed_input_wait_seconds", "actor_input_wait_s"), ("embed_cpu_seconds", "actor_cpu_s")):
            c[key] = c.get(key, 0.0) + sum(a[col] for a in actors)
        c["embed_actors"] = c.get("embed_actors", 0) + len(actors)
        c["accelerator_seconds"] = c.get("accelerator_seconds", 0.0) + accelerators_per_actor * sum(
            a["actor_held_s"] for a in actors)
        spans: dict[str, list] = {}
        for a in actors:
            s = spans.setdefault(a["node"], [a["actor_node_type"], a["actor_born"], a["actor_end"]])
            s[1], s[2] = min(s[1], a["actor_born"]), max(s[2], a["actor_end"])
        node_seconds = c.setdefault("node_seconds", {})
        for node_type, born, end in spans.values():
            node_seconds[node_type] = node_seconds.get(node_type, 0.0) + end - born
        if price_per_hour:
            c["price_per_hour"] = dict(price_per_hour)
            unpriced = [t for t in node_seconds if t not in price_per_hour and "default" not in price_per_hour]
            c["unpriced_node_types"] = unpriced
            c["cost"] = sum(secs / 3600 * price_per_hour.get(t, price_per_hour.get("default", 0.0))
                            for t, secs in node_seconds.items())

    def _finish_cost(self) -> None:
        c = self.cost
        if not c:
            return
        busy = c["embed_actor_seconds"] - c["embed_load_seconds"]
        acc = c["accelerator_seconds"]
        derived = {
            # embed actors' time (model load aside) not spent in forward: feeding, writing, waiting
            "outside_forward_share": round(1 - c["embed_forward_seconds"] / busy, 4) if busy > 0 else None,
            "tokens_per_accelerator_second": round(self.tokens / acc, 1) if acc > 0 else None,
        }
        if "cost" in c:
            derived["cost_per_million_tokens"] = round(c["cost"] / self.tokens * 1e6, 6) if self.tokens else None
            derived["cost"] = round(c["cost"], 6)
        for k, v in c.items():
            if isinstance(v, float):
                c[k] = round(v, 3)
        c["node_seconds"] = {k: round(v, 3) for k, v in c["node_seconds"].items()}
        c.update(derived)

    def finish(self) -> RunReport:
        self._finish_cost()
        # every row in the files is read (or in a shard skipped unchanged), and every row is new,
        # changed, unchanged, metadata-updated or quarantined
        accounted = self.new + self.changed + self.unchanged + self.metadata_updated + self.quarantined
        self.counts_add_up = self.source_rows == self.rows_read + self.rows_skipped == accounted
        if self.padded_tokens:
            self.padding_efficiency = round(self.tokens / self.padded_tokens, 4)
        if self.seconds > 0:
            self.docs_read_per_s = round(self.rows_read / self.seconds, 2)
            self.tokens_per_s = round(self.tokens / self.seconds, 1)
        embed_s = self.stage_seconds.get("embed", 0.0)
        if embed_s > 0:
            self.docs_embedded_per_s = round(self.docs_embedded / embed_s, 2)
        self.seconds = round(self.seconds, 3)
        self.stage_seconds = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        self.buckets = [b for b in self.buckets if b["batches"]]
        if len(self.timeline) > 200:  # keep the report small on long runs; keep the last point
            step = len(self.timeline) // 200 + 1
            self.timeline = self.timeline[:-1:step] + self.timeline[-1:]
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


TREND_RUNS = 30  # runs of a table the report's trend shows, this one included


def trend_row(report: dict) -> dict:
    """One run's line in a later report's trend: when, how much, and what it cost."""
    c = report.get("cost") if isinstance(report.get("cost"), dict) else {}
    row = {k: report.get(k) for k in ("started", "run_id", "seconds", "new", "changed", "deleted",
                                      "docs_embedded", "tokens")}
    row.update({k: c.get(k) for k in ("accelerator_seconds", "embed_actor_seconds",
                                      "tokens_per_accelerator_second", "cost", "cost_per_million_tokens")})
    return row


def quarantine_kind(reason: str) -> str:
    """A reason without its particulars: 'text is not valid UTF-8 (byte 5)' -> 'text is not
    valid UTF-8', 'bad shard: input error: a.parquet: ...' -> 'bad shard'."""
    if reason.startswith("bad shard"):
        return "bad shard"
    return reason.split(" (")[0]


class Progress:
    """One progress line: rewritten in place on a terminal, plain lines otherwise.

    Counts are the plan's: documents and chunks staged by an earlier run of the same plan
    (`resumed`) start the line, as the run report counts them. The ETA divides what is left by
    the rate of this run over its last `window_s` seconds or half its time, whichever is longer:
    documents finish in bursts (a long one is done at its last chunk), which move such a rate
    far less than one since the last line, and resumed documents never inflate it.
    """

    def __init__(self, total_docs: int, stream=None, every_s: float = 5.0, resumed: tuple[int, int] = (0, 0),
                 window_s: float = 60.0):
        self.total = total_docs
        self.stream = stream or console()  # the terminal, also when the CLI silences libraries
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.last = 0.0
        self.every = every_s if not self.tty else 0.2
        self.resumed = resumed  # (documents, chunks) staged before this run
        self.docs, self.rows, self.tokens = *resumed, 0
        self.printed: tuple[int, int] | None = None
        self.quiet_s = 30.0  # longest gap between two lines of a log
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque([(self.start, resumed[0])])  # (time, documents)

    def update(self, docs: int, rows: int, tokens: int) -> list[float]:
        """Set this run's totals so far; returns the timeline point [seconds, docs, tokens]."""
        self.docs, self.rows, self.tokens = self.resumed[0] + docs, self.resumed[1] + rows, tokens
        now = time.perf_counter()
        self.samples.append((now, self.docs))
        # the window grows with the run (half of it), so bursts average out on long runs too
        window = max(self.window_s, (now - self.start) / 2)
        while len(self.samples) > 2 and now - self.samples[1][0] >= window:
            self.samples.popleft()  # keep one sample at least a window old
        point = [round(now - self.start, 3), self.docs, self.tokens]
        self._print(now)
        return point

    def rate(self, now: float) -> float:
        """Documents per second over the last window (since the start, before a window has passed)."""
        t0, d0 = self.samples[0]
        return (self.docs - d0) / max(now - t0, 1e-9)

    def _print(self, now: float) -> None:
        if now - self.last < self.every and self.docs < self.total:
            return
        if not self.tty and (self.docs, self.rows) == self.printed and now - self.last < self.quiet_s:
            return  # a log gets a line when something moved, and a heartbeat while nothing does
        self.last, self.printed = now, (self.docs, self.rows)
        elapsed = max(now - self.start, 1e-9)
        rate = self.rate(now)
        eta = f"{(self.total - self.docs) / rate:.0f}s" if rate > 0 else "?"
        line = (
            f"embedded {self.docs}/{self.total} docs ({self.rows} chunks) "
            f"{rate:.1f} docs/s {self.tokens / elapsed:.0f} tok/s ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            left_open(self.stream)  # a message printed meanwhile starts a line of its own
            if self.docs >= self.total:
                end_line(self.stream)
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
