"""`gpte-ray index | search | eval | demo`: the command-line edge, where flags override the config.

Flags that set a config field take their help, default and choices from the field itself
(`gpte_ray.config`), so `--help` cannot drift from the config. Runs are quiet: library output
goes to a log (`gpte_ray.console`), `-v` shows it. Every failure ends as one line on stderr
(secrets scrubbed): exit 2 for the user's input or configuration, 1 otherwise. The run report
is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types
import typing
from typing import Any, Literal

__all__ = ["main"]

# flag -> dotted config key
_INDEX_FLAGS = {
    "input": "input.paths",
    "id_column": "input.id_column",
    "text_column": "input.text_column",
    "template": "input.template",
    "format": "input.format",
    "keep_columns": "input.keep_columns",
    "skip_bad_shards": "input.skip_bad_shards",
    "full_scan": "input.full_scan",
    "model": "model.path",
    "revision": "model.revision",
    "pooling": "model.pooling",
    "max_length": "model.max_length",
    "dim": "model.dim",
    "precision": "model.precision",
    "dtype": "model.dtype",
    "document_prompt": "model.document_prompt",
    "query_prompt": "model.query_prompt",
    "task": "model.task",
    "long_documents": "model.long_documents",
    "trust_remote_code": "model.trust_remote_code",
    "token_budget": "batch.token_budget",
    "window_rows": "batch.window_rows",
    "device": "resources.device",
    "min_actors": "resources.min_actors",
    "max_actors": "resources.max_actors",
    "torch_threads": "resources.torch_threads",
    "cpu_lanes": "resources.cpu_lanes",
    "db": "output.db",
    "table": "output.table",
    "max_delete_fraction": "output.max_delete_fraction",
    "allow_mass_delete": "output.allow_mass_delete",
    "rebuild": "output.rebuild",
}

# list fields given as one comma-separated value (column names have no commas; paths might)
_COMMA_LISTS = {"input.keep_columns"}

_CONFIG_HELP = "job YAML (see configs/example.yaml); flags override its fields (default: none)"
_STORAGE_CONFIG_HELP = "job YAML, for output.storage_options of an s3:// db (default: none)"


# ---- flags from the config's fields -------------------------------------------------------------
def config_field(dotted: str):
    """The pydantic FieldInfo of a dotted config key, e.g. 'batch.window_rows'."""
    from gpte_ray.config import JobConfig

    model: Any = JobConfig
    *parents, name = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def _plain_type(annotation):
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _default_text(info) -> str | None:
    default = info.get_default(call_default_factory=True)
    if default is None or default == []:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def field_help(dotted: str, default: str | None = None) -> str:
    """One line: the field's description and its default (unless the description gives it)."""
    info = config_field(dotted)
    text = (info.description or "").rstrip(".")
    default = default if default is not None else _default_text(info)
    if "default:" not in text:
        text += f" (default: {default if default is not None else 'none'})"
    return text.replace("%", "%%")


def _add_config_flag(parser: argparse.ArgumentParser, flag: str, dotted: str, *names: str,
                     default: str | None = None) -> None:
    """`--flag` for a config field: its type, choices (from a Literal) and help from the field."""
    info = config_field(dotted)
    typ = _plain_type(info.annotation)
    kwargs: dict[str, Any] = {"help": field_help(dotted, default)}
    if typing.get_origin(typ) is Literal:
        kwargs["choices"] = list(typing.get_args(typ))
    elif typ is bool:
        kwargs.update(action="store_true", default=None)  # unset: the config file decides
    elif typing.get_origin(typ) is list and dotted in _COMMA_LISTS:
        kwargs["type"] = _comma_list
    elif typing.get_origin(typ) is list:
        kwargs["nargs"] = "+"
    elif typ in (int, float):
        kwargs["type"] = typ
    parser.add_argument(*(names or (f"--{flag.replace('_', '-')}",)), dest=flag, **kwargs)


