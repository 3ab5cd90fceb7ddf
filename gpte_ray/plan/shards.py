"""Which shards a run reads, and what the others hold, counted without reading them.

A run compares each shard's fingerprint now (input.pins) with the manifest of the table's last
commit (store.manifest). Shards whose fingerprint is unchanged are skipped: their documents
count as unchanged. New and changed shards are read, and the diff (plan.diff) runs over the
documents they touch only:

- the touched ids: those read now, and those the manifest says the read and vanished shards
  held before;
- every occurrence of a touched id in a skipped shard, from the manifest's rows of that shard
  (a document moving between shards, or duplicated in one that was not read, stays exact);
- the table's rows of the touched ids (a lookup by doc_id at the planned version).

A full scan (no manifest, `--full-scan`, every `input.full_scan_every` runs, a new model or
new input settings) reads every shard and diffs it against the whole table, as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from gpte_ray.config import InputConfig
from gpte_ray.input.pins import Pin, same_fingerprint
from gpte_ray.plan.diff import Carried
from gpte_ray.store.manifest import Manifest, ManifestLayout, find_in_shards, read_shard_rows

__all__ = ["ShardChoice", "carried_all", "changed_in_place", "choose_shards", "input_key", "read_entries",
           "touched"]

# scan rows as plan.diff reads them (run.stages.SCAN_SCHEMA)
_SCAN = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("doc_id", pa.string()),
                   ("content_hash", pa.string()), ("reason", pa.string()), ("meta_hash", pa.string())])


def input_key(cfg: InputConfig) -> str:
    """The input settings that decide what a scan reads from a shard (ids, text, kept values)."""
    what = [cfg.format, cfg.id_column, cfg.text_column, cfg.template, cfg.keep_columns]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


@dataclass
class ShardChoice:
    """The shards of one run: read, skipped (unchanged since the manifest), vanished."""

    full: bool  # every shard is read and diffed against the whole table
    why: str = ""  # why a full scan
    read: list[int] = field(default_factory=list)  # positions in the run's shard list
    skipped: dict[int, dict] = field(default_factory=dict)  # position -> its manifest entry
    vanished: list[dict] = field(default_factory=list)  # manifest entries of shards no longer listed
    before: list[dict] = field(default_factory=list)  # manifest entries of the read shards that had one
    base: Manifest | None = None

    @property
    def quiet(self) -> bool:
        """Nothing to read and nothing vanished: the table stays as it is, no diff to run."""
        return not self.full and not self.read and not self.vanished


def choose_shards(shards: list[str], now: list[Pin], base: Manifest | None, full_why: str) -> ShardChoice:
    """Compare each shard's fingerprint now with `base`; `full_why` (non-empty): read them all."""
    if base is None or full_why:
        return ShardChoice(full=True, why=full_why or "no shard manifest for this table version",
                           read=list(range(len(shards))), base=base)
    held = base.by_uri()
    choice = ShardChoice(full=False, base=base)
    for i, (uri, pin) in enumerate(zip(shards, now)):
        entry = held.pop(uri, None)
        if entry is not None and same_fingerprint(Pin.from_json(entry["pin"]), pin):
            choice.skipped[i] = entry
            continue
        choice.read.append(i)
        if entry is not None:
            choice.before.append(entry)
    choice.vanished = list(held.values())
    return choice


def changed_in_place(choice: ShardChoice, shards: list[str], scanned: dict[int, Pin]) -> list[str]:
    """Shards a full scan read whose fingerprint matched the manifest but whose rows did not:
    edited in place, keeping size and modification time (or ETag)."""
    if choice.base is None:
        return []
    held = choice.base.by_uri()
    out = []
    for i, pin in sorted(scanned.items()):
        entry = held.get(shards[i])
        old = Pin.from_json(entry["pin"]) if entry is not None else None
        if old is not None and same_fingerprint(old, pin) and old.rows != pin.rows:
            out.append(shards[i])
    return out


