"""The rebuild guard: a table is never re-embedded whole by accident.

A run whose model fingerprint differs from the table's embeds every document again: on a real
corpus a typo in `--max-length` costs a full GPU pass, and the next run without the typo a
second one. Such a run is refused, in one line saying what changed and how many documents it
would re-embed, unless `--rebuild` (`output.rebuild`) allows it; then the same line is printed.
The guard runs before Ray starts, and again on the table the run plans on (under its lease).
"""

from __future__ import annotations

import json

from gpte_ray.config import ConfigError, JobConfig
from gpte_ray.model.spec import ModelSpec
from gpte_ray.store.table import TableStore

__all__ = ["check_rebuild", "fingerprint_change"]


def _shown(value) -> str:
    """A fingerprint value for one line: hashes and long values shortened."""
    if value is None:
        return "none"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 40 else text[:16] + "…"


def fingerprint_change(old: dict | None, new: dict) -> str:
    """What differs between two fingerprints, e.g. 'max_length 256 -> 512, dim 384 -> 256'."""
    if not old:
        return "the table records no model fingerprint"
    keys = [*new, *(k for k in old if k not in new)]
    return ", ".join(f"{k} {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in keys if old.get(k) != new.get(k))


def check_rebuild(cfg: JobConfig, store: TableStore, spec: ModelSpec, current=None) -> str | None:
    """The rebuild line if `spec` would rebuild the table (`current`: the table as opened,
    else opened here), None if not. Raises ConfigError unless output.rebuild allows it."""
    current = current if current is not None else store.open()
    if current is None:
        return None
    old, new = store.fingerprint(current), spec.fingerprint()
    if old == new:
        return None
    docs = current.count_rows(filter="chunk = 0")  # one int32 column, not the vectors
    if not docs:
        return None  # nothing to re-embed
    line = (f"table {store.table!r}: the model fingerprint changed ({fingerprint_change(old, new)}); "
            f"this run re-embeds every document ({docs} in the table)")
    if not cfg.output.rebuild:
        raise ConfigError(f"config error: {line}; pass --rebuild (output.rebuild: true) to allow it, "
                          "or keep the table's settings")
    return line + " (--rebuild)"
