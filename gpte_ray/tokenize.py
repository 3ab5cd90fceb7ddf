"""Turning documents into model inputs: prompt, special tokens, and chunks for long texts.

A text that fits is tokenised exactly as sentence-transformers does (prompt + text in one
call), so its vector matches the reference. A longer one is split into overlapping token
windows whose character spans map back to the text; each window is then tokenised with the
prompt like a document of its own. Nothing is truncated unless the config asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpte_ray.chunking import chunk_windows
from gpte_ray.spec import ModelSpec

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
