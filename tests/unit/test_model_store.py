"""Where nodes get the model (gpte_ray.model.source), without Ray: a moto S3 server on 127.0.0.1
behind a counting proxy, several processes standing for the actors of one node, and a
Hugging Face cache laid out by hand standing for a warm hub cache."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest

from gpte_ray.config import ConfigError, ModelConfig
from gpte_ray.model.source import HubModel, ModelUnavailable, ObjectStoreFolder
from gpte_ray.model.spec import resolve_model
from tests.support.s3 import FaultProxy, free_port

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def s3(minilm_path):
    """(proxy, env): moto behind a request-counting proxy, a bucket 'models' holding the packaged
    model under minilm/."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with FaultProxy(port) as proxy:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        for p in sorted(Path(minilm_path).rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(minilm_path).parts):
                client.upload_file(str(p), "models", f"minilm/{p.relative_to(minilm_path)}")
        yield proxy, env, client
    server.stop()


@pytest.fixture
def node(s3, tmp_path, monkeypatch):
    """This process as a node with an empty model cache and the S3 credentials."""
    _, env, _ = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GPTE_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weight_gets(proxy: FaultProxy, key: str) -> list[int]:
    """Start counting GETs of `key`; the returned list fills as they happen."""
    seen: list[int] = []

    def count(method, path, n):
        if method == "GET" and path.split("?")[0].endswith(key):
            seen.append(n)

    proxy.fault = count
    return seen


def test_driver_plans_from_s3_without_downloading_weights(s3, node, minilm_path):
    proxy, _, _ = s3
    gets = _weight_gets(proxy, f"minilm/{WEIGHTS}")
    spec = resolve_model(ModelConfig(path="s3://models/minilm/"))
    local = resolve_model(ModelConfig(path=minilm_path))
    # same settings and weights as the folder it was copied from; only the source differs
    assert spec.source == ObjectStoreFolder("s3://models/minilm/") and spec.model_id == "s3://models/minilm/"
    assert spec.weights_hash == local.weights_hash and spec.dim == local.dim == 384
    assert spec.pooling == local.pooling and spec.max_length == local.max_length
    assert len(gets) <= 2  # the first and the last MiB, by ranged reads
    assert not node.exists()  # nothing fetched into the driver's cache


def _fetch(args) -> str:
    import os

    env, cache, spec = args
    os.environ.update(env, GPTE_RAY_MODEL_CACHE=cache)
    return str(spec.local_folder())


def test_one_fetch_per_node_however_many_actors(s3, node, tmp_path):
    proxy, env, _ = s3
    spec = resolve_model(ModelConfig(path="s3://models/minilm/"))
    gets = _weight_gets(proxy, f"minilm/{WEIGHTS}")
    _fetch((env, str(tmp_path / "alone"), spec))
    one_fetch = len(gets)
    assert one_fetch >= 1

    gets.clear()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:  # four actors of one node, starting together
        folders = pool.map(_fetch, [(env, str(node), spec)] * 4)
    assert len(set(folders)) == 1
    assert len(gets) == one_fetch
    entries = sorted(p.name for p in (node / "s3").iterdir())
    assert entries == [Path(folders[0]).name] and Path(folders[0]).name.endswith(spec.weights_hash)
    assert (Path(folders[0]) / "tokenizer.json").is_file()


def test_model_changed_in_s3_after_planning_is_one_clear_error(s3, node, tmp_path, minilm_path):
    _, _, client = s3
    for p in sorted(Path(minilm_path).rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(minilm_path).parts):
            client.upload_file(str(p), "models", f"changing/{p.relative_to(minilm_path)}")
    spec = resolve_model(ModelConfig(path="s3://models/changing/"))
    client.put_object(Bucket="models", Key=f"changing/{WEIGHTS}",
                      Body=(Path(minilm_path) / WEIGHTS).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ConfigError) as err:
        spec.local_folder()
    msg = str(err.value)
    assert "\n" not in msg and "s3://models/changing/" in msg and "changed after planning" in msg
    assert not any((node / "s3").iterdir())  # no half-fetched or mismatched folder kept


def test_hub_id_offline_pins_the_cached_commit(tmp_path, monkeypatch, minilm_path):
    from huggingface_hub import constants

    sha = "89abcdef" * 5
    repo = tmp_path / "hub" / "models--org--minilm"
    shutil.copytree(minilm_path, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPTE_RAY_MODEL_CACHE", str(tmp_path / "cache"))

    spec = resolve_model(ModelConfig(path="org/minilm"))
    assert (spec.source, spec.model_id, spec.revision) == (HubModel("org/minilm"), "org/minilm", sha)
    assert spec.fingerprint()["revision"] == sha
    assert spec.local_folder() == repo / "snapshots" / sha

    # a node whose cache lacks the model: one line naming it, not a traceback from the hub
    from gpte_ray.model import source as model_store

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(model_store, "_verified", {})
    with pytest.raises(ModelUnavailable, match=r"cannot load 'org/minilm'@" + sha):
        spec.local_folder()


def test_searching_a_table_of_a_local_folder_says_to_pass_it():
    """A table's fingerprint keeps a local model folder's name only: without --model the query
    encoder cannot find it, and the error says what to pass."""
    from gpte_ray.query.encoder import QueryEncoder

    fp = dict(resolve_model(ModelConfig()).fingerprint(), model_id="tiny-folder-elsewhere")
    with pytest.raises(ConfigError, match=r"cannot load 'tiny-folder-elsewhere'.*needs --model FOLDER$"):
        QueryEncoder(fp)
