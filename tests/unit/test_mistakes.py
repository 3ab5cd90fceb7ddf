"""A newcomer's mistakes, each answered in one line before Ray starts (issue 26, point 7)."""

from __future__ import annotations

import json

import pytest

from gpte_ray.cli import _parser, main
from gpte_ray.config import ConfigError, InputConfig, load_config
from gpte_ray.input.preflight import check_first_shard
from gpte_ray.input.sources import ShardError
from gpte_ray.query.beir import load_queries
from tests.support.files import write_parquet


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    """Run the CLI in this process (-v: stderr stays pytest's) and return its one stderr line."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exits
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_a_flag_typo_names_the_closest_flag(capsys):
    line = _one_line_exit_2(capsys, ["index", "--max-lenght", "512", "-v"])
    assert line == "gpte-ray index: error: unknown flag --max-lenght (did you mean --max-length?); " \
                   "see gpte-ray index --help"
    line = _one_line_exit_2(capsys, ["search", "--tabel=docs", "query", "-v"])
    assert "unknown flag --tabel (did you mean --table?)" in line


def test_help_says_which_fields_only_the_config_file_sets():
    action = next(a for a in _parser()._actions if a.dest == "command")
    text = " ".join(action.choices["index"].format_help().split())
    assert "only in the config file (--config, see configs/example.yaml):" in text
    listed = text.split("only in the config file")[1]
    assert "batch.max_rows" in listed and "output.lease_seconds" in listed
    assert "batch.window_rows" not in listed  # it has a flag


def test_a_bad_table_name_says_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"output.table": "../docs"})
    assert str(e.value) == ("config error: output.table: '../docs' is not a valid table name: use letters, "
                            "digits, '_', '-' and '.', not starting with '.', at most 128 characters")


def test_relative_paths_in_a_config_file_are_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "job.yaml").write_text(json.dumps({
        "input": {"paths": ["corpus/*.parquet", "s3://b/x/", str(tmp_path / "abs")]},
        "output": {"db": "db"}, "model": {"path": "./models/m"}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("jobs/job.yaml", {"input.paths": None})
    assert cfg.input.paths == [str(folder / "corpus/*.parquet"), "s3://b/x/", str(tmp_path / "abs")]
    assert cfg.output.db == str(folder / "db") and cfg.model.path == str(folder / "models/m")
    hub = folder / "hub.yaml"
    hub.write_text(json.dumps({"model": {"path": "BAAI/bge-small-en-v1.5"}}))
    assert load_config(hub).model.path == "BAAI/bge-small-en-v1.5"  # a hub id is not a path
    assert load_config(hub, {"output.db": "here"}).output.db == "here"  # flags stay the shell's


def test_demo_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    line = _one_line_exit_2(capsys, ["demo", "--out", str(tmp_path / "f"), "-v"])
    assert line == f"gpte-ray: error: config error: --out: {tmp_path / 'f'} is a file; give a folder (made if missing)"


def test_an_unreachable_ray_address_is_one_line_at_once(tmp_path, capsys):
    import ray

    if ray.is_initialized():  # an earlier test's Ray in this process: the run would join it, not dial
        pytest.skip("needs a process where Ray is not started yet (run this module on its own)")
    corpus = write_parquet(str(tmp_path / "c" / "a.parquet"), [{"id": "1", "text": "x"}])
    line = _one_line_exit_2(capsys, ["index", "--input", corpus, "--db", str(tmp_path / "db"),
                                     "--ray-address", "127.0.0.1:1", "-v"])
    assert line.startswith("gpte-ray: error: config error: --ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1")


def test_a_kept_column_a_jsonl_shard_lacks_is_found_before_ray(tmp_path):
    shard = tmp_path / "a.jsonl"
    rows = [{"id": str(i), "text": "t", "page": "p"} for i in range(150)]
    shard.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ShardError) as e:
        check_first_shard(str(shard), InputConfig(keep_columns=["pgae"]))
    assert str(e.value) == (f"input error: {shard}: missing column 'pgae' (input.keep_columns; "
                            "the shard has: id, text, page)")
    late = tmp_path / "b.jsonl"  # a field first seen past the sampled objects is not a typo
    late.write_text("\n".join(json.dumps(r) for r in [*rows, {"id": "x", "text": "t", "title": "T"}]) + "\n")
    check_first_shard(str(late), InputConfig(keep_columns=["title"]))


def test_duplicate_query_ids_are_refused(tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n{"_id": "q1", "text": "c"}\n')
    with pytest.raises(ConfigError, match=r"queries.jsonl:3: query id 'q1' is also on line 1; query ids must be"):
        load_queries(str(queries))
