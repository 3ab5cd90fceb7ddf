"""What a forward pass becomes in the table, per output kind: post-processing in numpy.

dense: one vector per chunk, normalised, Matryoshka-truncated and quantised (`postprocess`);
multi-vector: one vector per kept token, normalised and truncated the same way; sparse: the
non-zero vocabulary weights, ids ascending. `WindowOutputs` gathers a window's micro-batches
on the device (multi-vector and sparse ones already cut to what is kept) and copies them back
once, in window order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpte_ray.model.quantize import quantize_binary, quantize_int8, truncate_dim

__all__ = ["Embeddings", "WindowOutputs", "postprocess"]


def postprocess(pooled: np.ndarray, spec, calibration: dict | None) -> np.ndarray:
    """Pooled float32 (n, full_dim) -> stored vectors (n, dim) in the table's precision."""
    v = pooled
    if spec.normalize:
        # normalise before truncation too, as sentence-transformers' Normalize module does
        v = truncate_dim(v, None, True)
    v = truncate_dim(v, spec.dim, spec.normalize).astype(np.float32)
    if spec.precision == "float16":
        return v.astype(np.float16)
    if spec.precision == "int8":
        if calibration is None:
            raise ValueError("int8 output needs calibration ranges")
        return quantize_int8(v, np.asarray(calibration["low"]), np.asarray(calibration["high"]))
    if spec.precision == "binary":
        return quantize_binary(v)
    return v


@dataclass
class Embeddings:
    """One window's outputs, rows in window order. Row r of a multi-vector or sparse window
    is values[offsets[r]:offsets[r + 1]] (an Arrow list array's layout)."""

    values: np.ndarray  # dense (n, dim); multi-vector (tokens, dim) float32; sparse (non-zeros,) float32
    offsets: np.ndarray | None = None  # multi-vector, sparse: int32 (n + 1,)
    indices: np.ndarray | None = None  # sparse: int32 vocabulary ids, ascending within a row

    def row(self, r: int):
        """Row r: a vector, a (tokens, dim) array, or (ids, weights)."""
        if self.offsets is None:
            return self.values[r]
        s, e = int(self.offsets[r]), int(self.offsets[r + 1])
        return self.values[s:e] if self.indices is None else (self.indices[s:e], self.values[s:e])


class WindowOutputs:
    """The forward outputs of one window's micro-batches, put back in window order."""

    def __init__(self, spec, n: int):
        self.spec, self.n = spec, n
        self.parts: list = []  # (rows, what each micro-batch keeps, on the device)

    def add(self, rows: np.ndarray, out) -> None:
        """A micro-batch's `Embedder.forward` output for window rows `rows`."""
        import torch

        kind = self.spec.output
        if kind == "multi-vector":
            tokens, keep = out  # (bs, seq_len, dim), (bs, seq_len)
            self.parts.append((rows, keep.sum(dim=1), tokens[keep]))  # kept tokens, row after row
        elif kind == "sparse":
            nz = out.nonzero()  # (non-zeros, 2), row-major: ids ascend within each row
            counts = torch.bincount(nz[:, 0], minlength=out.shape[0])
            self.parts.append((rows, counts, (nz[:, 1].to(torch.int32), out[nz[:, 0], nz[:, 1]])))
        else:
            self.parts.append((rows, None, out))

    def finish(self, calibration: dict | None = None) -> Embeddings:
        """Everything added, copied back and post-processed."""
        import torch

        spec = self.spec
        if spec.output == "dense":
            pooled = np.zeros((self.n, spec.full_dim), dtype=np.float32)
            if self.parts:
                rows = np.concatenate([r for r, _, _ in self.parts])
                pooled[rows] = torch.cat([o for _, _, o in self.parts]).cpu().numpy()
            return Embeddings(postprocess(pooled, spec, calibration))
        counts = np.zeros(self.n, dtype=np.int64)
        for rows, c, _ in self.parts:
            counts[rows] = c.cpu().numpy()
        offsets = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        dest = [_destinations(rows, counts, offsets) for rows, _, _ in self.parts]
        if spec.output == "multi-vector":
            tokens = np.zeros((int(offsets[-1]), spec.full_dim), dtype=np.float32)
            for d, (_, _, t) in zip(dest, self.parts):
                tokens[d] = t.cpu().numpy()
            return Embeddings(postprocess(tokens, spec, None), offsets.astype(np.int32))
        ids = np.zeros(int(offsets[-1]), dtype=np.int32)
        weights = np.zeros(int(offsets[-1]), dtype=np.float32)
        for d, (_, _, (i, w)) in zip(dest, self.parts):
            ids[d], weights[d] = i.cpu().numpy(), w.cpu().numpy()
        return Embeddings(weights, offsets.astype(np.int32), ids)


def _destinations(rows: np.ndarray, counts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Where a micro-batch's flat items (its rows' items, row after row) go in the window's."""
    c = counts[rows]
    seg = np.repeat(np.arange(len(rows)), c)  # each item's row within the micro-batch
    first = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    return offsets[rows][seg] + np.arange(int(c.sum())) - first[seg]
