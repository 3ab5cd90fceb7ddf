"""Stored precisions end to end: int8 ranges fixed per table, binary bits, Matryoshka, search."""

from __future__ import annotations

import json

import lance
import numpy as np
import pytest

from gpte_ray.config import load_config
from gpte_ray.model.quantize import quantize_int8
from gpte_ray.query.search import search
from gpte_ray.run.pipeline import run_index

pytestmark = pytest.mark.ray


@pytest.fixture
def short_docs(varied_docs):
    return [d for d in varied_docs if len(d["text"]) < 600][:80]


def _index(corpus, db, table, **over):
    return run_index(load_config(None, {"input.paths": [corpus], "output.db": db, "output.table": table,
                                        "resources.min_actors": 2, "resources.max_actors": 2,
                                        "resources.cpus_per_actor": 0.5, "batch.window_rows": 16, **over}))


def test_int8_binary_and_matryoshka_tables(ray_session, tmp_path, short_docs, st_model):
    from tests.support.files import write_parquet

    corpus = write_parquet(str(tmp_path / "c" / "p.parquet"), short_docs)
    db = str(tmp_path / "db")
    ref = {d["id"]: v for d, v in zip(short_docs, st_model.encode([d["text"] for d in short_docs]))}

    _index(corpus, db, "int8", **{"model.precision": "int8", "model.calibration_sample": 50})
    ds = lance.dataset(f"{db}/int8.lance")
    cal = json.loads(ds.schema.metadata[b"gpte_ray.calibration"])
    assert len(cal["low"]) == 384 and cal["sample"] == 50
    t = ds.to_table(columns=["doc_id", "vector"])
    codes = np.stack(t["vector"].to_numpy(zero_copy_only=False))
    expected = quantize_int8(np.stack([ref[d] for d in t["doc_id"].to_pylist()]), cal["low"], cal["high"])
    # two actors quantised these with the table's one set of ranges: codes agree with a local
    # quantisation of the reference vectors (a code may flip only where a float sits on a boundary)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int) - expected).max() <= 1
    assert (codes == expected).mean() >= 0.999
    hits = search(db, "int8", short_docs[7]["text"], 3)
    assert hits[0]["doc_id"] == short_docs[7]["id"]

    # a second run on the same table keeps the stored ranges (no per-run recalibration)
    more = write_parquet(str(tmp_path / "c" / "q.parquet"), [{"id": "extra", "title": "", "module": "",
                                                              "text": "an extra document"}])
    run_index(load_config(None, {"input.paths": [corpus, more], "output.db": db, "output.table": "int8",
                                 "model.precision": "int8", "model.calibration_sample": 50}))
    assert json.loads(lance.dataset(f"{db}/int8.lance").schema.metadata[b"gpte_ray.calibration"]) == cal

    _index(corpus, db, "bits", **{"model.precision": "binary"})
    t = lance.dataset(f"{db}/bits.lance").to_table(columns=["doc_id", "vector"])
    bits = np.stack(t["vector"].to_numpy(zero_copy_only=False))
    want = np.packbits(np.stack([ref[d] for d in t["doc_id"].to_pylist()]) > 0, axis=1)
    assert bits.shape == (len(short_docs), 48)
    assert (np.unpackbits(bits, axis=1) == np.unpackbits(want, axis=1)).mean() >= 0.999
    assert search(db, "bits", short_docs[7]["text"], 3)[0]["doc_id"] == short_docs[7]["id"]

    _index(corpus, db, "m64", **{"model.dim": 64, "model.precision": "float16"})
    t = lance.dataset(f"{db}/m64.lance").to_table(columns=["doc_id", "vector"])
    v = np.stack(t["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    full = np.stack([ref[d][:64] for d in t["doc_id"].to_pylist()])
    assert np.abs(v - full / np.linalg.norm(full, axis=1, keepdims=True)).max() < 2e-3
    assert search(db, "m64", short_docs[7]["text"], 3)[0]["doc_id"] == short_docs[7]["id"]
