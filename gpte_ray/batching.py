"""Length bucketing: sort a window of rows by length, cut it by a token budget. Plain numpy."""

from __future__ import annotations

import numpy as np

__all__ = ["padding_efficiency", "plan_micro_batches"]


def plan_micro_batches(lengths: np.ndarray, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Index arrays, one per micro-batch, covering every row exactly once.

    Rows are sorted by length (stable, longest first so the costliest batch runs first and
    memory peaks early); a batch grows while rows x its longest row <= token_budget and
    rows <= max_rows. A single row longer than the budget still gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])  # sorted descending: the first row is the longest
        rows = max(1, min(max_rows, token_budget // max(longest, 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, computed tokens) for the given batching of `lengths`."""
    lengths = np.asarray(lengths)
    real = int(lengths.sum())
    computed = int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
    return real, computed
