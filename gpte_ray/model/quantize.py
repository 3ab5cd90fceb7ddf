"""Post-processing of pooled vectors: normalisation, Matryoshka truncation, quantisation.

Plain numpy. int8 uses fixed per-dimension ranges computed once per table, so every
worker and every batch maps the same float to the same code.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "calibrate_int8",
    "l2_normalize",
    "quantize_binary",
    "quantize_int8",
    "truncate_dim",
]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def truncate_dim(v: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka: keep the first `dim` values, then renormalise if the model normalises."""
    if dim is not None and dim < v.shape[1]:
        v = v[:, :dim]
    return l2_normalize(v) if normalize else v


def calibrate_int8(sample: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-dimension (low, high) ranges from a sample of float vectors."""
    low = np.percentile(sample, 0.5, axis=0)
    high = np.percentile(sample, 99.5, axis=0)
    high = np.where(high > low, high, low + 1e-6)
    return low.astype(float).tolist(), high.astype(float).tolist()


def quantize_int8(v: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map [low, high] per dimension linearly onto [-128, 127], clipping outside."""
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    scaled = (v.astype(np.float64) - low) / (high - low)  # 0..1 inside the range
    codes = np.floor(scaled * 255.0 + 0.5) - 128.0
    return np.clip(codes, -128, 127).astype(np.int8)


def quantize_binary(v: np.ndarray) -> np.ndarray:
    """One bit per dimension (1 where the value is > 0), packed big-endian into uint8."""
    return np.packbits(v > 0, axis=1)
