"""The reference diff: what a run must do, from the corpus scan and the table's contents.

Plain Python over ids and hashes, one object per document: the test oracle for
`gpte_ray.plan.diff`, which computes the same plan on the cluster. Duplicate rule: the
first occurrence of a doc_id wins, in (shard path order, row) order; later ones are
quarantined and name the winner. A document whose text is unchanged but whose kept columns'
hash (meta_hash) changed is copied with its new values, not embedded (`copy_docs`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gpte_ray.plan.diff import MassDeleteError

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    rows_read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    metadata_updated: int = 0
    quarantined: int = 0
    deleted: int = 0
    bad_shards: int = 0
    rebuild: bool = False
    copy_all: bool = False
    # doc_id -> (shard, row, content_hash) of every document to embed
    embed_docs: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    # doc_id -> (shard, row, content_hash, meta_hash) of every document to copy with new kept values
    copy_docs: dict[str, tuple[int, int, str, str]] = field(default_factory=dict)
    delete_doc_ids: list[str] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)  # shard, row, doc_id, reason

    def rows_by_shard(self, doc_ids) -> dict[int, list[int]]:
        """Shard -> sorted row positions for the given documents."""
        out: dict[int, list[int]] = {}
        for d in doc_ids:
            shard, row, _ = self.embed_docs[d]
            out.setdefault(shard, []).append(row)
        return {s: sorted(r) for s, r in sorted(out.items())}

    def digest(self) -> str:
        """Identity of the work: same corpus diff -> same digest (used for the run id)."""
        h = hashlib.sha256()
        for doc_id in sorted(self.embed_docs):
            h.update(f"{doc_id}\0{self.embed_docs[doc_id][2]}\n".encode())
        h.update(b"--copies--\n")
        for doc_id in sorted(self.copy_docs):
            h.update(f"{doc_id}\0{self.copy_docs[doc_id][3]}\n".encode())
        h.update(b"--deletes--\n")
        for doc_id in sorted(self.delete_doc_ids):
            h.update(f"{doc_id}\n".encode())
        return h.hexdigest()[:16]


def make_plan(
    scan: list[tuple],
    shards: list[str],
    existing: dict[str, str | tuple[str, str | None]] | None,
    rebuild: bool,
    max_delete_fraction: float,
    allow_mass_delete: bool,
    copy_all: bool = False,
) -> Plan:
    """`scan` rows are (shard, row, doc_id, content_hash, reason[, meta_hash]), in any order;
    `existing` is the table's doc_id -> content_hash or (content_hash, meta_hash) (for a rebuild
    too: the guard compares what the new table holds with what the old one held). With
    `copy_all` (the kept columns change) every document with unchanged text is copied."""
    copy_all = copy_all and not rebuild
    plan = Plan(rows_read=len(scan), rebuild=rebuild, copy_all=copy_all)
    existing = {d: v if isinstance(v, tuple) else (v, None) for d, v in (existing or {}).items()}
    winner: dict[str, tuple[int, int]] = {}
    for shard, row, doc_id, chash, reason, *meta in sorted(scan, key=lambda r: (r[0], r[1])):
        mhash = (meta[0] if meta else None) or ""
        if reason is not None:
            plan.quarantine.append({"shard": shard, "row": row, "doc_id": doc_id, "reason": reason})
            plan.bad_shards += row < 0  # a whole shard skipped (--skip-bad-shards)
            continue
        if doc_id in winner:
            ws, wr = winner[doc_id]
            plan.quarantine.append({
                "shard": shard, "row": row, "doc_id": doc_id,
                "reason": f"duplicate doc_id (kept {shards[ws]} row {wr})",
            })
            continue
        winner[doc_id] = (shard, row)
        old, old_meta = (None, None) if rebuild else existing.get(doc_id, (None, None))  # a rebuild embeds all
        if old == chash:
            if copy_all or (old_meta or "") != mhash:
                plan.metadata_updated += 1
                plan.copy_docs[doc_id] = (shard, row, chash, mhash)
            else:
                plan.unchanged += 1
            continue
        if old is None:
            plan.new += 1
        else:
            plan.changed += 1
        plan.embed_docs[doc_id] = (shard, row, chash)
    plan.quarantined = len(plan.quarantine)
    if rebuild or copy_all:
        # the new table replaces the old one: what it leaves out is lost, readable shard or not
        plan.deleted = len(set(existing) - set(winner))
    else:
        # a document that vanished, or whose row is now bad, leaves the table; but while a
        # shard is unreadable we cannot tell vanished documents from unread ones: keep them
        vanished = set() if plan.bad_shards else set(existing) - set(winner)
        plan.delete_doc_ids = sorted(vanished)
        changed_ids = [d for d in plan.embed_docs if d in existing] + list(plan.copy_docs)
        plan.deleted = len(plan.delete_doc_ids)
        plan.delete_doc_ids += changed_ids  # their old chunks are replaced in the same commit
    if existing and not allow_mass_delete and plan.deleted / len(existing) > max_delete_fraction:
        raise MassDeleteError(
            f"refusing to delete {plan.deleted} of {len(existing)} documents "
            f"({plan.deleted / len(existing):.0%} > output.max_delete_fraction "
            f"{max_delete_fraction:.0%}); is the input complete? "
            "Pass --allow-mass-delete to proceed"
        )
    return plan