def read_entries(pins_dir: str, storage_options: dict | None) -> dict[int, dict]:
    """Shard position -> its manifest entry, for every shard the scan read whole (run.stages)."""
    from gpte_ray.storage import read_numbered

    return {k: json.loads(v) for k, v in read_numbered(pins_dir, ".entry", storage_options).items()}


def touched(scan_refs: list, choice: ShardChoice, layout: ManifestLayout, storage_options: dict | None,
            table: tuple[str, int, list[str]]) -> tuple[list, list, Carried]:
    """For an incremental run: (the skipped shards' rows of the touched ids, as scan rows; the
    table's rows of the touched ids; what the untouched rest holds), from one Ray task over
    the scan's blocks (`scan_refs`), the manifest's rows files and the table (uri, version,
    columns)."""
    import ray

    old = [e["rows_key"] for e in choice.vanished + choice.before]
    skipped = [(i, e["rows_key"]) for i, e in sorted(choice.skipped.items())]
    task = ray.remote(num_cpus=0.5, max_retries=3, num_returns=3)(_touched_task)
    rows_ref, table_ref, stats_ref = task.remote(layout, storage_options, table, old, skipped, *scan_refs)
    stats = ray.get(stats_ref)
    return [rows_ref], [table_ref], carried_all(choice, stats["loaded"], stats["held_touched"])


def carried_all(choice: ShardChoice, loaded: int = 0, held_touched: int = 0) -> Carried:
    """What the skipped shards hold, given the rows of touched ids the diff saw among them
    (`loaded`) and the touched ids the corpus held before (`held_touched`): each document only in
    skipped shards is unchanged, its other good rows are duplicates, their bad rows stay bad."""
    entries = choice.skipped.values()
    good = sum(e["rows"] - e["bad"] for e in entries)
    untouched = choice.base.docs - held_touched
    return Carried(unchanged=untouched, existing=untouched, rows_skipped=sum(e["rows"] for e in entries),
                   loaded=loaded, quarantined=(good - loaded - untouched) + sum(e["bad"] for e in entries))


def _touched_task(layout: ManifestLayout, storage_options: dict | None, table: tuple[str, int, list[str]],
                  old_keys: list[str], skipped: list[tuple[int, str]], *scan: pa.Table):
    """In a Ray task: see `touched`. Returns (skipped rows, table rows, counts)."""
    import lance
    import pyarrow.dataset as pads

    fresh = pa.concat_tables([b.select(_SCAN.names).cast(_SCAN) for b in scan] or [_SCAN.empty_table()])
    before = pa.concat_tables(read_shard_rows(layout, old_keys, storage_options)) if old_keys else None
    ids = [_good_ids(fresh)] + ([_good_ids(before)] if before is not None else [])
    touched_ids = pc.unique(pa.chunked_array(ids, pa.string()).combine_chunks())
    found, which = find_in_shards(layout, [k for _, k in skipped], storage_options, touched_ids)
    shard = pc.take(pa.array([p for p, _ in skipped], pa.int32()), which)
    rows = found.append_column("shard", shard).filter(pc.is_null(found["reason"]))  # bad rows stay untouched
    rows = rows.select(_SCAN.names).cast(_SCAN)
    held = [_good_ids(rows)] + ([_good_ids(before)] if before is not None else [])
    held_touched = len(pc.unique(pa.chunked_array(held, pa.string()).combine_chunks()))
    uri, version, columns = table
    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    current = ds.to_table(columns=columns, filter=pads.field("doc_id").isin(touched_ids) & (pads.field("chunk") == 0))
    return rows, current, {"loaded": rows.num_rows, "held_touched": held_touched, "touched": len(touched_ids)}


def _good_ids(rows: pa.Table) -> pa.Array:
    ids = rows.filter(pc.is_null(rows["reason"]))["doc_id"]
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
