"""The one model source (gpte_ray.model.source): which kind a model path is, and fingerprints
that stay what they were, so that no table is rebuilt because the code moved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpte_ray.config import ConfigError, ModelConfig
from gpte_ray.model.source import (
    PACKAGED_ID,
    HubModel,
    LocalFolder,
    ModelUnavailable,
    ObjectStoreFolder,
    PackagedModel,
    model_source,
)
from gpte_ray.model.spec import resolve_model, spec_from_fingerprint
from tests.support.models import save_tiny

# Recorded from the pre-refactor code (spec._plan and source.materialize, before issue 21 point 3)
# with the pinned venv: a change here means every table of that model would be rebuilt.
PACKAGED_FP = {
    "chunk_overlap": 32, "dense": [], "dim": 384, "document_prefix": "", "document_suffix": "", "dtype": "auto",
    "hidden_size": 384, "include_prompt": True, "is_decoder": False, "long_documents": "chunk", "max_length": 256,
    "model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "bert", "normalize": True,
    "padding_side": "right", "pooling": "mean", "precision": "float32", "query_prefix": "", "query_suffix": "",
    "revision": None, "weights_hash": "c9332c31b66c62f2",
}
TINY_BERT_FP = {
    "chunk_overlap": 16, "dense": [], "dim": 32, "document_prefix": "", "document_suffix": "", "dtype": "auto",
    "hidden_size": 32, "include_prompt": True, "is_decoder": False, "long_documents": "chunk", "max_length": 128,
    "model_id": "tiny-bert", "model_type": "bert", "normalize": True, "padding_side": "right", "pooling": "mean",
    "precision": "float32", "query_prefix": "", "query_suffix": "", "revision": None,
    "weights_hash": "50e6b2e632fb0ce7",
}
DIGESTS = {  # fingerprint_digest(), recorded from the pre-refactor code too
    "packaged": "6aa78331c354ac35",
    "packaged-overrides": "373f705afad1b540",
    "tiny-bert": "cb6e6d59f37f5a3d",
    "tiny-dense": "79d49e1f691f7aea",
    "tiny-qwen2": "ecc7e44d8944c43a",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_path) -> Path:
    """tiny-bert (save_tiny, sentence-transformers), tiny-dense (the same with a Dense module and
    named prompts) and tiny-qwen2 (a plain decoder folder), under one folder."""
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model

    root = tmp_path_factory.mktemp("models")
    bert = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)
    save_tiny(str(root / "tiny-bert"), bert, BertModel, minilm_path, {"pooling_mode_mean_tokens": True})
    qwen = Qwen2Config(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    save_tiny(str(root / "tiny-qwen2"), qwen, Qwen2Model, minilm_path)

    dense = root / "tiny-dense"
    shutil.copytree(root / "tiny-bert", dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules[-1]["path"] = "3_Normalize"
    (dense / "modules.json").write_text(json.dumps(modules))
    (dense / "2_Dense").mkdir()
    (dense / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32, "out_features": 16, "bias": False,
         "activation_function": "torch.nn.modules.activation.Tanh"}))
    (dense / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    return root


def test_fingerprints_are_those_of_the_code_before(folders):
    packaged = resolve_model(ModelConfig())
    tiny = resolve_model(ModelConfig(path=str(folders / "tiny-bert")))
    assert packaged.fingerprint() == PACKAGED_FP
    assert tiny.fingerprint() == TINY_BERT_FP
    specs = {
        "packaged": packaged,
        "packaged-overrides": resolve_model(ModelConfig(
            dim=128, precision="binary", query_prompt="query: {text}", long_documents="truncate",
            max_length=64, pooling="cls", normalize=False)),
        "tiny-bert": tiny,
        "tiny-dense": resolve_model(ModelConfig(path=str(folders / "tiny-dense"))),
        "tiny-qwen2": resolve_model(ModelConfig(path=str(folders / "tiny-qwen2"))),
    }
    assert {name: s.fingerprint_digest() for name, s in specs.items()} == DIGESTS


def test_one_function_picks_the_kind(folders, tmp_path, monkeypatch):
    monkeypatch.chdir(folders)
    assert model_source(None) == PackagedModel()
    assert model_source("s3://bucket/models/x") == ObjectStoreFolder("s3://bucket/models/x/")
    assert model_source("tiny-bert") == LocalFolder(str(folders / "tiny-bert"))  # resolved: the path every node uses
    assert model_source("/no/such/folder") == LocalFolder("/no/such/folder")
    assert model_source("org/model") == HubModel("org/model")
    # a fingerprint's model_id names no folder here: the package, or the hub id it says
    assert model_source(PACKAGED_ID, recorded=True) == PackagedModel()
    assert model_source(PACKAGED_ID) == HubModel(PACKAGED_ID)
    assert model_source("tiny-bert", recorded=True) == HubModel("tiny-bert")
    with pytest.raises(ConfigError, match=r"'gs://b/m' is not a folder, an s3:// folder or a hub id$"):
        model_source("gs://b/m")


def test_a_missing_folder_is_one_line_on_the_driver_and_on_a_node():
    source = model_source("/no/such/folder")
    with pytest.raises(ConfigError, match=r"'/no/such/folder' is not a folder, an s3:// folder or a hub id$"):
        source.plan(None)
    with pytest.raises(ConfigError, match=r"/no/such/folder does not exist on node .*must be on every node"):
        source.materialize(None, "0123")


def test_a_hub_id_not_in_the_offline_cache_is_a_typed_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPTE_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailable, match=r"cannot load 'org/absent'"):
        resolve_model(ModelConfig(path="org/absent"))
    with pytest.raises(ModelUnavailable, match=r"cannot load 'org/absent'@abc on node"):
        HubModel("org/absent").materialize("abc", None)


def test_a_table_spec_comes_back_from_its_fingerprint(folders):
    spec = resolve_model(ModelConfig(path=str(folders / "tiny-bert")))
    back = spec_from_fingerprint(spec.fingerprint(), str(folders / "tiny-bert"))
    assert back == spec and back.source == LocalFolder(str(folders / "tiny-bert"))
    packaged = spec_from_fingerprint(PACKAGED_FP)
    assert packaged.source == PackagedModel() and packaged.fingerprint() == PACKAGED_FP
    with pytest.raises(ConfigError, match=r"tiny-qwen2' is not the model this table was embedded with \(tiny-bert\)"):
        spec_from_fingerprint(spec.fingerprint(), str(folders / "tiny-qwen2"))
