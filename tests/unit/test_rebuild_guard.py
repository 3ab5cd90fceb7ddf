"""The rebuild guard, without Ray: a changed model setting on a table with rows is refused in
one line (what changed, how many documents, the flag), before a cluster would start."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from gpte_ray.config import ConfigError, load_config
from gpte_ray.model.spec import resolve_model
from gpte_ray.run import pipeline
from gpte_ray.run.rebuild import check_rebuild, fingerprint_change
from gpte_ray.store.table import TableStore, table_schema
from tests.support.files import write_parquet


def test_fingerprint_change_names_each_setting():
    old = {"model_id": "m", "max_length": 256, "dim": 384, "weights_hash": "a" * 64}
    new = {"model_id": "m", "max_length": 512, "dim": 384, "weights_hash": "b" * 64}
    assert fingerprint_change(old, new) == f"max_length 256 -> 512, weights_hash {'a' * 16}… -> {'b' * 16}…"
    assert fingerprint_change(None, new) == "the table records no model fingerprint"


def _table(tmp_path, docs: int = 3) -> tuple[TableStore, str]:
    """A table of `docs` documents (the first with 2 chunks) built with the default model."""
    db = str(tmp_path / "db")
    spec = resolve_model(load_config().model)
    schema = table_schema(spec, True, None)
    n = docs + 1
    vecs = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * spec.dim, np.float32)), spec.dim)
    ids = ["d0", *[f"d{i}" for i in range(docs)]]
    rows = pa.table({"doc_id": ids, "chunk": pa.array([1] + [0] * docs, pa.int32()), "vector": vecs,
                     "text": ["t"] * n, "content_hash": ["h"] * n, "char_start": pa.array([0] * n, pa.int32()),
                     "char_end": pa.array([1] * n, pa.int32())}, schema=schema)
    lance.write_dataset(rows, f"{db}/docs.lance")
    return TableStore(db, "docs"), db


def test_a_changed_setting_is_refused_in_one_line_and_allowed_by_the_flag(tmp_path):
    store, db = _table(tmp_path)
    cfg = load_config(None, {"output.db": db, "model.max_length": 128})
    with pytest.raises(ConfigError) as e:
        check_rebuild(cfg, store, resolve_model(cfg.model))
    msg = str(e.value)
    assert "\n" not in msg and "max_length 256 -> 128" in msg and "(3 in the table)" in msg and "--rebuild" in msg
    allowed = load_config(None, {"output.db": db, "model.max_length": 128, "output.rebuild": True})
    line = check_rebuild(allowed, store, resolve_model(allowed.model))
    assert line.startswith("table 'docs': the model fingerprint changed "
                           "(max_length 256 -> 128, chunk_overlap 32 -> 16)")
    assert line.endswith("(3 in the table) (--rebuild)")
    same = load_config(None, {"output.db": db})
    assert check_rebuild(same, store, resolve_model(same.model)) is None  # nothing changed


def test_the_guard_refuses_before_ray_starts(tmp_path, monkeypatch):
    _, db = _table(tmp_path)
    src = write_parquet(str(tmp_path / "in" / "a.parquet"), [{"id": "d0", "text": "t"}])

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline, "connect_ray", no_ray)
    cfg = load_config(None, {"input.paths": [src], "output.db": db, "model.dim": 128})
    with pytest.raises(ConfigError, match=r"dim 384 -> 128.*--rebuild"):
        pipeline.run_index(cfg)


def test_revision_of_the_packaged_model_is_refused(tmp_path, monkeypatch):
    cfg = load_config(None, {"output.db": str(tmp_path / "db"), "model.revision": "abc"})
    with pytest.raises(ConfigError, match="model.revision .*packaged default"):
        pipeline.start(cfg, None)
