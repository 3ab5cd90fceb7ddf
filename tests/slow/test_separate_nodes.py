"""Nodes that share nothing but the object store: every node fetches the model itself.

A `ray.cluster_utils.Cluster` of a CPU head and two nodes with one fake GPU each, where every
node (and the driver) has its own model cache and its own Hugging Face cache, set per node
through the raylet's environment. The model lives in the loopback S3 server (moto) and, for a
hub id, in a local stand-in for each node's hub cache. The driver's own hub copy is deleted
as soon as the run is planned: whatever a worker needs must come from the source the driver
ships, never from the driver's disk.

Checked: both GPU nodes embed; each node fetched the S3 model once, into its own cache; the
driver fetched no weights; the tables equal the vectors one process computes from the same
model; a model changed in S3 between two runs rebuilds the table (new weights hash, new
fingerprint) with the new model only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _local_ray import REPO, free_port, processes_of, ray_env, terminate

from gpte_ray.demo.corpus import docstring_docs, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.long]

HUB_ID = "gpte-test/tiny-bert"
HUB_SHA = "0123456789abcdef0123456789abcdef01234567"

DRIVER = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np
import ray
from ray.cluster_utils import Cluster
import gpte_ray.run.pipeline as pipeline
from gpte_ray.config import load_config, ModelConfig

args = json.loads(sys.argv[1])
plan = pipeline.resolve_model


def resolve_then_drop_driver_copy(cfg):
    spec = plan(cfg)
    if cfg.path == args["hub_id"]:
        # the driver has planned from its hub cache: from here on that cache is gone
        shutil.rmtree(args["driver_hub"])
    return spec


pipeline.resolve_model = resolve_then_drop_driver_copy

def node_env(name):
    return {"GPTE_RAY_MODEL_CACHE": args["caches"][name], "HF_HUB_CACHE": args["hubs"][name]}

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
    "dashboard_agent_listen_port": args["agent_ports"][0], "env_vars": node_env("head"),
})
gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=port, env_vars=node_env(name))
             for name, port in zip(("gpu1", "gpu2"), args["agent_ports"][1:])]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
# Both embed actors up (each fetched the model on its node) before the first window is handed
# out; then one window in flight per actor, to the least busy one rather than the one beside
# the tokenizer that made it: windows that arrive together go to both nodes.
ctx = ray.data.DataContext.get_current()
ctx.wait_for_min_actors_s = 300
ctx.max_tasks_in_flight_per_actor = 1
ctx.execution_options.actor_locality_enabled = False


def index(model, table):
    cfg = load_config(None, {
        "input.paths": [args["corpus"]], "output.db": args["db"], "output.table": table,
        "model.path": model, "model.long_documents": "truncate",
        "resources.fake_gpus": True, "resources.min_actors": 2, "resources.max_actors": 2,
        "resources.torch_threads": 1, "batch.window_rows": 2, "resources.cpus_per_actor": 0.5,
        "output.rebuild": True,  # the model changed in S3 on purpose between two runs
    })
    return json.loads(pipeline.run_index(cfg, ray_address=cluster.address).to_json())


def listing(folder):
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def table(name):
    import lancedb
    t = lancedb.connect(args["db"]).open_table(name).to_arrow().sort_by("doc_id")
    return {"doc_id": t["doc_id"].to_pylist(), "vector": np.stack(t["vector"].to_numpy(zero_copy_only=False)).tolist()}


try:
    out = {"gpu_nodes": [n.node_id for n in gpu_nodes], "runs": {}, "tables": {}, "caches": {}}
    for step in args["steps"]:
        if step["kind"] == "index":
            out["runs"][step["name"]] = index(step["model"], step["table"])
            out["tables"][step["name"]] = table(step["table"])
        else:  # replace the model in S3 between runs
            import boto3
            s3 = boto3.client("s3")
            for p in Path(step["folder"]).rglob("*"):
                if p.is_file():
                    s3.upload_file(str(p), "models", "tiny/" + str(p.relative_to(step["folder"])))
        out["caches"][step["name"]] = {name: listing(path) for name, path in args["caches"].items()}
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _changed_copy(src: str, dest) -> str:
    """`src` with other weights (word embeddings scaled), as a retrained model would be."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".*"))
    state = load_file(str(dest / "model.safetensors"))
    name = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[name] = state[name] * 1.5
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def _hub_cache(root, model: str) -> str:
    """A Hugging Face hub cache holding `model` as HUB_ID at commit HUB_SHA (what a download
    on that node would have left)."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / HUB_SHA, copy_function=os.link)  # hard links: cheap
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_SHA)
    return str(root)


def _reference(model: str, texts: list[str]):
    """The vectors one process computes from a local folder, without Ray."""
    import numpy as np

    from gpte_ray.config import ModelConfig
    from gpte_ray.model.embedder import Embedder, postprocess
    from gpte_ray.model.spec import resolve_model
    from gpte_ray.model.tokenize import TextTokenizer

    spec = resolve_model(ModelConfig(path=model, long_documents="truncate"))
    chunks = TextTokenizer(spec).encode(texts)
    pooled = Embedder(spec, "cpu").embed([c.input_ids for c in chunks], [c.prompt_len for c in chunks])
    return spec, np.asarray(postprocess(pooled, spec, None))


@pytest.fixture
def moto():
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="models")
    yield env
    server.stop()


def _upload(env: dict, folder: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "models", "tiny/" + str(p.relative_to(folder)))


def test_every_node_fetches_the_model_itself(tmp_path, moto, minilm_path):
    import numpy as np

    # long enough (truncated at 256 tokens) that embedding a window takes far longer than
    # tokenizing one: windows queue, and with one in flight per actor both nodes get some
    docs = [d for d in docstring_docs(2000) if 800 <= len(d["text"]) <= 3000][:16]
    assert len(docs) == 16
    corpus = tmp_path / "corpus"
    write_shards(iter(docs), str(corpus), rows_per_shard=4)
    texts = [d["text"] for d in sorted(docs, key=lambda d: d["id"])]

    # the packaged all-MiniLM-L6-v2 as a folder of its own
    model_a = str(shutil.copytree(minilm_path, tmp_path / "model_a", ignore=shutil.ignore_patterns(".*")))
    model_b = _changed_copy(minilm_path, tmp_path / "model_b")
    _upload(moto, model_a)

    nodes = ("head", "gpu1", "gpu2")
    caches = {n: str(tmp_path / f"cache-{n}") for n in (*nodes, "driver")}
    hubs = {n: _hub_cache(tmp_path / f"hub-{n}", model_a) for n in (*nodes, "driver")}
    db = tmp_path / "db"
    args = {
        "corpus": str(corpus), "db": str(db), "agent_ports": [free_port() for _ in nodes],
        "caches": {n: caches[n] for n in nodes}, "hubs": {n: hubs[n] for n in nodes},
        "driver_hub": hubs["driver"], "hub_id": HUB_ID,
        "steps": [
            {"kind": "index", "name": "s3", "model": "s3://models/tiny/", "table": "from_s3"},
            {"kind": "index", "name": "hub", "model": HUB_ID, "table": "from_hub"},
            {"kind": "replace", "name": "replace", "folder": model_b},
            {"kind": "index", "name": "s3_changed", "model": "s3://models/tiny/", "table": "from_s3"},
        ],
    }
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths
    env = ray_env(RAY_TMPDIR=ray_tmp, GPTE_RAY_MODEL_CACHE=caches["driver"], HF_HUB_CACHE=hubs["driver"], **moto)
    try:
        out = subprocess.run([sys.executable, str(script), json.dumps(args)], env=env,
                             capture_output=True, text=True, timeout=600, cwd=str(REPO))
    finally:
        terminate(processes_of(re.escape(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-6000:]
    result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    runs, tables, caches, gpu_nodes = result["runs"], result["tables"], result["caches"], set(result["gpu_nodes"])

    spec_a, ref_a = _reference(model_a, texts)
    spec_b, ref_b = _reference(model_b, texts)
    assert spec_a.weights_hash != spec_b.weights_hash
    ids = sorted(d["id"] for d in docs)

    # both GPU nodes embedded, and each table equals what one process computes from the model
    for name in ("s3", "hub"):
        report = runs[name]
        assert report["committed"] and report["new"] == len(docs), report
        assert set(report["embed_nodes"]) == gpu_nodes, (name, report["embed_nodes"], gpu_nodes)
        assert tables[name]["doc_id"] == ids
        np.testing.assert_allclose(np.asarray(tables[name]["vector"]), ref_a, atol=1e-5)

    # the S3 model: fetched once into each node's own cache (no temporary folder left behind),
    # and never onto the driver
    for n in ("gpu1", "gpu2"):
        weights = [f for f in caches["s3"][n] if f.endswith("model.safetensors")]
        assert len(weights) == 1 and f"-{spec_a.weights_hash}/" in weights[0], (n, caches["s3"][n])
        assert not any(".tmp" in f for f in caches["s3"][n]), caches["s3"][n]
    assert not (tmp_path / "cache-driver").exists()
    assert not (tmp_path / "hub-driver").exists()  # the driver's hub copy was gone while nodes embedded

    # the model changed in S3 between runs: a new fingerprint, so the table is rebuilt with it
    changed = runs["s3_changed"]
    assert changed["rebuild"] and changed["committed"] and changed["chunks_written"] == len(docs), changed
    assert set(changed["embed_nodes"]) <= gpu_nodes
    assert tables["s3_changed"]["doc_id"] == ids
    np.testing.assert_allclose(np.asarray(tables["s3_changed"]["vector"]), ref_b, atol=1e-5)
    for n in ("gpu1", "gpu2"):  # each node fetched the new model beside the old one
        weights = [f for f in caches["s3_changed"][n] if f.endswith("model.safetensors")]
        assert len(weights) == 2 and any(f"-{spec_b.weights_hash}/" in f for f in weights), weights
