"""The command line as a user meets it: help for every flag, and input mistakes caught before Ray."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import typing

import pytest

from gpte_ray.cli import _INDEX_FLAGS, _parser, config_field
from gpte_ray.config import ConfigError, InputConfig, JobConfig
from gpte_ray.input.preflight import check_first_shard, check_template, preflight
from gpte_ray.input.sources import ShardError
from tests.support.files import write_parquet


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["index", "search", "eval", "demo"])
def test_every_flag_has_one_line_of_help_and_its_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings and action.dest == "query":
            continue
        assert action.help, f"{command} {action.option_strings}: no help"
        assert "\n" not in action.help
        assert "default:" in action.help or "(required)" in action.help, f"{command} {action.option_strings}"
    text = parser.format_help()
    assert "%(" not in text  # help strings went through argparse's formatting


def test_index_flags_come_from_the_config_fields():
    actions = {a.dest: a for a in _subparsers()["index"]._actions}
    for flag, key in _INDEX_FLAGS.items():
        info = config_field(key)
        assert info.description.split(";")[0].rstrip(".")[:40] in actions[flag].help
        literal = [a for a in [info.annotation, *typing.get_args(info.annotation)]
                   if typing.get_origin(a) is typing.Literal]
        if literal:
            assert actions[flag].choices == list(typing.get_args(literal[0]))
    assert "(default: 2048)" in actions["window_rows"].help
    assert "(default: ./gpte_db)" in actions["db"].help
    help_text = _subparsers()["search"].format_help()
    assert "(default: 10)" in help_text


def test_template_check():
    check_template(None)
    check_template("{title}\n\n{body}")
    for bad, words in [("{} {text}", "positional field {}"), ("{0}", "positional field {0}"),
                       ("no fields", "names no column"), ("{title", "not a valid template"),
                       ("{a.b}", "plain column names")]:
        with pytest.raises(ConfigError, match="config error: input.template") as e:
            check_template(bad)
        assert words in str(e.value)


def test_first_shard_columns_parquet(tmp_path):
    shard = write_parquet(str(tmp_path / "a.parquet"), [{"id": "1", "text": "x", "page": 3}])
    check_first_shard(shard, InputConfig())
    with pytest.raises(ShardError, match=r"missing column 'body' \(input.text_column; the shard has: id, text, page\)"):
        check_first_shard(shard, InputConfig(text_column="body"))
    with pytest.raises(ShardError, match="missing column 'doc'"):
        check_first_shard(shard, InputConfig(id_column="doc"))
    with pytest.raises(ShardError, match="column 'page' is int64, expected string"):
        check_first_shard(shard, InputConfig(template="{text} {page}"))


def test_first_shard_columns_jsonl(tmp_path):
    rows = [{"id": "0", "body": "first row has no text"}] + [{"id": str(i), "text": "t"} for i in range(1, 5)]
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
    check_first_shard(str(path), InputConfig())  # one row without text is a quarantined row, not a typo
    with pytest.raises(ShardError, match="missing column 'txt'"):
        check_first_shard(str(path), InputConfig(text_column="txt"))
    check_first_shard(str(path), InputConfig(template="{title} {text}"))  # an optional template field
    with pytest.raises(ShardError, match=r"missing column 'title' \(input.template"):
        check_first_shard(str(path), InputConfig(template="{title} {summary}"))


def test_preflight_lists_shards_and_respects_skip_bad_shards(tmp_path):
    write_parquet(str(tmp_path / "c" / "a.parquet"), [{"id": "1", "text": "x"}])
    write_parquet(str(tmp_path / "c" / "b.parquet"), [{"id": "2", "text": "y"}])
    cfg = JobConfig.model_validate({"input": {"paths": [str(tmp_path / "c")]}})
    assert [os.path.basename(s) for s in preflight(cfg)] == ["a.parquet", "b.parquet"]
    bad = JobConfig.model_validate({"input": {"paths": [str(tmp_path / "c")], "text_column": "body"}})
    with pytest.raises(ShardError):
        preflight(bad)
    bad.input.skip_bad_shards = True  # the job quarantines such shards instead
    assert len(preflight(bad)) == 2


def _gpte_ray(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "gpte_ray.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_user_mistakes_are_one_line_exit_2_and_leave_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    write_parquet(str(corpus / "a.parquet"), [{"id": "1", "text": "x"}])
    db = tmp_path / "db"
    cases = [
        (["--text-column", "body"], "input error: ", "missing column 'body'"),
        (["--template", "{} {text}"], "config error: input.template", "positional field {}"),
        (["--report", str(tmp_path / "nope" / "r.json")], "config error: --report", "does not exist"),
        (["--precision", "int4"], "", "invalid choice"),
    ]
    for extra, prefix, words in cases:
        out = _gpte_ray("index", "--input", str(corpus), "--db", str(db), *extra)
        lines = out.stderr.splitlines()
        assert out.returncode == 2, out.stderr
        if prefix:  # argparse's own usage errors print the usage line first
            assert len(lines) == 1 and lines[0].startswith(f"gpte-ray: error: {prefix}"), out.stderr
        assert words in out.stderr and "\x1b[" not in out.stderr
        assert out.stdout == ""
        assert not db.exists()


def test_own_errors_read_as_written_others_carry_their_type():
    from gpte_ray.console import one_line
    from gpte_ray.plan.diff import MassDeleteError
    from gpte_ray.store.lock import TableBusyError

    busy = "table 't' is being written by run abc (host h, pid 1); wait for it to finish"
    assert one_line(TableBusyError(busy + "\nmore")) == busy
    assert one_line(MassDeleteError("refusing to delete 5 of 10 documents")) == "refusing to delete 5 of 10 documents"
    assert one_line(ValueError("\x1b[31mbad\x1b[0m value\n  at line 2")) == "ValueError: bad value"
