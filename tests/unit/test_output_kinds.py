"""Every output kind against sentence-transformers, without Ray: multi-vector (ColBERT-style
MultiVectorEncoder), sparse (SPLADE SparseEncoder, both layouts), T5 encoders; the refusals of
what the job does not reproduce; the fingerprint; search over each kind against brute force."""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest

from gpte_ray.config import ConfigError, ModelConfig
from gpte_ray.model.check import check_model, embed_with_job
from gpte_ray.model.spec import resolve_model
from tests.support.models import save_multi_vector, save_sentence_t5, save_splade

TEXTS = ["How do I read a Parquet file?", "short", "Punctuation, (brackets) and; semicolons!",
         "a somewhat longer text about batch embedding, length buckets and token budgets " * 2]


@pytest.fixture(scope="module")
def colbert(tmp_path_factory, minilm_path) -> str:
    return save_multi_vector(str(tmp_path_factory.mktemp("colbert")), minilm_path)


@pytest.fixture(scope="module")
def colbert_skip(tmp_path_factory, minilm_path) -> str:
    return save_multi_vector(str(tmp_path_factory.mktemp("colbert-skip")), minilm_path, list(string.punctuation))


@pytest.fixture(scope="module", params=[False, True], ids=["fill-mask", "mlm-transformer"])
def splade(request, tmp_path_factory, minilm_path) -> str:
    return save_splade(str(tmp_path_factory.mktemp("splade")), minilm_path, legacy=request.param)


@pytest.fixture(scope="module")
def sentence_t5(tmp_path_factory, minilm_path) -> str:
    return save_sentence_t5(str(tmp_path_factory.mktemp("st5")), minilm_path)


@pytest.mark.parametrize("skip", [False, True], ids=["no-skiplist", "punctuation-skiplist"])
def test_multi_vector_equals_multi_vector_encoder(colbert, colbert_skip, skip):
    from sentence_transformers import MultiVectorEncoder

    folder = colbert_skip if skip else colbert
    spec = resolve_model(ModelConfig(path=folder))
    assert (spec.output, spec.pooling, spec.dim, spec.document_prefix, spec.query_prefix) == \
        ("multi-vector", "none", 16, "[D] ", "[Q] ")
    ref = MultiVectorEncoder(folder, device="cpu")
    ours = embed_with_job(spec, TEXTS, "document")
    for text, mine in zip(TEXTS, ours):
        theirs = ref.encode(text, prompt_name="document", convert_to_numpy=True)  # one text at a time
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 1e-5
    if skip:  # the skiplist drops punctuation tokens from documents only
        assert len(ours[2]) < len(embed_with_job(resolve_model(ModelConfig(path=colbert)), TEXTS[2:3], "document")[0])
    for text, mine in zip(TEXTS, embed_with_job(spec, TEXTS, "query")):
        theirs = ref.encode_query(text, convert_to_numpy=True)
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max() <= 1e-5


def test_sparse_equals_sparse_encoder(splade):
    from sentence_transformers import SparseEncoder

    spec = resolve_model(ModelConfig(path=splade))
    assert (spec.output, spec.pooling, spec.sparse_activation, spec.dim) == ("sparse", "max", "relu", 30522)
    ref = SparseEncoder(splade, device="cpu")
    for role, theirs in (("document", ref.encode(TEXTS)), ("query", ref.encode_query(TEXTS))):
        dense = theirs.to_dense().numpy()
        for (ids, weights), row in zip(embed_with_job(spec, TEXTS, role), dense):
            nz = np.flatnonzero(row)
            assert ids.dtype == np.int32 and (np.diff(ids) > 0).all()  # ascending
            assert np.array_equal(ids, nz) and np.abs(weights - row[nz]).max() <= 1e-5


def test_t5_encoder_loads_the_encoder_only_and_equals_reference(sentence_t5):
    from sentence_transformers import SentenceTransformer

    from gpte_ray.model.spec import backbone_class

    spec = resolve_model(ModelConfig(path=sentence_t5))
    assert (backbone_class(spec), spec.pooling, spec.dim, spec.positions_from_mask) == ("T5EncoderModel", "mean", 24,
                                                                                         False)
    ours = np.stack(embed_with_job(spec, TEXTS, "document"))
    ref = SentenceTransformer(sentence_t5, device="cpu").encode(TEXTS)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999999


def test_window_outputs_put_micro_batches_back_in_order(colbert, splade):
    """Rows embedded in shuffled micro-batches come back in window order, as if embedded alone."""
    from gpte_ray.model.batching import flatten
    from gpte_ray.model.embedder import Embedder
    from gpte_ray.model.outputs import WindowOutputs
    from gpte_ray.model.tokenize import TextTokenizer

    for folder in (colbert, splade):
        spec = resolve_model(ModelConfig(path=folder))
        ids = [c.input_ids for c in TextTokenizer(spec).encode(TEXTS * 2)]
        emb = Embedder(spec)
        values, offsets = flatten(ids)
        window = WindowOutputs(spec, len(ids))
        for rows in (np.array([5, 0, 3]), np.array([7]), np.array([6, 1, 2, 4])):
            window.add(rows, emb.forward(emb.prepare(values, offsets, rows)))
        got = window.finish()
        for r in range(len(ids)):
            alone = emb.embed_outputs([ids[r]]).row(0)
            a, b = (got.row(r), alone) if spec.output == "multi-vector" else (got.row(r)[1], alone[1])
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5


