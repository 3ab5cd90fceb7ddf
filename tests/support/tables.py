"""The check every end-to-end test makes of a table the job wrote."""

from __future__ import annotations

from collections.abc import Iterable


def check_table(db: str, table: str = "docs", doc_ids: Iterable[str] | None = None,
                chunks_written: int | None = None, storage_options: dict | None = None):
    """Each (doc_id, chunk) once; exactly the expected documents; as many rows as the run wrote.

    Returns the table (pyarrow) for further checks.
    """
    import lancedb

    kwargs = {"storage_options": storage_options} if storage_options else {}
    t = lancedb.connect(db, **kwargs).open_table(table).to_arrow()
    keys = list(zip(t["doc_id"].to_pylist(), t["chunk"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys), "a (doc_id, chunk) is stored twice"
    if doc_ids is not None:
        assert {d for d, _ in keys} == set(doc_ids)
    if chunks_written is not None:
        assert len(keys) == chunks_written
    return t


def killed_before_the_commit(monkeypatch, cfg, exc: type[BaseException] = RuntimeError) -> None:
    """A run that stages its work and dies just before committing it (`exc`: KeyboardInterrupt
    for a Ctrl-C)."""
    import pytest

    from gpte_ray.run.pipeline import run_index
    from gpte_ray.store.table import TableStore

    def die(*args, **kwargs):
        raise exc("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(TableStore, "commit", die)
        with pytest.raises(exc, match="killed before the commit"):
            run_index(cfg)
