"""The job on a three-node cluster (`ray.cluster_utils.Cluster`): a CPU head and two workers with
one fake GPU each; two embed actors (`resources.fake_gpus`) must land one on each GPU node, and
the table must hold every document exactly once.

The cluster and its driver live in a subprocess: the test process already holds the session's
`ray.init`. RAY_TMPDIR points the subprocess's Ray (node temp dirs and the `ray_current_cluster`
address file) at a private folder, so nothing of other Ray users on the machine is touched.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from _local_ray import REPO, free_port, processes_of, ray_env, terminate

from gpte_ray.demo.corpus import docstring_docs, write_shards

pytestmark = pytest.mark.slow

DRIVER = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from gpte_ray.config import load_config
from gpte_ray.run.pipeline import run_index

args = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
    "dashboard_agent_listen_port": args["agent_ports"][0],
})
gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=port)
             for port in args["agent_ports"][1:]]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
# both embed actors ready before the windows flow: else one may take every tiny window while
# the other still loads its model (seen once on a loaded 2-core CI machine)
ray.data.DataContext.get_current().wait_for_min_actors_s = 120
try:
    cfg = load_config(None, {
        "input.paths": [args["corpus"]], "output.db": args["db"], "output.table": "docs",
        "resources.fake_gpus": True, "resources.min_actors": 2, "resources.max_actors": 2,
        "resources.torch_threads": 1, "batch.window_rows": 4,
        # half a CPU each: a read or tokenize task on a GPU node must not keep an actor off it
        "resources.cpus_per_actor": 0.5,
    })
    report = run_index(cfg, ray_address=cluster.address)
    from ray._private.state import actors
    placed = [
        {"cls": a["ActorClassName"], "node": a["Address"]["NodeID"]}
        for a in actors().values()
    ]
    out = {
        "report": json.loads(report.to_json()),
        "actors": placed,
        "gpu_nodes": [n.node_id for n in gpu_nodes],
        "head_node": cluster.head_node.node_id,
    }
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_embed_actors_on_two_gpu_nodes(tmp_path):
    # short documents: one chunk each, so rows == documents
    docs = [d for d in docstring_docs(1000) if len(d["text"]) < 400][:80]
    assert len(docs) == 80
    corpus = tmp_path / "corpus"
    write_shards(iter(docs), str(corpus), rows_per_shard=10)
    db = tmp_path / "db"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths
    args = {"corpus": str(corpus), "db": str(db), "agent_ports": [free_port() for _ in range(3)]}
    try:
        out = subprocess.run([sys.executable, str(script), json.dumps(args)], env=ray_env(RAY_TMPDIR=ray_tmp),
                             capture_output=True, text=True, timeout=480, cwd=str(REPO))
    finally:
        terminate(processes_of(re.escape(ray_tmp)))  # anything the driver's shutdown left behind
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-5000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))

    report = result["report"]
    assert report["counts_add_up"] and report["new"] == len(docs) and report["committed"]

    embed = [a for a in result["actors"] if "EmbedStage" in a["cls"]]
    assert {a["node"] for a in embed} <= set(result["gpu_nodes"]), (embed, result["gpu_nodes"])
    # windows were embedded on both GPU nodes, none on the CPU head
    assert set(report["embed_nodes"]) == set(result["gpu_nodes"]), (report["embed_nodes"], result["gpu_nodes"])

    from tests.support.tables import check_table

    table = check_table(str(db), "docs", [d["id"] for d in docs], report["chunks_written"])
    assert table.num_rows == len(docs) and set(table["chunk"].to_pylist()) == {0}
    vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    assert vectors.shape == (len(docs), 384) and np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
