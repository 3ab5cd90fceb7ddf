"""The typed configuration tree of one job run.

A YAML file fills the tree; command-line flags override single fields. Nothing here reads
environment variables: credentials are resolved in `storage.py` at the point of use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

__all__ = [
    "BatchConfig",
    "ConfigError",
    "InputConfig",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "RESERVED_COLUMNS",
    "ReportConfig",
    "ResourceConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


# Names a kept source column may not take: the table's own columns (store.table.table_schema),
# the columns rows carry through the pipeline beside them (input.sources.PREPARED_SCHEMA,
# run.stages.CHUNK_SCHEMA, run.stages.PIN_COLUMN), and the keys of a search result. Names
# starting with "_" are Lance's (_rowid, _distance, _score).
RESERVED_COLUMNS = frozenset({
    "doc_id", "chunk", "n_chunks", "vector", "text", "content_hash", "meta_hash", "char_start", "char_end",
    "shard", "row", "reason", "input_ids", "n_tokens", "prompt_len", "truncated", "source_pin",
    "score", "chunks", "query", "sparse_indices", "sparse_values",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    paths: list[str] = Field(
        default_factory=list,
        description="Shards: files, directories, globs or s3:// URIs (Parquet, JSONL, JSONL.gz).",
    )
    format: Literal["auto", "parquet", "jsonl"] = Field(
        "auto", description="Shard format; auto decides by file extension."
    )
    id_column: str = Field("id", description="Column holding the document id.")
    text_column: str = Field("text", description="Column holding the document text.")
    template: str | None = Field(
        None,
        description='Python format template over several columns, e.g. "{title}\\n\\n{body}"; '
        "replaces text_column; default: none (text_column is the text).",
    )
    keep_columns: list[str] = Field(
        default_factory=list,
        description="Source columns stored on every chunk row of their document, with their types, "
        "for search --where (comma-separated on the command line, e.g. page,heading).",
    )
    skip_bad_shards: bool = Field(
        False, description="Quarantine unreadable shards instead of failing the run."
    )
    full_scan: bool = Field(
        False, description="Read every shard, also those whose fingerprint (size and mtime, or ETag) is "
        "unchanged since the table's last commit (finds edits that kept both).",
    )
    full_scan_every: int = Field(
        7, ge=1, description="Read every shard once in this many runs (1: every run); the others read "
        "only new and changed shards.",
    )
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Object-store options for s3:// and other fsspec inputs (S3: endpoint, region, keys, "
        "profile, anon, requester_pays; other schemes: their fsspec filesystem's arguments).",
    )

    @field_validator("keep_columns")
    @classmethod
    def _kept_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or name.startswith("_") or name in RESERVED_COLUMNS:
                raise ValueError(f"{name!r} is reserved for the table's own columns (reserved: "
                                 f"{', '.join(sorted(RESERVED_COLUMNS))}, names starting with _, and '')")
            if "." in name or "`" in name:  # Lance refuses '.' in a field name; '`' breaks search filters
                raise ValueError(f"{name!r}: a kept column's name cannot contain '.' or '`' (rename it in the source)")
        if len(set(names)) < len(names):
            raise ValueError(f"{names} names a column twice")
        return names


class ModelConfig(_Strict):
    path: str | None = Field(
        None, description="Hugging Face id or local folder; default: the packaged all-MiniLM-L6-v2."
    )
    revision: str | None = Field(
        None, description="Hub revision (commit) to pin; default: none (the local folder or the hub's main)."
    )
    pooling: Literal["cls", "mean", "last-token", "weighted-mean"] | None = Field(
        None, description="Pooling; default: the sentence-transformers config, else mean."
    )
    normalize: bool | None = Field(
        None, description="L2-normalise vectors; default: the model's Normalize module, else true."
    )
    max_length: int | None = Field(
        None, gt=1,
        description="Max tokens per chunk including prompt and special tokens; "
        "default: the model's max_seq_length.",
    )
    dim: int | None = Field(
        None, gt=0,
        description="Matryoshka truncation: keep the first dim values, renormalise; "
        "default: the model's full dimension.",
    )
    document_prompt: str | None = Field(
        None,
        description="Prompt for indexed documents: a named prompt of the model or a template "
        "with {text}, e.g. 'passage: {text}'; default: the model's 'document' or 'passage' prompt, "
        "else none.",
    )
    query_prompt: str | None = Field(
        None,
        description="Prompt for search queries (named prompt or template with {text}); "
        "default: the model's 'query' prompt, else none.",
    )
    task: str | None = Field(None, description="Value for {task} in prompt templates; default: none.")
    include_prompt_in_pooling: bool | None = Field(
        None, description="Whether prompt tokens count in mean pooling; default: the model's."
    )
    padding_side: Literal["left", "right"] | None = Field(
        None, description="Padding side; default: the tokenizer's."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Forward precision; auto = float32 on CPU, float16 on GPU."
    )
    precision: Literal["float32", "float16", "int8", "binary"] = Field(
        "float32", description="Stored vector precision."
    )
    calibration_sample: int = Field(
        1000, gt=0, description="Documents sampled once per table to fix int8 ranges."
    )
    long_documents: Literal["chunk", "truncate"] = Field(
        "chunk", description="Long documents: split into overlapping windows, or truncate."
    )
    chunk_overlap: int | None = Field(
        None, ge=0, description="Tokens shared by consecutive chunks; default min(32, max_length / 8)."
    )
    trust_remote_code: bool = Field(
        False, description="Run code the model ships (a custom architecture); refused unless set."
    )


class BatchConfig(_Strict):
    window_rows: int = Field(
        2048, gt=0,
        description="Rows the embed actor sorts and embeds at once (documents, then their chunks, where "
        "a CPU actor tokenizes them); each window is staged as one fragment (the unit a crashed run "
        "resumes from).",
    )
    token_budget: int | None = Field(
        None, gt=0, description="Max rows x padded length per micro-batch; default: 32768 on GPU, on CPU 1024 per "
        "1-thread lane (8192 for one forward over several threads)."
    )
    max_rows: int = Field(256, gt=0, description="Max rows per micro-batch.")
    min_fill: float = Field(
        0.95, ge=0, le=1,
        description="A row joins a micro-batch only if its length >= min_fill x the batch's longest "
        "(padded attention only: packed micro-batches have no padding).",
    )


class ResourceConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: GPUs if the cluster has any, else CPU."
    )
    min_actors: int = Field(1, ge=1, description="Embed actor pool minimum size.")
    max_actors: int = Field(1, ge=1, description="Embed actor pool maximum size.")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per embed actor on GPU.")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs reserved per embed actor (fractional leaves room for reads)."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="Torch threads in a CPU embed actor; default: the node's CPUs."
    )
    cpu_lanes: int | None = Field(
        None, gt=0,
        description="Micro-batches a CPU embed actor runs side by side, each on torch_threads / cpu_lanes "
        "threads; default: one lane per thread, at most 4. 1: one forward over every thread.",
    )
    fake_gpus: bool = Field(
        False, description="Request GPUs for actor placement but compute on CPU (fake-GPU test clusters)."
    )
    tokenize_cpus: float = Field(
        0.25, gt=0, description="CPUs per tokenize actor (GPU runs; a CPU embed actor tokenizes its own windows)."
    )
    tokenize_actors_per_embed_actor: int = Field(
        2, ge=1,
        description="Most tokenize actors per GPU embed actor; Ray Data starts them as the embed actors "
        "wait for input (the report's cost.embed_input_wait_seconds).",
    )
    read_cpus: float = Field(0.5, gt=0, description="CPUs per read task.")
    one_task_rows: int = Field(
        300_000, gt=0, description="Planning groups up to this many rows in one Ray task, more by a Ray Data "
        "shuffle over the cluster.",
    )

    @model_validator(mode="after")
    def _range(self) -> ResourceConfig:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class OutputConfig(_Strict):
    db: str = Field("./gpte_db", description="LanceDB URI: a local folder or s3://bucket/prefix.")
    table: str = Field(
        "docs", description="Table name: letters, digits, '_', '-', '.', not starting with '.'.",
    )
    store_text: bool = Field(True, description="Store each chunk's text in the table.")
    max_delete_fraction: float = Field(
        0.1, ge=0, le=1, description="Refuse runs that would delete more than this share."
    )
    allow_mass_delete: bool = Field(False, description="Override the mass-deletion guard.")
    rebuild: bool = Field(
        False, description="Allow a run whose model settings differ from the table's to re-embed every "
        "document (refused otherwise, naming what changed).",
    )
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="Object-store options for an s3:// db."
    )
    quarantine: bool = Field(True, description="Write quarantined rows beside the table.")
    max_fragments: int = Field(16, gt=0, description="Compact when the table has more fragments.")
    target_rows_per_fragment: int = Field(1_000_000, gt=0, description="Fragment size after compaction.")
    index_min_rows: int = Field(
        100_000, ge=0, description="Build the vector index once the table has this many rows."
    )
    fts_index: bool = Field(True, description="Keep a full-text index on text (for search --hybrid).")
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ"] = Field("IVF_HNSW_SQ", description="Vector index type.")
    lease_seconds: float = Field(
        120.0, gt=0,
        description="A run holds the table's lease while its heartbeat is younger than this; an older "
        "lease is taken over by the next run (the commit itself is fenced: see README).",
    )
    retention_hours: float = Field(
        168, ge=0, description="Keep old table versions (and run tags) this long, then clean up."
    )


    @field_validator("table")
    @classmethod
    def _table_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}", name):
            raise ValueError(f"{name!r} is not a valid table name: use letters, digits, '_', '-' and '.', "
                             "not starting with '.', at most 128 characters")
        return name


class ReportConfig(_Strict):
    price_per_hour: dict[str, float] = Field(
        default_factory=dict,
        description="Hourly price of one node, by node type (its Ray node group, else its "
        "accelerator type, else cpu/cuda; 'default' for any other), for the report's cost line: "
        "each node is charged from its first embed actor's start to its last window.",
    )


class JobConfig(_Strict):
    input: InputConfig = Field(default_factory=InputConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    resources: ResourceConfig = Field(default_factory=ResourceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"config error: {key}: {msg}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: parent is not a mapping")
    node[parts[-1]] = value


def _relative_to(value: Any, folder: Path, explicit_only: bool = False) -> Any:
    """A local relative path read from a config file, made relative to the file's folder
    (`explicit_only`: only ./ and ../ paths, as a hub id looks relative too)."""
    if not isinstance(value, str) or "://" in value or os.path.isabs(value) or value.startswith("~"):
        return value
    if explicit_only and not value.startswith(("./", "../")):
        return value
    return str(folder / value)


def _resolve_paths(tree: dict[str, Any], folder: Path) -> None:
    """Local paths in a config file name files beside it, wherever the job is started from."""
    inp, out, model = (tree.get(k) if isinstance(tree.get(k), dict) else {} for k in ("input", "output", "model"))
    if isinstance(inp.get("paths"), list):
        inp["paths"] = [_relative_to(p, folder) for p in inp["paths"]]
    if "db" in out:
        out["db"] = _relative_to(out["db"], folder)
    if "path" in model:
        model["path"] = _relative_to(model["path"], folder, explicit_only=True)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Build the config from an optional YAML file plus dotted-key overrides (CLI flags)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config error: cannot read {path}: {e.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {path}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config error: {path}: top level must be a mapping")
        _resolve_paths(tree, Path(path).resolve().parent)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
