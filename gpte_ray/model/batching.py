"""Length bucketing and micro-batch assembly. Plain numpy, no Ray, no torch.

Token ids travel as one flat `values` array plus `offsets` (row r is values[offsets[r]:
offsets[r + 1]], the layout of an Arrow list array), so a micro-batch is gathered into a
padded or packed matrix by index arithmetic, never by a Python loop over its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

__all__ = ["flatten", "gather_packed", "gather_padded", "padding_efficiency", "plan_micro_batches"]


def plan_micro_batches(
    lengths: np.ndarray, token_budget: int, max_rows: int, min_fill: float = 0.9
) -> list[np.ndarray]:
    """Index arrays, one per micro-batch, covering every row exactly once.

    Rows are sorted by length (stable, longest first so the costliest batch runs first and
    memory peaks early). A batch grows while rows x its longest row <= token_budget,
    rows <= max_rows, and the next row is at least `min_fill` x the batch's longest (so no
    row is padded by more than 1 - min_fill). A row longer than the budget runs alone.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        longest = int(sorted_len[start])
        cap = max(1, min(max_rows, token_budget // max(longest, 1)))
        # rows long enough to share this batch's padded length: a prefix of the sorted tail
        fits = int(np.searchsorted(-sorted_len[start:], -min_fill * longest, side="right"))
        end = start + max(1, min(cap, fits))
        batches.append(order[start:end])
        start = end
    return batches


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, computed tokens) for the given batching of `lengths`."""
    lengths = np.asarray(lengths)
    real = int(lengths.sum())
    computed = int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
    return real, computed


def flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token-id lists -> (values, offsets) as an Arrow list array lays them out."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
    return values, offsets


def gather_padded(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int,
                  left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 (len(rows), longest), padded on one side."""
    rows = np.asarray(rows)
    starts = offsets[rows].astype(np.int64)
    lens = offsets[rows + 1].astype(np.int64) - starts  # (bs,)
    longest = max(int(lens.max(initial=0)), 1)
    src = np.broadcast_to(np.arange(longest), (len(rows), longest))  # token index in its row
    if left:
        src = src - (longest - lens)[:, None]
    mask = (src >= 0) & (src < lens[:, None])  # (bs, longest)
    idx = np.where(mask, starts[:, None] + src, 0)
    ids = values.take(idx, mode="clip") if values.size else np.zeros(idx.shape, np.int64)
    ids = np.where(mask, ids, pad_id).astype(np.int64)
    return ids, mask.astype(np.int64)


def gather_packed(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One packed sequence for variable-length attention: (input_ids (T,), position_ids (T,),
    cu_seqlens (bs + 1,) int32), T = the rows' real tokens; no padding at all."""
    rows = np.asarray(rows)
    starts = offsets[rows].astype(np.int64)
    lens = offsets[rows + 1].astype(np.int64) - starts
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    seg = np.repeat(np.arange(len(rows)), lens)  # (T,) row of each token
    positions = np.arange(int(cu[-1])) - cu[:-1][seg]  # restarts at 0 for every row
    ids = values[starts[seg] + positions].astype(np.int64)
    return ids, positions, cu.astype(np.int32)
