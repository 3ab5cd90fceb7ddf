"""What a model is, read from its configuration files only: the ModelSpec and fingerprint.

A sentence-transformers folder configures itself (modules.json, pooling, Dense, Normalize,
max_seq_length, named prompts); explicit config fields override it. The driver plans from
those small files and the weights hash, wherever the model lives (the packaged default, a
local folder, the hub, an s3:// folder); the spec names the model's *source*, and every node
fetches the weights itself (`gpte_ray.model.source`). The fingerprint is what the table
records: a table embedded under another fingerprint is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpte_ray.config import ConfigError, ModelConfig
from gpte_ray.model.modules import DenseSpec, StModules, read_modules
from gpte_ray.model.source import (
    LocalFolder,
    ModelSource,
    default_model_path,
    folder_weights_hash,
    model_folder,
    model_source,
)

# default_model_path is re-exported: callers have long imported it from here
__all__ = ["DenseSpec", "ModelSpec", "backbone_class", "default_model_path", "resolve_model", "spec_from_fingerprint"]

_ROBERTA_LIKE = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet"}
_DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"}
# encoder-decoder models embedded by their encoder alone, as sentence-transformers loads them
# (AutoModel would load the decoder too, whose forward needs decoder inputs)
ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "longt5": "LongT5EncoderModel"}
# fields added after tables were first written: left out of the fingerprint at their default,
# so a table written before they existed keeps its fingerprint (and is not rebuilt)
_LATER_FIELDS = {"output": "dense", "sparse_activation": "", "skiplist": (), "skiplist_queries": False,
                 "trust_remote_code": False}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to tokenise and embed, and to tell two embeddings apart.

    `source` says where every node gets the model (`gpte_ray.model.source`): the packaged
    default, a hub id (with `revision`, the commit the driver resolved), an s3:// folder, or an
    absolute folder that every node mounts. `local_folder()` resolves it on the node that calls it.
    """

    source: ModelSource
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
    output: str = "dense"  # dense: one vector per chunk; multi-vector: one per kept token; sparse: vocab weights
    sparse_activation: str = ""  # sparse: relu | log1p_relu before pooling (`pooling` is max | sum)
    skiplist: tuple[str, ...] = ()  # multi-vector: tokens whose vectors documents leave out
    skiplist_queries: bool = False  # multi-vector: queries leave them out too
    trust_remote_code: bool = False  # the model's own code runs (--trust-remote-code)

    @property
    def full_dim(self) -> int:
        """Dimension of the pooled (and projected) vector before Matryoshka truncation (a
        sparse model's: its vocabulary)."""
        if self.output == "sparse":
            return self.dim
        return self.dense[-1].out_features if self.dense else self.hidden_size

    @property
    def positions_from_mask(self) -> bool:
        """Pass position ids computed from the mask (left padding stays exact), except for
        RoBERTa-style models that derive them from the input ids themselves and T5 encoders
        (relative positions: their forward takes none)."""
        return self.model_type not in _ROBERTA_LIKE and self.model_type not in ENCODER_ONLY

    def local_folder(self) -> Path:
        """This node's copy of the model, fetched once per node and checked against
        `weights_hash` (a changed model is a ConfigError)."""
        return model_folder(self.source, self.revision, self.weights_hash)

    def fingerprint(self) -> dict:
        """The table-level identity of these embeddings (no paths, no secrets)."""
        keep = asdict(self)
        keep.pop("source")
        keep["dense"] = [asdict(d) for d in self.dense]  # a list, as it reads back from JSON
        keep["skiplist"] = list(self.skiplist)
        for name, default in _LATER_FIELDS.items():
            if getattr(self, name) == default:
                keep.pop(name)
        return keep

    def fingerprint_digest(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def spec_from_fingerprint(fp: dict, model_path: str | None = None) -> ModelSpec:
    """Rebuild the spec a table was embedded with (for queries), checking the weights match.

    Without `model_path` the model comes from where the fingerprint says: the packaged
    default, the hub id at its pinned revision, or the s3:// folder.
    """
    if model_path is None:
        source = model_source(fp["model_id"], recorded=True)
    else:
        source = model_source(model_path)
    revision = None if isinstance(source, LocalFolder) else fp.get("revision")  # a folder has no commit
    if folder_weights_hash(source.materialize(revision, None)) != fp["weights_hash"]:
        raise ConfigError(
            f"config error: model.path: {model_path or source.name!r} is not the model this table was embedded "
            f"with ({fp['model_id']})"
        )
    fields = {k: v for k, v in fp.items() if k in ModelSpec.__dataclass_fields__}
    fields["dense"] = tuple(DenseSpec(**d) for d in fp["dense"])
    fields["skiplist"] = tuple(fp.get("skiplist", ()))
    fields["revision"] = revision
    return ModelSpec(source=source, **fields)


def _split_prompt(prompt: str | None, named: dict[str, str], task: str | None, key: str) -> tuple[str, str]:
    """(prefix, suffix) around the text for a named prompt, a template with {text}, or a prefix."""
    if not prompt:
        return "", ""
    value = named.get(prompt, prompt)
    unknown = sorted(set(re.findall(r"\{(\w+)\}", value)) - {"text", "task"}) if prompt not in named else []
    if unknown:  # a typo would be embedded as literal text in front of every document
        raise ConfigError(f"config error: model.{key}: unknown field {{{unknown[0]}}} in {prompt!r} "
                          "(a prompt template may use {text} and {task})")
    if "{task}" in value:
        if task is None:
            raise ConfigError(f"config error: model.{key}: the prompt uses {{task}} but model.task is unset")
        value = value.replace("{task}", task)
    if "{text}" in value:
        prefix, _, suffix = value.partition("{text}")
        return prefix, suffix
    return value, ""


def resolve_model(cfg: ModelConfig) -> ModelSpec:
    """Read the model's own files and merge them with explicit settings into a ModelSpec.

    Refuses, in one line naming the module or file, a model this job cannot reproduce exactly."""
    source = model_source(cfg.path)
    model = source.plan(cfg.revision)
    hf = model.json("config.json")
    if not hf:
        raise ConfigError(f"config error: model.path: {cfg.path or model.model_id!r} has no config.json")
    _check_code(hf, cfg.trust_remote_code)
    st_cfg = model.json("config_sentence_transformers.json")
    st = read_modules(model, model.json("modules.json", default=[]), st_cfg.get("model_type"))
    if st.output == "sparse" and st_cfg.get("max_active_dims"):
        raise ConfigError(f"config error: model.path: the model keeps its top {st_cfg['max_active_dims']} weights "
                          "(max_active_dims), which this job does not reproduce")
    tok_cfg = model.json("tokenizer_config.json")
    is_decoder = _is_decoder(hf)
    st_max = st.document_length or _st_max_length(model.json("sentence_bert_config.json"), tok_cfg,
                                                  bool(model.json("modules.json", default=[])))
    max_length = _max_length(cfg, hf, st_max)
    doc_pre, doc_suf, q_pre, q_suf = _prompts(cfg, st_cfg)
    hidden = int(hf.get("hidden_size") or hf.get("d_model") or 0)
    full_dim = int(hf.get("vocab_size") or 0) if st.output == "sparse" else (
        st.dense[-1].out_features if st.dense else hidden)
    dim = _output_dim(cfg, st, st_cfg, full_dim)
    return ModelSpec(
        source=source,
        model_id=model.model_id,
        revision=model.revision,
        weights_hash=model.weights_hash,
        model_type=hf.get("model_type", ""),
        is_decoder=is_decoder,
        pooling=_pooling(cfg, st, is_decoder),
        normalize=cfg.normalize if cfg.normalize is not None else (st.normalize if st.normalize is not None else True),
        max_length=int(max_length),
        hidden_size=hidden,
        dim=dim,
        document_prefix=doc_pre,
        document_suffix=doc_suf,
        query_prefix=q_pre,
        query_suffix=q_suf,
        include_prompt=st.include_prompt if cfg.include_prompt_in_pooling is None else cfg.include_prompt_in_pooling,
        padding_side=cfg.padding_side or tok_cfg.get("padding_side") or ("left" if is_decoder else "right"),
        dtype=cfg.dtype,
        precision=cfg.precision,
        long_documents=cfg.long_documents,
        chunk_overlap=_chunk_overlap(cfg, max_length),
        dense=st.dense,
        output=st.output,
        sparse_activation=st.sparse_activation,
        skiplist=st.skiplist,
        skiplist_queries=st.skiplist_queries,
        trust_remote_code=cfg.trust_remote_code,
    )


def backbone_class(spec: ModelSpec) -> str:
    """The transformers class that loads the backbone, as sentence-transformers loads it."""
    if spec.output == "sparse":
        return "AutoModelForMaskedLM"
    return ENCODER_ONLY.get(spec.model_type, "AutoModel")


def _known_model_type(model_type: str | None) -> bool:
    """Whether transformers ships a module for `model_type`, without importing transformers
    (which imports torch): most model types name their folder under transformers/models."""
    import importlib.util

    found = importlib.util.find_spec("transformers")
    if not model_type or found is None or found.origin is None:
        return False
    return (Path(found.origin).parent / "models" / model_type.replace("-", "_") / "__init__.py").is_file()


def _check_code(hf: dict, trust_remote_code: bool) -> None:
    """Refuse a model whose architecture is code shipped with the model, unless trusted."""
    auto_map = hf.get("auto_map") or {}
    if trust_remote_code:
        return
    if auto_map:
        name, ref = next(iter(auto_map.items()))
        raise ConfigError(f"config error: model.path: the model's config.json maps {name} to its own code "
                          f"({ref}); pass --trust-remote-code to run it")
    if _known_model_type(hf.get("model_type")):
        return
    # the exact list: importing it imports torch (seconds, before Ray starts), so only for
    # model types the quick check above does not settle
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if hf.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"config error: model.path: model_type {hf.get('model_type')!r} is not an architecture "
                          "transformers knows; pass --trust-remote-code if the model ships its code")