def _edit(src: str, dst: str, rel: str, change) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, rel)
    with open(path) as f:
        data = json.load(f)
    data = change(data) or data
    with open(path, "w") as f:
        json.dump(data, f)
    return dst


REFUSALS = [
    ("modules.json", lambda m: m.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm",
                                            "type": "sentence_transformers.models.LayerNorm"}),
     r"module 2 \(sentence_transformers.models.LayerNorm, 9_LayerNorm\) is not a module this job implements"),
    ("modules.json", lambda m: m[1].update(type="my_package.custom.Pooling"),
     r"module 1 \(my_package.custom.Pooling, 1_Pooling\) is not a module this job implements"),
    ("1_Pooling/config.json", lambda c: c.update(pooling_mode="max"), r"module 1 .* pools by max"),
    ("2_Dense/config.json", lambda c: c.update(activation_function="torch.nn.modules.activation.SiLU"),
     r"module 2 .* uses activation 'SiLU'"),
    ("2_Dense/config.json", lambda c: c.update(use_residual=True), r"module 2 .* adds a residual connection"),
    ("config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_custom.CustomModel"}),
     r"maps AutoModel to its own code \(modeling_custom.CustomModel\); pass --trust-remote-code"),
    ("config.json", lambda c: c.update(model_type="my-arch"), r"'my-arch' is not an architecture transformers knows"),
    ("sentence_bert_config.json", lambda c: c.update(do_lower_case=True), r"module 0 .* lower-cases its input"),
]


@pytest.mark.parametrize("rel,change,message", REFUSALS)
def test_what_is_not_reproduced_is_refused_in_one_line(sentence_t5, tmp_path, rel, change, message):
    folder = _edit(sentence_t5, str(tmp_path / "edited"), rel, change)
    with pytest.raises(ConfigError, match=message) as err:
        resolve_model(ModelConfig(path=folder))
    assert "\n" not in str(err.value)


def test_remote_code_only_when_trusted(sentence_t5, tmp_path):
    folder = _edit(sentence_t5, str(tmp_path / "edited"), "config.json",
                   lambda c: c.update(auto_map={"AutoModel": "modeling_custom.CustomModel"}))
    spec = resolve_model(ModelConfig(path=folder, trust_remote_code=True))
    assert spec.trust_remote_code and spec.fingerprint()["trust_remote_code"] is True