def _comma_list(value: str) -> list[str]:
    """'page, heading' -> ['page', 'heading']."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _config_only_help() -> str:
    """The config fields that have no flag (set them in the --config file)."""
    from gpte_ray.config import JobConfig

    flagged = set(_INDEX_FLAGS.values())
    keys = [f"{section}.{name}" for section, info in JobConfig.model_fields.items()
            for name in info.annotation.model_fields if f"{section}.{name}" not in flagged]
    return "only in the config file (--config, see configs/example.yaml): " + ", ".join(keys)


def _unknown_flags(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    """Exit 2 with one line for arguments the command does not take, naming the closest flag."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    word = extra[0].split("=", 1)[0]
    if not word.startswith("-"):
        parser.exit(2, f"gpte-ray {command}: error: unexpected argument {word!r}; see gpte-ray {command} --help\n")
    close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    parser.exit(2, f"gpte-ray {command}: error: unknown flag {word}{hint}; see gpte-ray {command} --help\n")


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and the model libraries' own output on stderr (default: off, kept in a log)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpte-ray", description="Batch text embeddings into LanceDB on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,search,eval,demo,check-model}")

    ix = sub.add_parser("index", help="make a table reflect a corpus (first run or incremental)",
                        description="Make the table reflect the corpus: embed new and changed documents, "
                        "delete vanished ones, skip the rest; prints the run report (JSON) as the last line.")
    ix.epilog = _config_only_help()
    ix.add_argument("--config", help=_CONFIG_HELP)
    for flag, key in _INDEX_FLAGS.items():
        _add_config_flag(ix, flag, key)
    ix.add_argument("--ray-address", default=None,
                    help="cluster to join (default: $RAY_ADDRESS, set by `ray job submit`, else a private local Ray)")
    ix.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)")
    ix.add_argument("--report", help="also write the full JSON run report to this file (default: none)")
    ix.add_argument("--html", help="also write the HTML run report here (default: only beside the table)")
    _verbose_flag(ix)

    se = sub.add_parser("search", help="query a table; prints JSON lines, best first",
                        description="Query a table with the model it was embedded with; prints one JSON line "
                        "per result (doc_id, chunk, score, text), best first.")
    se.add_argument("query", help="the query text, or - to read queries from stdin, one per line "
                    "(each result line then carries its query)")
    _add_config_flag(se, "db", "output.db", default="./gpte_db, or output.db of --config")
    _add_config_flag(se, "table", "output.table", default="docs, or output.table of --config")
    se.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    se.add_argument("--model", help="local folder of the table's model, if its id is not findable offline "
                    "(default: the model the table records)")
    se.add_argument("--where", help="SQL filter on the table's columns, e.g. \"doc_id = 'x'\" (default: none)")
    se.add_argument("--exact", action="store_true", help="exact search, ignoring any vector index (default: off)")
    se.add_argument("--hybrid", action="store_true",
                    help="fuse with a full-text (BM25) ranking by reciprocal rank; scores are then "
                    "rank-fusion scores, not similarities (default: off)")
    se.add_argument("--chunks", action="store_true", help="one result per chunk instead of per document (default: off)")
    se.add_argument("--config", help=_STORAGE_CONFIG_HELP)
    _verbose_flag(se)

    ev = sub.add_parser("eval", help="recall/nDCG/MRR of a table on BEIR-layout queries and qrels",
                        description="Score exact and indexed search of a table on a BEIR-layout retrieval set; "
                        "prints the metrics as one JSON line.")
    _add_config_flag(ev, "db", "output.db", default="./gpte_db, or output.db of --config")
    _add_config_flag(ev, "table", "output.table", default="docs, or output.table of --config")
    ev.add_argument("--queries", required=True, help="queries.jsonl: {\"_id\": ..., \"text\": ...} per line (required)")
    ev.add_argument("--qrels", required=True, help="qrels.tsv with header query-id, corpus-id, score (required)")
    ev.add_argument("-k", type=int, default=10, help="documents per query for recall@k (default: 10)")
    ev.add_argument("--model", help="local folder of the table's model, if its id is not findable offline "
                    "(default: the model the table records)")
    ev.add_argument("--nprobes", type=int, help="IVF partitions probed by the indexed search (default: 64)")
    ev.add_argument("--refine-factor", type=int, help="re-rank k x this many index hits exactly (default: 10)")
    ev.add_argument("--config", help=_STORAGE_CONFIG_HELP)
    _verbose_flag(ev)

    de = sub.add_parser("demo", help="build a docstring corpus offline, index it locally, search it",
                        description="Build a corpus of installed-package docstrings, index it on a local Ray, "
                        "and search it.")
    de.add_argument("--out", default="demo_data", help="folder for the corpus and the LanceDB db (default: demo_data)")
    de.add_argument("--docs", type=int, default=3000, help="documents in the corpus (default: 3000)")
    de.add_argument("--query", default="read a parquet file into a table",
                    help="the query to search with (default: 'read a parquet file into a table')")
    _verbose_flag(de)

    ck = sub.add_parser("check-model", help="embed a few texts through the job and sentence-transformers; compare",
                        description="Embed a handful of texts through the job's own path and, when "
                        "sentence-transformers is installed, through it too; print the resolved settings and the "
                        "largest difference (exit 1 above --tolerance).")
    ck.add_argument("model", nargs="?", help="Hugging Face id or local folder (default: the packaged all-MiniLM-L6-v2)")
    ck.add_argument("--text", action="append", help="a text to embed, repeatable (default: a built-in handful)")
    ck.add_argument("--tolerance", type=float, default=1e-4, help="largest difference allowed (default: 1e-4)")
    for flag in ("revision", "pooling", "max_length", "document_prompt", "query_prompt", "trust_remote_code"):
        _add_config_flag(ck, flag, _INDEX_FLAGS[flag])
    _verbose_flag(ck)
    return p


