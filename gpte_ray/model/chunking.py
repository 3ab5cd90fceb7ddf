"""Splitting a long token sequence into overlapping windows. Plain Python."""

from __future__ import annotations

__all__ = ["chunk_windows"]


def chunk_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of at most `size` tokens, consecutive ones sharing `overlap`.

    Every token is covered; a sequence that fits gives the single window (0, n_tokens).
    """
    if size <= 0:
        raise ValueError("chunk size must be positive")
    if n_tokens <= size:
        return [(0, n_tokens)]
    stride = max(1, size - min(overlap, size - 1))
    windows = []
    start = 0
    while True:
        end = min(start + size, n_tokens)
        windows.append((start, end))
        if end == n_tokens:
            return windows
        start += stride
