"""Prepare and diff: every row is accounted for, whatever the input and its order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpte_ray.config import ConfigError, load_config
from gpte_ray.input.prepare import content_hash, prepare_rows
from gpte_ray.plan.diff import MassDeleteError
from tests.support.reference_plan import make_plan

ids = st.one_of(st.none(), st.integers(-5, 50), st.text(max_size=4), st.booleans())
texts = st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=8), st.integers())


@settings(max_examples=300)
@given(st.lists(st.tuples(ids, texts), max_size=60))
def test_prepare_gives_one_verdict_per_row(rows):
    out = prepare_rows([r[0] for r in rows], {"text": [r[1] for r in rows]}, "text", None)
    assert len(out) == len(rows)
    for (doc_id, text, reason), (raw_id, raw_text) in zip(out, rows):
        assert (reason is None) == (text is not None and doc_id is not None)
        if raw_id is None or raw_text is None:
            assert reason is not None
        if reason is None:
            assert text.strip() and isinstance(doc_id, str)


def test_template_and_odd_valid_text():
    out = prepare_rows(["a", "b", "c"], {"title": ["T", None, None], "body": ["B", "only body", None]},
                       "text", "{title}\n\n{body}")
    assert out[0] == ("a", "T\n\nB", None)
    assert out[1] == ("b", "\n\nonly body", None)
    assert out[2][2] == "whitespace-only text"
    assert prepare_rows(["x"], {"text": ["\u200b\u202eemoji 🎉"]}, "text", None)[0][2] is None


scan_rows = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.sampled_from(["t1", "t2"]),
              st.sampled_from([None, None, None, "bad"])),
    max_size=40,
)


@settings(max_examples=300)
@given(scan_rows, st.dictionaries(st.sampled_from(["a", "b", "c", "x", "y"]), st.sampled_from(["t1", "t2"])),
       st.randoms())
def test_plan_accounts_for_every_row_in_any_order(rows, existing, rnd):
    scan = [(i % 3, i, d, content_hash(t), r) for i, (d, t, r) in enumerate(rows)]
    existing = {k: content_hash(v) for k, v in existing.items()}
    shuffled = scan[:]
    rnd.shuffle(shuffled)
    a = make_plan(scan, ["s0", "s1", "s2"], existing, False, 1.0, False)
    b = make_plan(shuffled, ["s0", "s1", "s2"], existing, False, 1.0, False)
    assert a.rows_read == len(rows) == a.new + a.changed + a.unchanged + a.quarantined
    assert (a.embed_docs, a.delete_doc_ids, a.quarantine) == (b.embed_docs, b.delete_doc_ids, b.quarantine)
    kept = {d for (_, _, d, _, r) in scan if r is None}
    assert set(a.embed_docs) | {d for d in kept if existing.get(d) and d not in a.embed_docs} == kept
    assert a.deleted == len(set(existing) - kept)


def test_mass_delete_guard_and_bad_shard_keeps_documents():
    existing = {f"d{i}": "h" for i in range(10)}
    scan = [(0, i, f"d{i}", "h", None) for i in range(5)]
    with pytest.raises(MassDeleteError, match="refusing to delete 5 of 10"):
        make_plan(scan, ["s"], existing, False, 0.1, False)
    assert make_plan(scan, ["s"], existing, False, 0.1, True).deleted == 5
    with_bad = [*scan, (1, -1, None, None, "bad shard: x")]
    plan = make_plan(with_bad, ["s", "t"], existing, False, 0.1, False)
    assert plan.deleted == 0 and plan.bad_shards == 1


@pytest.mark.parametrize("overrides,message", [
    ({"model.poolin": "mean"}, "config error: model.poolin: unknown key"),
    ({"model.pooling": "max"}, "config error: model.pooling: Input should be"),
    ({"resources.min_actors": 3, "resources.max_actors": 2}, "max_actors must be >= min_actors"),
    ({"batch.token_budget": -1}, "config error: batch.token_budget:"),
    ({"output.table": "bad/name"}, "config error: output.table:"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_yaml_and_flag_override(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("model:\n  pooling: cls\n  dim: 128\noutput:\n  table: t1\n")
    cfg = load_config(f, {"output.table": "t2", "model.dim": None})
    assert (cfg.model.pooling, cfg.model.dim, cfg.output.table) == ("cls", 128, "t2")
    secret = load_config(None, {"output.storage_options": {"aws_secret_access_key": "S3CRET"}})
    assert "S3CRET" not in repr(secret) and "S3CRET" not in secret.model_dump_json()