# ---- commands -----------------------------------------------------------------------------------
def _check_output_file(flag: str, path: str | None) -> None:
    """A report file's folder must exist before the run, not after an hour of embedding."""
    from gpte_ray.config import ConfigError

    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"config error: {flag}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config error: {flag}: {path} is a folder, give a file name")


def _stdout_report(report: dict) -> str:
    """The run report for stdout: everything but the throughput timeline and the trend of
    earlier runs (kept in the files)."""
    return json.dumps({k: v for k, v in report.items() if k not in ("timeline", "trend")})


def _index(args: argparse.Namespace) -> int:
    from gpte_ray.config import load_config
    from gpte_ray.console import console, file_noise_log, noise_log_kept
    from gpte_ray.run.pipeline import run_index
    from gpte_ray.storage import secret_values
    from gpte_ray.store.staging import tidy_after_failure

    overrides = {key: getattr(args, flag) for flag, key in _INDEX_FLAGS.items()}
    cfg = load_config(args.config, overrides)
    args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    _check_output_file("--report", args.report)
    _check_output_file("--html", args.html)
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    existed = None if "://" in cfg.output.db else os.path.isdir(cfg.output.db)  # for tidy_after_failure
    try:
        report = run_index(cfg, ray_address=address, num_cpus=args.num_cpus)
    except BaseException:
        tidy_after_failure(cfg.output.db, cfg.output.table, existed)
        raise
    file_noise_log()  # named below where it stays
    line = report.to_json()
    if args.report:
        with open(args.report, "w") as f:
            f.write(line + "\n")
    if args.html:
        from gpte_ray.report.html import write_html_report

        write_html_report(json.loads(line), args.html)
    if report.report_file:
        print(f"run report: {report.report_file}", file=console())
    if noise_log_kept():
        print(f"library output: {noise_log_kept()}", file=console())
    print(_stdout_report(json.loads(line)), flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gpte_ray.config import ConfigError
    from gpte_ray.console import console
    from gpte_ray.demo.corpus import docstring_docs, write_shards

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"config error: --out: {args.out} is a file; give a folder (made if missing)")
    corpus = os.path.join(args.out, "corpus")
    db = os.path.join(args.out, "db")
    if not os.path.isdir(corpus):
        shards = write_shards(docstring_docs(args.docs), corpus, rows_per_shard=500)
        print(f"wrote {len(shards)} Parquet shards of installed-package docstrings to {corpus}", file=console())
    verbose = ["-v"] if args.verbose else []
    rc = main(["index", "--input", corpus, "--db", db, "--table", "docstrings", *verbose])
    if rc == 0:
        print(f"search: {args.query!r}", file=console())
        rc = main(["search", "--db", db, "--table", "docstrings", "-k", "5", *verbose, args.query])
    return rc


