"""A sentence-transformers folder's modules.json, read whole: what the model computes after
its transformer, and the output kind it makes (dense, multi-vector or sparse).

Every module is checked against what the job reproduces exactly; anything else (a module
type it does not implement, a pooling mode, an activation, a Dense on a residual, query
expansion, lower-casing) is refused here, on the driver, in one line naming the module: a
table of vectors the model does not compute is the worst outcome this job has.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from gpte_ray.config import ConfigError

__all__ = ["OUTPUT_KINDS", "DenseSpec", "StModules", "read_modules"]

OUTPUT_KINDS = ("dense", "multi-vector", "sparse")
# Dense activations by the class name sentence-transformers saves (torch.nn.modules.*.<Name>)
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")
_POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last-token", "last_token": "last-token",
                  "weightedmean": "weighted-mean", "weighted_mean": "weighted-mean"}
# what a Transformer module's task puts in token_embeddings: hidden states, or MLM logits
_TASK_OUTPUT = {"feature-extraction": "last_hidden_state", "fill-mask": "logits"}


@dataclass(frozen=True)
class DenseSpec:
    """A sentence-transformers Dense projection (after pooling, or on every token)."""

    path: str  # relative to the model folder
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class StModules:
    """What a sentence-transformers modules.json puts after the transformer (None: not said)."""

    output: str = "dense"
    transformer_task: str = "feature-extraction"
    pooling: str | None = None  # dense: cls | mean | ...; sparse: max | sum (SpladePooling)
    include_prompt: bool = True
    normalize: bool | None = None
    dense: tuple[DenseSpec, ...] = ()
    sparse_activation: str = ""  # SpladePooling: relu | log1p_relu
    skiplist: tuple[str, ...] = ()  # MultiVectorMask: tokens dropped from documents' vectors
    skiplist_queries: bool = False  # ... and from queries'
    document_length: int | None = None  # a multi-vector Transformer's per-task length


def _refuse(i: int, m: dict, why: str) -> ConfigError:
    return ConfigError(f"config error: model.path: module {i} ({m.get('type')}, {m.get('path') or '.'}) {why}; "
                       "refusing rather than writing vectors the model does not compute")


def _kind(m: dict) -> str | None:
    """The class name of a sentence-transformers module; None for code from anywhere else."""
    typ = str(m.get("type", ""))
    return typ.rsplit(".", 1)[-1] if typ.startswith("sentence_transformers.") else None


def read_modules(model, modules, st_model_type: str | None = None) -> StModules:
    """The modules of `modules` (modules.json of `model`, a PlannedModel) as one StModules."""
    if not isinstance(modules, list) or not modules:
        if st_model_type in ("MultiVectorEncoder", "SparseEncoder", "CrossEncoder"):
            raise ConfigError(f"config error: model.path: a {st_model_type} folder without modules.json is not "
                              "supported")
        return StModules()
    found: dict = {"dense": [], "kinds": []}
    for i, m in enumerate(modules):
        kind = _kind(m)
        cfg = model.json(posixpath.normpath(posixpath.join(m.get("path") or ".", "config.json")))
        reader = _READERS.get(kind or "")
        if reader is None:
            raise _refuse(i, m, "is not a module this job implements")
        if i == 0 and kind not in ("Transformer", "MLMTransformer"):
            raise _refuse(i, m, "comes first where a Transformer must")
        if i > 0 and kind in ("Transformer", "MLMTransformer"):
            raise _refuse(i, m, "is a second Transformer")
        reader(model, i, m, cfg, found)
        found["kinds"].append(kind)
    return _assemble(found, modules, st_model_type)


def _transformer(model, i, m, cfg, found) -> None:
    st = model.json(posixpath.normpath(posixpath.join(m.get("path") or ".", "sentence_bert_config.json")))
    task = st.get("transformer_task") or ("fill-mask" if _kind(m) == "MLMTransformer" else "feature-extraction")
    if task not in _TASK_OUTPUT:
        raise _refuse(i, m, f"has transformer_task {task!r}")
    for key in ("query_expansion", "query_length"):
        if st.get(key) is not None:
            raise _refuse(i, m, f"sets {key}, which this job does not reproduce for queries")
    if st.get("do_lower_case"):
        raise _refuse(i, m, "lower-cases its input (do_lower_case)")
    if st.get("processing_kwargs"):
        raise _refuse(i, m, f"sets processing_kwargs {sorted(st['processing_kwargs'])}")
    text = (st.get("modality_config") or {}).get("text") or {}
    if text and (text.get("method", "forward") != "forward" or
                 text.get("method_output_name") != _TASK_OUTPUT[task]):
        raise _refuse(i, m, f"reads {text.get('method')}().{text.get('method_output_name')} for text")
    if st.get("module_output_name", "token_embeddings") != "token_embeddings":
        raise _refuse(i, m, f"writes {st['module_output_name']!r}")
    found["task"] = task
    found["document_length"] = st.get("document_length")


def _pooling(model, i, m, cfg, found) -> None:
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6 names the mode directly
    if isinstance(mode, str):
        pooling = _POOLING_NAMES.get(mode)
    elif cfg.get("pooling_mode_max_tokens") or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        pooling = None
    elif cfg.get("pooling_mode_lasttoken"):
        pooling = "last-token"
    elif cfg.get("pooling_mode_weightedmean_tokens"):
        pooling = "weighted-mean"
    elif cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    else:
        pooling = "mean"
    if pooling is None:
        raise _refuse(i, m, f"pools by {mode or 'max or mean_sqrt_len'}, a pooling mode this job lacks")
    found["pooling"] = pooling
    found["include_prompt"] = cfg.get("include_prompt", True)


def _dense(model, i, m, cfg, found) -> None:
    activation = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in ACTIVATIONS:
        raise _refuse(i, m, f"uses activation {activation!r}")
    if cfg.get("use_residual"):
        raise _refuse(i, m, "adds a residual connection")
    src = cfg.get("module_input_name", "sentence_embedding")
    if cfg.get("module_output_name", src) != src:
        raise _refuse(i, m, "writes to another feature than it reads")
    found.setdefault("dense_on", set()).add(src)
    found["dense"].append(DenseSpec(path=posixpath.normpath(m.get("path") or "."),
                                    in_features=int(cfg["in_features"]), out_features=int(cfg["out_features"]),
                                    bias=bool(cfg.get("bias", True)), activation=activation))


def _normalize(model, i, m, cfg, found) -> None:
    src = cfg.get("module_input_name", "sentence_embedding")
    if cfg.get("module_output_name", src) != src:
        raise _refuse(i, m, "writes to another feature than it reads")
    found["normalize_on"] = src


def _mask(model, i, m, cfg, found) -> None:
    if cfg.get("keep_only_token_ids"):
        raise _refuse(i, m, "keeps only some token ids (keep_only_token_ids)")
    tasks = cfg.get("skiplist_tasks", ["document"])
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if set(tasks) - {"query", "document"}:
        raise _refuse(i, m, f"applies its skiplist to tasks {tasks}")
    words = tuple(cfg.get("skiplist_words") or ())
    found["skiplist"] = words if "document" in tasks else ()
    found["skiplist_queries"] = bool(words) and "query" in tasks


def _splade(model, i, m, cfg, found) -> None:
    strategy = cfg.get("pooling_strategy", "max")
    activation = cfg.get("activation_function", "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise _refuse(i, m, f"pools by {strategy}/{activation}")
    found["pooling"] = strategy
    found["sparse_activation"] = activation


_READERS = {"Transformer": _transformer, "MLMTransformer": _transformer, "Pooling": _pooling, "Dense": _dense,
            "Normalize": _normalize, "MultiVectorMask": _mask, "SpladePooling": _splade}


def _assemble(found: dict, modules: list, st_model_type: str | None) -> StModules:
    """The output kind from the modules present, checked against their order and features."""
    kinds = found["kinds"]
    on_tokens = "SpladePooling" not in kinds and (
        "MultiVectorMask" in kinds or st_model_type == "MultiVectorEncoder")
    if "SpladePooling" in kinds:
        output, feature = "sparse", None
        if kinds != ["Transformer", "SpladePooling"] and kinds != ["MLMTransformer", "SpladePooling"]:
            raise ConfigError(f"config error: model.path: a sparse model of modules {kinds} is not supported "
                              "(Transformer with fill-mask, then SpladePooling)")
        if found.get("task") != "fill-mask":
            raise ConfigError("config error: model.path: SpladePooling after a Transformer that is not fill-mask")
    elif on_tokens:
        output, feature = "multi-vector", "token_embeddings"
        if "Pooling" in kinds:
            raise ConfigError("config error: model.path: a multi-vector model with a Pooling module is not supported")
    else:
        output, feature = "dense", "sentence_embedding"
        if "Pooling" not in kinds:
            raise ConfigError(f"config error: model.path: a {st_model_type or 'sentence-transformers'} folder of "
                              f"modules {kinds} has no Pooling module; it is not a dense embedder this job runs")
        if kinds.index("Pooling") != 1:
            raise ConfigError(f"config error: model.path: modules {kinds}: Pooling must follow the Transformer")
    if output != "sparse" and found.get("task", "feature-extraction") != "feature-extraction":
        raise ConfigError(f"config error: model.path: a {output} model over a {found['task']} Transformer")
    if st_model_type in ("SparseEncoder", "MultiVectorEncoder", "CrossEncoder") and \
            {"SparseEncoder": "sparse", "MultiVectorEncoder": "multi-vector"}.get(st_model_type) != output:
        raise ConfigError(f"config error: model.path: a {st_model_type} folder of modules {kinds} is not supported")
    for what in ("dense_on", "normalize_on"):
        on = found.get(what)
        on = on if isinstance(on, set) else ({on} if on else set())
        if on - {feature}:
            raise ConfigError(f"config error: model.path: a {output} model with a "
                              f"{what.split('_')[0].capitalize()} module on {sorted(on)} is not supported")
    if "Normalize" in kinds and "Dense" in kinds[kinds.index("Normalize"):]:
        raise ConfigError("config error: model.path: a Dense module after Normalize is not supported")
    return StModules(output=output, transformer_task=found.get("task", "feature-extraction"),
                     pooling=found.get("pooling"), include_prompt=found.get("include_prompt", True),
                     normalize="normalize_on" in found, dense=tuple(found["dense"]),
                     sparse_activation=found.get("sparse_activation", ""), skiplist=found.get("skiplist", ()),
                     skiplist_queries=found.get("skiplist_queries", False),
                     document_length=found.get("document_length"))
