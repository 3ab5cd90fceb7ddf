"""What a commit removes from the table: the rows of documents it replaces or deletes, found by
Lance (through the doc_id index when there is one), and the check that nothing is kept twice.
Nothing here loops over rows in Python: the cost follows the number of documents changed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["fragment_deletions", "kept_twice", "sql_list"]


def sql_list(ids: pa.Array) -> str:
    """'a', 'b''c', ... for a SQL IN list, built by Arrow kernels."""
    quoted = pc.binary_join_element_wise("'", pc.replace_substring(ids, "'", "''"), "'", "")
    return pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(quoted)], pa.int32()), quoted), ", ")[0].as_py()


def fragment_deletions(ds, id_batches, lookup_rows: int = 4096) -> tuple[list[int], list]:
    """(fragment ids to drop, fragments with new deletion files) for doc ids given as Arrow
    batches. Lance finds the rows (through the doc_id index when there is one), so the cost
    follows the number of deletions, not the table; nothing loops over rows in Python."""
    frags, ids = [], []
    for batch in id_batches:
        for i in range(0, len(batch), lookup_rows):
            part = batch.slice(i, lookup_rows)
            found = ds.to_table(columns=["doc_id"], filter=f"doc_id IN ({sql_list(part)})",
                                with_row_address=True)
            # the high 32 bits of a row address are its fragment id
            frags.append(pc.shift_right(found["_rowaddr"], 32).combine_chunks())
            ids.append(found["doc_id"].combine_chunks())
    if not frags:
        return [], []
    hits = pa.table({"fragment": pa.concat_arrays(frags), "doc_id": pa.concat_arrays(ids)})
    if hits.num_rows == 0:
        return [], []
    per_fragment = hits.group_by("fragment").aggregate([("doc_id", "distinct")]).sort_by("fragment")
    removed, updated = [], []
    for frag_id, doc_ids in zip(per_fragment["fragment"].to_pylist(), per_fragment["doc_id_distinct"]):
        meta = ds.get_fragment(frag_id).delete(f"doc_id IN ({sql_list(doc_ids.values)})")
        if meta is None:
            removed.append(frag_id)  # every row of it goes
        else:
            updated.append(meta)
    return removed, updated


def kept_twice(ds, staged_ids, deleted_ids, lookup_rows: int = 4096) -> tuple[str, int] | None:
    """(a document, its rows) that the table at `ds` keeps while the commit adds it again, or
    None: every staged doc id (Arrow batches) must be new to the table or among the deleted
    ones. The last line of defence against a duplicate (doc_id, chunk) key, counted by Lance
    from the staged markers, the plan's deletions and the table (through its doc_id index)."""
    deleted = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in deleted_ids]
    gone = pa.concat_arrays(deleted) if deleted else pa.array([], pa.string())
    for batch in staged_ids:
        ids = batch.filter(pc.invert(pc.is_in(batch, value_set=gone)))
        for i in range(0, len(ids), lookup_rows):
            part = ids.slice(i, lookup_rows)
            found = ds.to_table(columns=["doc_id"], filter=f"doc_id IN ({sql_list(part)})")
            if found.num_rows:
                doc = found["doc_id"][0].as_py()
                return doc, int(pc.sum(pc.equal(found["doc_id"], doc)).as_py())
    return None
