"""Turning documents into model inputs: prompt, special tokens, and chunks for long texts.

A text that fits is tokenised exactly as sentence-transformers does (prompt + text in one
call), so its vector matches the reference. A longer one is split into overlapping token
windows whose character spans map back to the text; each window is then tokenised with the
prompt like a document of its own. Nothing is truncated unless the config asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from gpte_ray.model.chunking import chunk_windows
from gpte_ray.model.spec import ModelSpec

__all__ = ["Chunk", "TextTokenizer"]


@dataclass
class Chunk:
    doc_index: int
    chunk: int
    input_ids: list[int]
    char_start: int
    char_end: int
    prompt_len: int  # leading tokens to leave out of mean pooling (0 = keep all)
    truncated: bool


@dataclass
class Encoded:
    """Chunks as columns: token ids flat (`values`, row r = values[offsets[r]:offsets[r + 1]],
    an Arrow list array's layout) and one entry per chunk in every other array."""

    doc_index: np.ndarray  # int64
    chunk: np.ndarray  # int32
    values: np.ndarray  # int32
    offsets: np.ndarray  # int32, len = chunks + 1
    char_start: np.ndarray  # int32
    char_end: np.ndarray  # int32
    prompt_len: np.ndarray  # int32
    truncated: np.ndarray  # bool

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def merge(cls, parts: list[tuple[Encoded, np.ndarray]]) -> Encoded:
        """Encodings of disjoint subsets of the texts (each with its texts' positions) -> one,
        in text order, chunks of a text in their order."""
        doc = np.concatenate([idx[e.doc_index] for e, idx in parts])
        order = np.argsort(doc, kind="stable")  # each part is already in (text, chunk) order
        lengths = np.concatenate([e.lengths for e, _ in parts])[order]
        starts = np.concatenate([e.offsets[:-1].astype(np.int64) + base for (e, _), base in
                                 zip(parts, np.cumsum([0] + [len(e.values) for e, _ in parts[:-1]]))])[order]
        flat = np.concatenate([e.values for e, _ in parts])
        offsets = np.zeros(len(order) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        seg = np.repeat(np.arange(len(order)), lengths)
        values = flat[starts[seg] + np.arange(int(offsets[-1])) - offsets[:-1][seg]]

        def cat(name):
            return np.concatenate([getattr(e, name) for e, _ in parts])[order]

        return cls(doc[order], cat("chunk"), values, offsets, cat("char_start"), cat("char_end"),
                   cat("prompt_len"), cat("truncated"))

    @classmethod
    def from_chunks(cls, chunks: list[Chunk]) -> Encoded:
        def col(name, dtype):
            return np.fromiter((getattr(c, name) for c in chunks), dtype=dtype, count=len(chunks))

        lengths = np.fromiter((len(c.input_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(c.input_ids for c in chunks), dtype=np.int32,
                             count=int(offsets[-1]))
        return cls(col("doc_index", np.int64), col("chunk", np.int32), values, offsets.astype(np.int32),
                   col("char_start", np.int32), col("char_end", np.int32), col("prompt_len", np.int32),
                   col("truncated", np.bool_))


# share of the characters in long texts from which the first pass also returns offsets
LONG_SHARE = 0.1


def _sequence_offsets(enc) -> list[tuple[int, int]]:
    """Character spans of the text's own tokens in an encoding with special tokens: sequence 0,
    one contiguous run (special-token strings inside the text belong to it too)."""
    seq = enc.sequence_ids
    if 0 not in seq:
        return []
    start, end = seq.index(0), len(seq) - seq[::-1].index(0)
    return enc.offsets[start:end]


class TextTokenizer:
    """Tokenises texts for one ModelSpec, as documents or as queries."""

    def __init__(self, spec: ModelSpec):
        from transformers import AutoTokenizer

        self.spec = spec
        self.tok = AutoTokenizer.from_pretrained(spec.local_folder())
        self.tok.model_max_length = 1 << 30  # we check lengths ourselves; silence the warning
        # tokens the template adds around any text: special tokens plus prompt prefix/suffix
        empty = self.tok("", add_special_tokens=True)["input_ids"]
        self._special = len(empty)
        self._long_share = 0.0  # share of the last call's characters in texts too long to fit

    def _prompt(self, role: str) -> tuple[str, str]:
        if role == "query":
            return self.spec.query_prefix, self.spec.query_suffix
        return self.spec.document_prefix, self.spec.document_suffix

    def _prompt_len(self, prefix: str, offsets: list[tuple[int, int]]) -> int:
        """Leading tokens that belong to the prompt (and a BOS/CLS before it)."""
        if not prefix or self.spec.include_prompt:
            return 0
        n = 0
        for _, end in offsets:
            if end > len(prefix):
                break
            n += 1
        return n

    def encode(self, texts: list[str], role: str = "document") -> list[Chunk]:
        """Chunks for every text, in order; each text yields at least one chunk."""
        prefix, suffix = self._prompt(role)
        full = [prefix + t + suffix for t in texts]
        need_offsets = bool(prefix) and not self.spec.include_prompt
        enc = self.tok(full, add_special_tokens=True, return_offsets_mapping=need_offsets)
        max_len = self.spec.max_length
        out: list[Chunk] = []
        for i, ids in enumerate(enc["input_ids"]):
            if len(ids) <= max_len:
                plen = self._prompt_len(prefix, enc["offset_mapping"][i]) if need_offsets else 0
                out.append(Chunk(i, 0, list(ids), 0, len(texts[i]), plen, False))
            elif self.spec.long_documents == "truncate" or role == "query":
                out.append(self._one(i, texts[i], prefix, suffix, 0, 0, len(texts[i]), True))
            else:
                out.extend(self._chunks(i, texts[i], prefix, suffix, len(ids) - self._text_len(texts[i])))
        return out

    def encode_arrays(self, texts: list[str], role: str = "document") -> Encoded:
        """`encode` as columns. When no prompt is left out of pooling, the ids come straight
        from the Rust tokenizer (no masks) into flat arrays; only long texts take the chunk path."""
        prefix, suffix = self._prompt(role)
        if prefix and not self.spec.include_prompt:
            return Encoded.from_chunks(self.encode(texts, role))
        backend = self.tok.backend_tokenizer
        if backend.truncation is not None:  # left set by a truncating call in `_one`
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        full = [prefix + t + suffix for t in texts] if prefix or suffix else texts
        # Without a prompt a text's own tokens are its encoding's sequence 0, so a long text
        # can be chunked from this call's offsets instead of being tokenised again on its own.
        # Offsets cost ~8% over every text; worth it once long texts hold >= LONG_SHARE of the
        # characters (the last call's share decides: the output is the same either way).
        chunking = self.spec.long_documents != "truncate" and role != "query"
        with_offsets = chunking and not (prefix or suffix) and self._long_share >= LONG_SHARE
        call = backend.encode_batch if with_offsets else backend.encode_batch_fast
        encs = call(full, add_special_tokens=True)
        rows = [e.ids for e in encs]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        fits = lengths <= self.spec.max_length
        chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        self._long_share = float(chars[~fits].sum() / max(1, chars.sum()))
        if fits.all():
            return self._whole(rows, lengths, texts)
        # the long texts take the chunking path; the rest stay columnar
        short, long = np.flatnonzero(fits), np.flatnonzero(~fits)
        own = [_sequence_offsets(encs[i]) for i in long] if with_offsets else None
        a = self._whole([rows[i] for i in short], lengths[short], [texts[i] for i in short])
        b = Encoded.from_chunks(self._long([texts[i] for i in long], lengths[long], prefix, suffix, role, own))
        return Encoded.merge([(a, short), (b, long)])

    def _long(self, texts: list[str], full_lengths: np.ndarray, prefix: str, suffix: str,
              role: str, own: list[list[tuple[int, int]]] | None = None) -> list[Chunk]:
        """`encode` for texts that do not fit (no prompt left out of pooling), in batched calls
        to the Rust tokenizer instead of several calls per text; same chunks. `own`: each
        text's own tokens' character spans, where the caller has them."""
        backend = self.tok.backend_tokenizer
        max_len = self.spec.max_length
        if self.spec.long_documents == "truncate" or role == "query":
            spans = [(i, 0, 0, len(t), True) for i, t in enumerate(texts)]
        else:
            if own is None:
                own = [e.offsets for e in backend.encode_batch(texts, add_special_tokens=False)]
            spans = []
            for i, offsets in enumerate(own):  # (n_tokens, 2) character spans of the text's own tokens
                # tokens the template adds; a small margin as re-tokenising can merge at the edges
                size = max(8, max_len - (int(full_lengths[i]) - len(offsets)) - 2)
                for c, (s, e) in enumerate(chunk_windows(len(offsets), size, self.spec.chunk_overlap)):
                    spans.append((i, c, offsets[s][0], offsets[e - 1][1], False))
        pieces = [prefix + texts[i][a:b] + suffix for i, _, a, b, _ in spans]
        backend.enable_truncation(max_len)
        try:
            encs = backend.encode_batch_fast(pieces, add_special_tokens=True)
        finally:
            backend.no_truncation()
        return [Chunk(i, c, e.ids, a, b, 0, trunc) for (i, c, a, b, trunc), e in zip(spans, encs)]

    @staticmethod
    def _whole(rows: list[list[int]], lengths: np.ndarray, texts: list[str]) -> Encoded:
        """One chunk per text, the text whole."""
        n = len(rows)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return Encoded(np.arange(n), np.zeros(n, np.int32), values, offsets, np.zeros(n, np.int32),
                       np.fromiter(map(len, texts), dtype=np.int32, count=n), np.zeros(n, np.int32),
                       np.zeros(n, np.bool_))

    def _text_len(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _one(self, i: int, text: str, prefix: str, suffix: str, chunk: int, start: int, end: int,
             truncated: bool) -> Chunk:
        piece = prefix + text[start:end] + suffix
        enc = self.tok(
            piece,
            add_special_tokens=True,
            truncation=True,
            max_length=self.spec.max_length,
            return_offsets_mapping=bool(prefix) and not self.spec.include_prompt,
        )
        plen = self._prompt_len(prefix, enc["offset_mapping"]) if "offset_mapping" in enc else 0
        return Chunk(i, chunk, list(enc["input_ids"]), start, end, plen, truncated)

    def _chunks(self, i: int, text: str, prefix: str, suffix: str, overhead: int) -> list[Chunk]:
        """Overlapping windows over the text's own tokens, each re-tokenised with the prompt."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]  # (n_tokens, 2) character spans
        # a small margin: re-tokenising a window's text can merge differently at its edges
        size = max(8, self.spec.max_length - overhead - 2)
        chunks = []
        for c, (s, e) in enumerate(chunk_windows(len(offsets), size, self.spec.chunk_overlap)):
            start, end = offsets[s][0], offsets[e - 1][1]
            chunk = self._one(i, text, prefix, suffix, c, start, end, False)
            chunks.append(chunk)
        return chunks

    @staticmethod
    def lengths(chunks: list[Chunk]) -> np.ndarray:
        return np.array([len(c.input_ids) for c in chunks], dtype=np.int64)