def _search(args: argparse.Namespace) -> int:
    from gpte_ray.config import ConfigError, load_config
    from gpte_ray.query.search import Searcher
    from gpte_ray.storage import lance_options, secret_values

    cfg = load_config(args.config)
    args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    db, table = args.db or cfg.output.db, args.table or cfg.output.table
    if args.query == "-":
        queries = [q.strip() for q in sys.stdin if q.strip()]
    else:
        queries = [args.query]
    if args.k < 1:
        raise ConfigError(f"config error: -k: must be >= 1, got {args.k}")
    searcher = Searcher(db, table, lance_options(cfg.output.storage_options, db), args.model)
    try:
        results = searcher.search_many(queries, args.k, where=args.where, exact=args.exact, hybrid=args.hybrid,
                                       group=not args.chunks) if queries else []
    except ValueError as e:
        if not args.where or "Invalid user input" not in str(e):
            raise
        # Lance's words without its source location: "...Valid fields are ..., /path/scanner.rs:839:33"
        why = re.sub(r",?\s*/\S+\.rs:\d+:\d+.*$", "", str(e).splitlines()[0]).removeprefix("Invalid user input: ")
        raise ConfigError(f"config error: --where {args.where!r}: {why}") from None
    for query, rows in zip(queries, results):
        for row in rows:
            # default=str: kept columns may hold dates, decimals or bytes
            print(json.dumps({"query": query, **row} if args.query == "-" else row, ensure_ascii=False, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gpte_ray.config import load_config
    from gpte_ray.query.evaluate import evaluate
    from gpte_ray.storage import lance_options, secret_values

    cfg = load_config(args.config)
    args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    db, table = args.db or cfg.output.db, args.table or cfg.output.table
    out = evaluate(db, table, args.queries, args.qrels, args.k, model_path=args.model, nprobes=args.nprobes,
                   refine_factor=args.refine_factor, storage_options=lance_options(cfg.output.storage_options, db))
    print(json.dumps(out), flush=True)
    return 0


def _check_model(args: argparse.Namespace) -> int:
    from gpte_ray.config import ModelConfig
    from gpte_ray.model.check import check_model

    fields = {f: getattr(args, f) for f in ("revision", "pooling", "max_length", "document_prompt", "query_prompt")}
    cfg = ModelConfig(path=args.model, trust_remote_code=bool(args.trust_remote_code),
                      **{_INDEX_FLAGS[f].split(".")[1]: v for f, v in fields.items() if v is not None})
    result = check_model(cfg, args.text, args.tolerance)
    for key, value in result["settings"].items():
        print(f"{key:>26}: {value!r}" if isinstance(value, str) else f"{key:>26}: {value}")
    diff = result["largest_difference"]
    print(f"{'reference':>26}: {result['reference'] or 'none (sentence-transformers missing or not its folder)'}")
    if diff is not None:
        print(f"{'largest difference':>26}: {diff:.3g} over {result['texts']} texts as documents and queries "
              f"(tolerance {result['tolerance']:g}): {'ok' if result['ok'] else 'OVER TOLERANCE'}")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def _is_user_error(e: BaseException) -> bool:
    """The user's input or configuration is at fault (exit 2), as opposed to the job or the system."""
    from gpte_ray.config import ConfigError
    from gpte_ray.input.sources import ShardError

    if isinstance(e, (ConfigError, ShardError)):
        return True
    return type(e).__name__ == "MassDeleteError"


def main(argv: list[str] | None = None) -> int:
    from gpte_ray.console import file_noise_log, noise_log_kept, one_line, quiet, say, unwrap
    from gpte_ray.storage import redact, secret_values

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown_flags(parser, args.command, extra)
    args.secrets = secret_values()
    if not args.verbose:
        quiet(args.command)
    try:
        commands = {"index": _index, "search": _search, "demo": _demo, "eval": _eval, "check-model": _check_model}
        return commands[args.command](args)
    except KeyboardInterrupt:
        say("gpte-ray: interrupted")  # on a line of its own, never after the progress line
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI edge: one line, never a bare traceback
        if os.environ.get("GPTE_RAY_DEBUG"):
            import traceback

            say(redact(traceback.format_exc(), args.secrets))
        file_noise_log()
        cause = unwrap(e)
        msg = one_line(cause)
        if not _is_user_error(cause) and noise_log_kept():  # an empty log is removed at exit
            msg += f" (library output: {noise_log_kept()})"
        say(f"gpte-ray: error: {redact(msg, args.secrets)}")
        return 2 if _is_user_error(cause) else 1
    finally:
        file_noise_log()


if __name__ == "__main__":
    sys.exit(main())