def _pooling(cfg: ModelConfig, st: StModules, is_decoder: bool) -> str:
    if st.output != "dense":
        if cfg.pooling is not None:
            raise ConfigError(f"config error: model.pooling: a {st.output} model pools by its own modules")
        return st.pooling or "none"  # sparse: max | sum; multi-vector: one vector per token
    return cfg.pooling or st.pooling or ("last-token" if is_decoder else "mean")


def _output_dim(cfg: ModelConfig, st: StModules, st_cfg: dict, full_dim: int) -> int:
    """The stored dimension: the config's, the model's truncate_dim, else all of it; and
    precisions each output kind can store."""
    if st.output != "dense" and cfg.precision != "float32":
        raise ConfigError(f"config error: model.precision: {cfg.precision} is not supported for a {st.output} "
                          "model (float32 only)")
    if st.output == "sparse" and cfg.dim is not None:
        raise ConfigError("config error: model.dim: a sparse model's dimension is its vocabulary")
    if st.output == "multi-vector" and (cfg.dim or st_cfg.get("truncate_dim")) and not st.normalize:
        raise ConfigError("config error: model.dim: truncating a multi-vector model needs its Normalize module")
    dim = cfg.dim or st_cfg.get("truncate_dim") or full_dim
    if dim > full_dim:
        raise ConfigError(f"config error: model.dim: {dim} is larger than the model's {full_dim}")
    if cfg.precision == "binary" and dim % 8:
        raise ConfigError("config error: model.precision: binary needs a dimension divisible by 8")
    return int(dim)


