"""`--keep-columns`: source columns stored with their types, filtered on by `search --where`,
updated without re-embedding when only they change, and one-line errors when they are missing
or do not fit one type."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest

from gpte_ray.cli import _parser, main
from gpte_ray.config import ConfigError, InputConfig, load_config
from gpte_ray.input.preflight import check_first_shard
from gpte_ray.input.sources import ShardError, read_prepared
from gpte_ray.plan.kept import resolve_kept, write_shard_types
from gpte_ray.run.pipeline import run_index
from gpte_ray.store.table import BASE_COLUMNS, META_HASH
from tests.support.files import write_parquet
from tests.support.tables import check_table, killed_before_the_commit

LONG = " ".join(f"word{i} of a long manual page that needs several chunks." for i in range(120))


def _write_jsonl(path, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _corpus(root, docs: list[dict]) -> str:
    """The documents as one Parquet and one JSONL shard (both readers, the same column types)."""
    write_parquet(os.path.join(root, "a.parquet"), docs[:4])
    _write_jsonl(os.path.join(root, "b.jsonl"), docs[4:])
    return str(root)


def _rows(db) -> dict[tuple[str, int], dict]:
    t = lance.dataset(f"{db}/docs.lance").to_table()
    return {(r["doc_id"], r["chunk"]): r for r in t.to_pylist()}


def _search(capsys, db, where: str) -> list[dict]:
    capsys.readouterr()
    assert main(["search", "--db", db, "--table", "docs", "-k", "20", "--where", where, "-v", "manual page"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.ray
def test_kept_columns_filter_search_and_update_without_embedding(ray_session, tmp_path, capsys):
    docs = [{"id": f"d{i}", "text": LONG if i == 1 else f"manual page {i}: how to use tool {i}",
             "page": f"git-{i % 3}.1", "section": i} for i in range(8)]
    db = str(tmp_path / "db")

    def index(keep: str, root: str):
        args = _parser().parse_args(["index", "--keep-columns", keep])
        return run_index(load_config(None, {"input.paths": [root], "output.db": db, "output.table": "docs",
                                            "input.keep_columns": args.keep_columns, "batch.window_rows": 16}))

    first = index("page,section", _corpus(tmp_path / "v1", docs))
    assert first.docs_embedded == 8 and first.counts_add_up
    schema = lance.dataset(f"{db}/docs.lance").schema
    assert (schema.field("page").type, schema.field("section").type) == (pa.string(), pa.int64())
    before = _rows(db)
    assert len([k for k in before if k[0] == "d1"]) > 1  # the long document has several chunks

    hits = _search(capsys, db, "page = 'git-1.1'")
    assert {h["doc_id"] for h in hits} == {"d1", "d4", "d7"}
    assert all(h["page"] == "git-1.1" and h["section"] == int(h["doc_id"][1:]) for h in hits)

    # only the long document's page changes: its rows are copied, not embedded
    docs[1]["page"] = "git-revert.1"
    second = index("page,section", _corpus(tmp_path / "v2", docs))
    assert (second.docs_embedded, second.chunks_embedded, second.metadata_updated, second.unchanged) == (0, 0, 1, 7)
    assert second.committed and second.counts_add_up
    assert second.chunks_copied == len([k for k in before if k[0] == "d1"])
    after = _rows(db)
    check_table(db, "docs", [d["id"] for d in docs], len(before))
    for key, row in after.items():
        assert row["page"] == ("git-revert.1" if key[0] == "d1" else before[key]["page"])
        assert np.array_equal(np.array(row["vector"], np.float32), np.array(before[key]["vector"], np.float32))
        assert (row["text"], row["content_hash"]) == (before[key]["text"], before[key]["content_hash"])
    assert {h["doc_id"] for h in _search(capsys, db, "page = 'git-revert.1'")} == {"d1"}
    assert {h["doc_id"] for h in _search(capsys, db, "page = 'git-1.1'")} == {"d4", "d7"}
    # mistakes in the search flags: one line naming the flag, exit 2
    capsys.readouterr()
    assert main(["search", "--db", db, "--table", "docs", "-v", "--where", "pag = 'x'", "manual"]) == 2
    assert "config error: --where \"pag = 'x'\": Schema error: No field named pag" in capsys.readouterr().err
    assert main(["search", "--db", db, "--table", "docs", "-v", "-k", "0", "manual"]) == 2
    assert "config error: -k: must be >= 1, got 0" in capsys.readouterr().err

    # a different set of kept columns: every document copied into the new schema, none embedded
    third = index("page", str(tmp_path / "v2"))
    assert (third.docs_embedded, third.metadata_updated, third.unchanged) == (0, 8, 0)
    table = lance.dataset(f"{db}/docs.lance")
    assert "section" not in table.schema.names and table.count_rows() == len(before)
    assert all(np.array_equal(np.array(r["vector"], np.float32), np.array(before[k]["vector"], np.float32))
               for k, r in _rows(db).items())
    assert index("page", str(tmp_path / "v2")).committed is False  # then nothing left to do


def test_missing_kept_column_in_a_later_shard_is_one_line_exit_2(tmp_path):
    corpus = tmp_path / "corpus"
    write_parquet(str(corpus / "a.parquet"), [{"id": "a", "text": "has a page", "page": "x"}])  # passes preflight
    bad = _write_jsonl(str(corpus / "b.jsonl"), [{"id": "b", "text": "no page here"}])
    db = tmp_path / "db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "index", "--input", str(corpus), "--db", str(db),
                          "--keep-columns", "page", "--num-cpus", "2"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"gpte-ray: error: input error: {bad}: missing column 'page' "
                                       "(input.keep_columns; no object of the shard has it)"]
    assert out.stdout == "" and not db.exists()


def test_kept_column_checks_before_ray(tmp_path):
    shard = write_parquet(str(tmp_path / "a.parquet"), [{"id": "1", "text": "x", "page": "p"}])
    check_first_shard(shard, InputConfig(keep_columns=["page"]))
    with pytest.raises(ShardError, match=r"missing column 'heading' \(input.keep_columns; the shard has: id, text"):
        check_first_shard(shard, InputConfig(keep_columns=["page", "heading"]))
    # a JSONL field may first appear anywhere in the shard: the reader checks the whole shard
    jsonl = _write_jsonl(str(tmp_path / "b.jsonl"), [{"id": str(i), "text": "x"} for i in range(150)]
                         + [{"id": "150", "text": "x", "page": "p"}])
    check_first_shard(jsonl, InputConfig(keep_columns=["page"]))
    assert [t["page"].to_pylist()[-1] for t in read_prepared(jsonl, 0, InputConfig(keep_columns=["page"]))] == ["p"]
    for name in ("a.b", "a`b"):  # Lance refuses the first, the second breaks search filters
        with pytest.raises(ConfigError, match=r"^config error: input.keep_columns: .* cannot contain"):
            load_config(None, {"input.keep_columns": [name]})
    for name in ("vector", "doc_id", "meta_hash", "_rowid"):
        with pytest.raises(ConfigError, match=f"^config error: input.keep_columns: '{name}' is reserved"):
            load_config(None, {"input.keep_columns": [name]})
    with pytest.raises(ConfigError, match="names a column twice"):
        load_config(None, {"input.keep_columns": ["page", "page"]})
    for name in (*BASE_COLUMNS, META_HASH):  # every column of the table itself
        with pytest.raises(ConfigError, match=f"'{name}' is reserved"):
            load_config(None, {"input.keep_columns": [name]})


def test_kept_types_across_shards(tmp_path):
    shards = [str(tmp_path / f"s{i}.jsonl") for i in range(3)]
    types = str(tmp_path / "types")
    for i, t in enumerate([pa.int64(), pa.float64(), pa.null()]):
        write_shard_types(types, i, pa.schema([("n", t)]), None)
    schema, changed = resolve_kept(types, shards, None, ["n"], None)
    assert schema == pa.schema([("n", pa.float64())]) and not changed  # ints and floats: double
    # the table's type stays while the shards' types fit in it; a type that does not is a new schema
    assert resolve_kept(types, shards, None, ["n"], pa.schema([("n", pa.float64())]))[1] is False
    assert resolve_kept(types, shards, None, ["n"], pa.schema([("n", pa.int64())]))[1] is True
    assert resolve_kept(types, shards, None, [], pa.schema([]))[1] is False
    write_shard_types(types, 2, pa.schema([("n", pa.string())]), None)
    with pytest.raises(ShardError, match=f"input error: {shards[2]}: column 'n' .input.keep_columns. is string "
                                         "here but double"):
        resolve_kept(types, shards, None, ["n"], None)

    # within one JSONL shard: one column, one type, or one clear line
    mixed = _write_jsonl(str(tmp_path / "mixed.jsonl"), [{"id": "1", "text": "a", "n": 1},
                                                          {"id": "2", "text": "b", "n": "two"}])
    with pytest.raises(ShardError, match=f"input error: {mixed}: column 'n' .input.keep_columns. holds values of"):
        list(read_prepared(mixed, 0, InputConfig(keep_columns=["n"])))

    # a JSONL value's hash is its own, whatever type its batch neighbours give the column
    alone = _write_jsonl(str(tmp_path / "alone.jsonl"), [{"id": "1", "text": "a", "n": 1}])
    beside = _write_jsonl(str(tmp_path / "beside.jsonl"), [{"id": "1", "text": "a", "n": 1},
                                                            {"id": "2", "text": "b", "n": 2.5}])
    cfg = InputConfig(keep_columns=["n"])
    hashes = [next(read_prepared(p, 0, cfg))["meta_hash"][0].as_py() for p in (alone, beside)]
    assert hashes[0] == hashes[1]
    # pandas categories (dictionary-encoded) read as their values: one type with plain strings
    cat = str(tmp_path / "cat.parquet")
    pa.parquet.write_table(pa.table({"id": ["1"], "text": ["a"], "p": pa.array(["x"]).dictionary_encode()}), cat)
    assert next(read_prepared(cat, 0, InputConfig(keep_columns=["p"]))).schema.field("p").type == pa.string()


@pytest.mark.ray
def test_copies_are_staged_and_resumed_like_embedded_windows(ray_session, tmp_path, monkeypatch):
    docs = [{"id": f"d{i}", "text": f"page {i} of the manual", "page": "old"} for i in range(3)]
    db = str(tmp_path / "db")
    cfg = load_config(None, {"input.paths": [str(tmp_path / "c")], "output.db": db, "output.table": "docs",
                             "input.keep_columns": ["page"]})
    write_parquet(str(tmp_path / "c" / "a.parquet"), docs)
    run_index(cfg)
    version = lance.dataset(f"{db}/docs.lance").version
    docs[2]["page"] = "new"
    write_parquet(str(tmp_path / "c" / "a.parquet"), docs)
    killed_before_the_commit(monkeypatch, cfg)
    assert lance.dataset(f"{db}/docs.lance").version == version
    assert glob.glob(f"{db}/_gpte_staging/docs/runs/*/*.parquet")  # the copy is staged

    resumed = run_index(cfg)
    # nothing copied again: the staged copy is committed
    assert (resumed.metadata_updated, resumed.chunks_copied, resumed.chunks_resumed, resumed.docs_embedded) == \
        (1, 0, 1, 0)
    assert resumed.committed and not glob.glob(f"{db}/_gpte_staging/docs/runs/*/*.parquet")
    rows = check_table(db, "docs", ["d0", "d1", "d2"], 3)
    assert dict(zip(rows["doc_id"].to_pylist(), rows["page"].to_pylist())) == {"d0": "old", "d1": "old", "d2": "new"}


def test_a_shard_failing_half_way_is_skipped_whole(tmp_path):
    from gpte_ray.run.stages import scan_shard

    # the kept column's type changes after the first batch of 4,096 objects
    half = _write_jsonl(str(tmp_path / "half.jsonl"), [{"id": str(i), "text": "t", "n": i} for i in range(4100)]
                        + [{"id": "x", "text": "t", "n": "a string"}])
    cfg = InputConfig(keep_columns=["n"], skip_bad_shards=True)
    out = pa.concat_tables(scan_shard(pa.table({"shard": [0], "uri": [half]}), cfg))
    assert out.num_rows == 1 and out["row"].to_pylist() == [-1]
    assert out["reason"][0].as_py().startswith(f"bad shard: input error: {half}: column 'n'")


@pytest.mark.ray
def test_new_kept_columns_wait_for_unreadable_shards(ray_session, tmp_path):
    docs = [{"id": f"d{i}", "text": f"page {i} of the manual", "page": "p", "section": i} for i in range(6)]
    corpus = _corpus(tmp_path / "c", docs)
    db = str(tmp_path / "db")
    base = {"input.paths": [corpus], "output.db": db, "output.table": "docs", "input.skip_bad_shards": True}
    assert run_index(load_config(None, {**base, "input.keep_columns": ["page"]})).committed
    version = lance.dataset(f"{db}/docs.lance").version
    os.rename(os.path.join(corpus, "b.jsonl"), os.path.join(corpus, "b.jsonl.gz"))  # not gzip: unreadable
    with pytest.raises(ShardError, match=r"^input error: 1 shard\(s\) could not be read; a new set of kept columns"):
        run_index(load_config(None, {**base, "input.keep_columns": ["page", "section"]}))
    assert lance.dataset(f"{db}/docs.lance").version == version
    assert not glob.glob(f"{db}/_gpte_staging/docs/plans/*")  # a failed run leaves no plan behind


@pytest.mark.ray
def test_a_rerun_with_new_kept_values_does_not_resume_the_old_ones(ray_session, tmp_path, monkeypatch):
    """A run staged a new document with one kept value and died; before the rerun the value
    changed (the text did not). Resuming would commit the old value: the work is not the same."""
    docs = [{"id": f"d{i}", "text": f"page {i} of the manual", "page": "old"} for i in range(3)]
    db = str(tmp_path / "db")
    cfg = load_config(None, {"input.paths": [str(tmp_path / "c")], "output.db": db, "output.table": "docs",
                             "input.keep_columns": ["page"]})
    write_parquet(str(tmp_path / "c" / "a.parquet"), docs)
    killed_before_the_commit(monkeypatch, cfg)
    docs[1]["page"] = "new"
    write_parquet(str(tmp_path / "c" / "a.parquet"), docs)
    report = run_index(cfg)
    assert report.committed and report.chunks_resumed == 0 and report.docs_embedded == 3
    rows = check_table(db, "docs", ["d0", "d1", "d2"], 3)
    assert dict(zip(rows["doc_id"].to_pylist(), rows["page"].to_pylist())) == {"d0": "old", "d1": "new", "d2": "old"}