@pytest.mark.parametrize("which,cfg,message", [
    ("colbert", {"precision": "int8"}, "model.precision: int8 is not supported for a multi-vector model"),
    ("colbert", {"precision": "binary"}, "model.precision: binary is not supported for a multi-vector model"),
    ("splade", {"precision": "float16"}, "model.precision: float16 is not supported for a sparse model"),
    ("splade", {"dim": 64}, "model.dim: a sparse model's dimension is its vocabulary"),
    ("colbert", {"pooling": "mean"}, "model.pooling: a multi-vector model pools by its own modules"),
])
def test_kinds_refuse_settings_they_cannot_store(colbert, splade, which, cfg, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model(ModelConfig(path=colbert if which == "colbert" else splade, **cfg))


def test_sparse_top_k_pruning_is_refused(splade, tmp_path):
    folder = _edit(splade, str(tmp_path / "edited"), "config_sentence_transformers.json",
                   lambda c: c.update(max_active_dims=64))
    with pytest.raises(ConfigError, match=r"max_active_dims"):
        resolve_model(ModelConfig(path=folder))


def test_query_expansion_is_refused(colbert, tmp_path):
    folder = _edit(colbert, str(tmp_path / "edited"), "sentence_bert_config.json",
                   lambda c: c.update(query_expansion={"strategy": "fixed", "length": 32, "attend": True}))
    with pytest.raises(ConfigError, match=r"module 0 .* sets query_expansion"):
        resolve_model(ModelConfig(path=folder))


def test_output_kind_is_in_the_fingerprint_and_old_tables_keep_theirs(colbert, splade):
    before = {"model_id", "revision", "weights_hash", "model_type", "is_decoder", "pooling", "normalize",
              "max_length", "hidden_size", "dim", "document_prefix", "document_suffix", "query_prefix",
              "query_suffix", "include_prompt", "padding_side", "dtype", "precision", "long_documents",
              "chunk_overlap", "dense"}
    assert set(resolve_model(ModelConfig()).fingerprint()) == before  # a dense table is not rebuilt
    mv, sp = resolve_model(ModelConfig(path=colbert)), resolve_model(ModelConfig(path=splade))
    assert mv.fingerprint()["output"] == "multi-vector" and sp.fingerprint()["output"] == "sparse"
    assert sp.fingerprint()["sparse_activation"] == "relu"


def test_check_model_reports_settings_and_difference(sentence_t5, colbert):
    ok = check_model(ModelConfig(path=colbert))
    assert ok["ok"] and ok["largest_difference"] <= 1e-5 and ok["settings"]["output"] == "multi-vector"
    wrong = check_model(ModelConfig(path=sentence_t5, pooling="cls"))
    assert not wrong["ok"] and wrong["largest_difference"] > 1e-2
    assert wrong["settings"]["backbone"] == "T5EncoderModel"
    out = subprocess.run([sys.executable, "-m", "gpte_ray.cli", "check-model", sentence_t5, "--pooling", "cls"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and "OVER TOLERANCE" in out.stdout
    assert "T5EncoderModel" in out.stdout


def _build_table(folder: str, db: str, name: str, docs: list[dict]):
    """The table the job writes for these documents, built by its own stages without Ray."""
    from gpte_ray.run.stages import EmbedOptions, EmbedStage, TokenizeStage
    from gpte_ray.store.table import table_schema

    spec = resolve_model(ModelConfig(path=folder))
    batch = pa.table({"doc_id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                      "content_hash": ["-"] * len(docs)})
    out, _ = EmbedStage(spec, EmbedOptions(device="cpu", token_budget=1024, max_rows=8)).embed(
        TokenizeStage(spec)(batch))
    schema = table_schema(spec, True, None)
    return lance.write_dataset(out.select(schema.names).cast(schema), f"{db}/{name}.lance", schema=schema)


def _reference_top(kind: str, folder: str, texts: list[str], doc_ids: list[str], query: str, k: int):
    """Brute force with sentence-transformers: (doc_id, score) of the k best chunks."""
    if kind == "multi-vector":
        from sentence_transformers import MultiVectorEncoder

        ref = MultiVectorEncoder(folder, device="cpu")
        q = ref.encode_query(query, convert_to_numpy=True)
        scores = [float((q @ ref.encode(t, prompt_name="document", convert_to_numpy=True).T).max(1).sum())
                  for t in texts]
    else:
        from sentence_transformers import SparseEncoder

        ref = SparseEncoder(folder, device="cpu")
        q = ref.encode_query([query]).to_dense().numpy()[0]
        scores = (ref.encode(texts).to_dense().numpy() @ q).tolist()
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:k]
    return [(doc_ids[i], scores[i]) for i in order]


@pytest.mark.parametrize("kind", ["multi-vector", "sparse"])
def test_search_ranks_as_brute_force(colbert, splade, varied_docs, tmp_path, kind):
    from gpte_ray.query.search import Searcher

    folder = colbert if kind == "multi-vector" else splade
    docs = [d | {"text": d["text"][:160]} for d in varied_docs[:40]]
    ds = _build_table(folder, str(tmp_path), "t", docs)
    table = ds.to_table(columns=["doc_id", "chunk", "text"])
    searcher = Searcher(str(tmp_path), "t", model_path=folder)
    query = docs[7]["text"][:60]
    ref = _reference_top(kind, folder, table["text"].to_pylist(), table["doc_id"].to_pylist(), query, 3)
    for exact in (True, False):
        hits = searcher.search(query, k=3, exact=exact, group=False)
        assert [h["doc_id"] for h in hits] == [d for d, _ in ref]
        assert np.allclose([h["score"] for h in hits], [s for _, s in ref], atol=1e-4)
    if kind == "sparse":  # a filter applies before ranking; rows sharing no term are not results
        only = searcher.search(query, k=3, where=f"doc_id = '{docs[3]['id']}'")
        assert {h["doc_id"] for h in only} <= {docs[3]["id"]}


def test_an_actor_failure_is_one_line_with_its_real_cause():
    """An embed actor that dies in its constructor, or a UDF that fails, reaches the driver as a
    Ray wrapper quoting the remote traceback: the CLI line is the failure, not the wrapper."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from gpte_ray.console import one_line, unwrap

    tb = ('Traceback (most recent call last):\n  File "embedder.py", line 1, in __init__\n'
          "RuntimeError: Error(s) in loading state_dict for T5EncoderModel: size mismatch for wo.weight\n")
    died = ActorDiedError(RayTaskError("MapWorker(MapBatches(EmbedStage)).__init__", tb, RuntimeError("x")))
    assert one_line(unwrap(died)) == "RuntimeError: Error(s) in loading state_dict for T5EncoderModel: size " \
                                     "mismatch for wo.weight"
    udf = tb.replace("RuntimeError: Error(s)", "ValueError: You must specify exactly one of input_ids or "
                     "inputs_embeds\n\nThe above exception was the direct cause of the following exception:\n\n"
                     "ray.data.exceptions.UserCodeException: UDF failed to process a data block.\nignored: Error(s)")
    from ray.data.exceptions import UserCodeException

    wrapped = RayTaskError("MapBatches(EmbedStage)", udf, UserCodeException("UDF failed to process a data block."))
    assert one_line(unwrap(wrapped)) == "ValueError: You must specify exactly one of input_ids or inputs_embeds"
