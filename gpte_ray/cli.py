"""`gpte-ray index | search`: the command-line edge, where flags override the config.

Every failure ends as one line on stderr (secrets scrubbed) and a non-zero exit code; the
run report is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]

# flag -> dotted config key
_INDEX_FLAGS = {
    "input": "input.paths",
    "id_column": "input.id_column",
    "text_column": "input.text_column",
    "template": "input.template",
    "format": "input.format",
    "skip_bad_shards": "input.skip_bad_shards",
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
    "token_budget": "batch.token_budget",
    "window_rows": "batch.window_rows",
    "device": "resources.device",
    "min_actors": "resources.min_actors",
    "max_actors": "resources.max_actors",
    "torch_threads": "resources.torch_threads",
    "db": "output.db",
    "table": "output.table",
    "max_delete_fraction": "output.max_delete_fraction",
    "allow_mass_delete": "output.allow_mass_delete",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpte-ray", description="Batch text embeddings into LanceDB on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="make a table reflect a corpus (first run or incremental)")
    ix.add_argument("--config", help="job YAML; flags override its fields")
    ix.add_argument("--input", nargs="+", help="shards: files, directories, globs, s3:// URIs")
    ix.add_argument("--id-column")
    ix.add_argument("--text-column")
    ix.add_argument("--template", help='format template over columns, e.g. "{title}\\n\\n{body}"')
    ix.add_argument("--format", choices=["auto", "parquet", "jsonl"])
    ix.add_argument("--skip-bad-shards", action="store_true", default=None)
    ix.add_argument("--model", help="Hugging Face id or local folder (default: packaged all-MiniLM-L6-v2)")
    ix.add_argument("--revision")
    ix.add_argument("--pooling", choices=["cls", "mean", "last-token", "weighted-mean"])
    ix.add_argument("--max-length", type=int)
    ix.add_argument("--dim", type=int, help="Matryoshka truncation dimension")
    ix.add_argument("--precision", choices=["float32", "float16", "int8", "binary"])
    ix.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    ix.add_argument("--document-prompt")
    ix.add_argument("--query-prompt")
    ix.add_argument("--task")
    ix.add_argument("--long-documents", choices=["chunk", "truncate"])
    ix.add_argument("--token-budget", type=int)
    ix.add_argument("--window-rows", type=int)
    ix.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ix.add_argument("--min-actors", type=int)
    ix.add_argument("--max-actors", type=int)
    ix.add_argument("--torch-threads", type=int)
    ix.add_argument("--db")
    ix.add_argument("--table")
    ix.add_argument("--max-delete-fraction", type=float)
    ix.add_argument("--allow-mass-delete", action="store_true", default=None)
    ix.add_argument("--ray-address", default=None,
                    help="cluster to join; default: $RAY_ADDRESS (set by `ray job submit`), else a local Ray")
    ix.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    ix.add_argument("--report", help="also write the JSON run report to this file")
    ix.add_argument("--html", help="write the HTML run report here (default: beside the table)")

    de = sub.add_parser("demo", help="build a docstring corpus offline, index it locally, search it")
    de.add_argument("--out", default="demo_data", help="folder for the corpus and the LanceDB db")
    de.add_argument("--docs", type=int, default=3000)
    de.add_argument("--query", default="read a parquet file into a table")

    se = sub.add_parser("search", help="query a table; prints JSON lines, best first")
    se.add_argument("query")
    se.add_argument("--db", required=True)
    se.add_argument("--table", required=True)
    se.add_argument("-k", type=int, default=10)
    se.add_argument("--model", help="local folder of the table's model, if not findable by its id")
    se.add_argument("--where", help="SQL filter, e.g. \"doc_id = 'x'\"")
    se.add_argument("--exact", action="store_true", help="exact search, ignoring any vector index")
    se.add_argument("--hybrid", action="store_true", help="fuse with full-text (BM25) search over chunk texts")
    se.add_argument("--chunks", action="store_true", help="one result per chunk instead of per document")
    se.add_argument("--config", help="job YAML (for output.storage_options)")

    from gpte_ray.evaluate import add_eval_parser

    add_eval_parser(sub)
    return p


def _index(args: argparse.Namespace) -> int:
    from gpte_ray.config import load_config
    from gpte_ray.pipeline import run_index
    from gpte_ray.storage import secret_values

    overrides = {key: getattr(args, flag) for flag, key in _INDEX_FLAGS.items()}
    cfg = load_config(args.config, overrides)
    args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    report = run_index(cfg, ray_address=address, num_cpus=args.num_cpus)
    line = report.to_json()
    if args.report:
        with open(args.report, "w") as f:
            f.write(line + "\n")
    if args.html:
        from gpte_ray.html_report import write_html_report

        write_html_report(json.loads(line), args.html)
    if report.report_file:
        print(f"run report: {report.report_file}", file=sys.stderr)
    print(line, flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gpte_ray.corpus import docstring_docs, write_shards

    corpus = os.path.join(args.out, "corpus")
    db = os.path.join(args.out, "db")
    if not os.path.isdir(corpus):
        shards = write_shards(docstring_docs(args.docs), corpus, rows_per_shard=500)
        print(f"wrote {len(shards)} Parquet shards of installed-package docstrings to {corpus}", file=sys.stderr)
    rc = main(["index", "--input", corpus, "--db", db, "--table", "docstrings"])
    if rc == 0:
        print(f"search: {args.query!r}", file=sys.stderr)
        rc = main(["search", "--db", db, "--table", "docstrings", "-k", "5", args.query])
    return rc


def _search(args: argparse.Namespace) -> int:
    from gpte_ray.config import load_config
    from gpte_ray.search import search
    from gpte_ray.storage import lance_options, secret_values

    cfg = load_config(args.config)
    args.secrets += secret_values(cfg.input.storage_options, cfg.output.storage_options)
    opts = lance_options(cfg.output.storage_options, args.db)
    for row in search(args.db, args.table, args.query, args.k, opts, args.model, args.where, args.exact,
                      hybrid=args.hybrid, group=not args.chunks):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    from gpte_ray.storage import redact, secret_values

    args = _parser().parse_args(argv)
    args.secrets = secret_values()
    try:
        from gpte_ray.evaluate import run_eval

        commands = {"index": _index, "search": _search, "demo": _demo, "eval": run_eval}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("gpte-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI edge: one line, never a bare traceback
        if os.environ.get("GPTE_RAY_DEBUG"):
            import traceback

            print(redact(traceback.format_exc(), args.secrets), file=sys.stderr)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not msg.startswith(("config error", "input error")):
            msg = f"{type(e).__name__}: {msg}"
        print(f"gpte-ray: error: {redact(msg, args.secrets)}", file=sys.stderr)
        return 2 if msg.startswith("config error") else 1


if __name__ == "__main__":
    sys.exit(main())
