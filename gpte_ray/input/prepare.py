"""Prepare: raw column values -> (doc_id, text, content_hash) or a quarantine reason.

Plain Python, no Ray. Valid but unusual text (control or zero-width characters, emoji,
right-to-left or mixed scripts) passes through untouched: only text that carries no
content, or that is not text at all, is quarantined.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from typing import Any

__all__ = ["content_hash", "meta_hashes", "prepare_rows", "template_fields"]


def content_hash(text: str) -> str:
    """Stable hash of a document's prepared text (what the change detection compares)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def meta_hashes(rows: list[dict]) -> list[str]:
    """Stable hash of each row's kept column values, as read ({column: value} dicts): what
    tells a document whose kept values changed but whose text did not."""
    return [hashlib.blake2b(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"),
                            digest_size=16).hexdigest() for r in rows]


def template_fields(template: str) -> list[str]:
    """Column names a str.format template refers to."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, reason): bytes must be valid UTF-8; anything else non-string is refused."""
    if value is None:
        return None, "null text"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"text is not valid UTF-8 (byte {e.start})"
    if not isinstance(value, str):
        return None, f"text is {type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"text is not valid UTF-8 (character {e.start})"
    return value, None


def _as_id(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, "missing id"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"id is not valid UTF-8 (byte {e.start})"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id is {type(value).__name__}, not a string or integer"
    value = str(value)
    try:
        # a lone surrogate (JSON "\ud800", or an invalid byte read with surrogateescape)
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"id is not valid UTF-8 (character {e.start})"
    if not value.strip():
        return None, "empty id"
    return value, None


def prepare_rows(
    ids: Sequence[Any],
    columns: dict[str, Sequence[Any]],
    text_column: str,
    template: str | None,
) -> list[tuple[str | None, str | None, str | None]]:
    """One (doc_id, text, reason) per row; reason is None for a good row."""
    out = []
    fields = template_fields(template) if template else [text_column]
    for i, raw_id in enumerate(ids):
        doc_id, reason = _as_id(raw_id)
        text = None
        if reason is None:
            values = {}
            for f in fields:
                raw = columns[f][i]
                if raw is None and template:
                    values[f] = ""  # a missing optional field in a template renders empty
                    continue
                values[f], reason = _as_text(raw)
                if reason:
                    reason = f"{f}: {reason}" if template else reason
                    break
            if reason is None:
                text = template.format_map(values) if template else values[text_column]
                if not text:
                    reason = "empty text"
                elif text.isspace():
                    reason = "whitespace-only text"
                elif template and not any(values[f] for f in fields):
                    reason = "all template fields empty"
        out.append((doc_id, text if reason is None else None, reason))
    return out
