"""Length bucketing: sort a window of rows by length, cut it by a token budget. Plain numpy."""

from __future__ import annotations

import numpy as np

__all__ = ["padding_efficiency", "plan_micro_batches"]


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