def _is_decoder(hf: dict) -> bool:
    archs = hf.get("architectures") or []
    return (
        bool(hf.get("is_decoder"))
        or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        or hf.get("model_type", "") in _DECODER_TYPES
    )


def _st_max_length(bert_cfg: dict, tok_cfg: dict, sentence_transformers: bool) -> int | None:
    """The max_seq_length a sentence-transformers model sets, if any."""
    # sentence-transformers < 6 keeps max_seq_length in its own file, >= 6 in the tokenizer's
    # (where a plain tokenizer holds a huge placeholder instead)
    tok_max = tok_cfg.get("model_max_length")
    return bert_cfg.get("max_seq_length") or (
        tok_max if sentence_transformers and (tok_max or 1e9) < 1e6 else None
    )


def _max_length(cfg: ModelConfig, hf: dict, st_max: int | None) -> int:
    """Tokens per chunk: the config's, the model's max_seq_length, else its positions (up to 8192)."""
    max_pos = int(hf.get("max_position_embeddings") or 512)
    max_length = cfg.max_length or st_max or min(max_pos, 8192)
    if hf.get("model_type", "") in _ROBERTA_LIKE:
        max_pos -= 2  # two positions are reserved for padding_idx
    if max_length > max_pos:
        raise ConfigError(
            f"config error: model.max_length: {max_length} exceeds the model's {max_pos} positions"
        )
    return max_length


def _prompts(cfg: ModelConfig, st_cfg: dict) -> tuple[str, str, str, str]:
    """(document prefix, document suffix, query prefix, query suffix): the configured prompts,
    else the model's named ones (config_sentence_transformers.json)."""
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
    return doc_pre, doc_suf, q_pre, q_suf


def _chunk_overlap(cfg: ModelConfig, max_length: int) -> int:
    overlap = cfg.chunk_overlap if cfg.chunk_overlap is not None else min(32, int(max_length) // 8)
    if cfg.long_documents == "chunk" and overlap >= max_length // 2:
        raise ConfigError("config error: model.chunk_overlap: must be below half of max_length")
    return overlap
