"""Autoscaling on Ray's fake multi-node provider: GPU workers scale 0 -> 1 for the embed actor
pool and back to 0 after the idle timeout.

The head is started by hand (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`):
`ray.cluster_utils.AutoscalingCluster` fails as shipped in Ray 2.60 (missing example.yaml) and
runs `ray stop --force`. The config mirrors cluster.yaml: a head without GPUs and a single-GPU
worker type with min_workers 0 (small fake resources: 1 CPU, 1 GPU). The job requests a GPU per
embed actor (`resources.fake_gpus`) and computes on CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml
from _local_ray import REPO, LocalHead, last_json

from gpte_ray.demo.corpus import docstring_docs, write_shards

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_MIN = 0.1  # 6 s


def _gpu_worker_type() -> tuple[str, dict]:
    """cluster.yaml's single-GPU spot type, with fake resources small enough for this machine."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    name = next(k for k, v in cluster["available_node_types"].items()
                if v.get("resources", {}).get("GPU") == 1 and "spot" in k)
    real = cluster["available_node_types"][name]
    assert real["min_workers"] == 0
    return name, {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}


def _fake_config(gcs_address: str) -> dict:
    name, worker = _gpu_worker_type()
    return {
        "cluster_name": "gpte-fake",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider's default is <node ip>:6379
        },
        "available_node_types": {
            # the fake provider's head type name is fixed; CPU only, like cluster.yaml's head
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            name: worker,
        },
        "head_node_type": "ray.head.default",
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "upscaling_speed": 1.0,
        # the monitor reads this file as is (no defaults are merged in): every field must be here
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class GpuNodeWatch:
    """Samples the number of alive nodes with GPUs from the head's GCS (no ray.init: the test
    process already holds the session's local Ray)."""

    def __init__(self, gcs_address: str):
        from ray._raylet import GcsClient

        self.client = GcsClient(address=gcs_address)
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        nodes = self.client.get_all_node_info(timeout=10)
        return sum(1 for n in nodes.values() if n.state == 0 and n.resources_total.get("GPU", 0) > 0)  # ALIVE

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.time() - self.t0, 1), self.count()))
            except Exception:  # noqa: BLE001 - a missed sample is fine
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuNodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.samples and self.samples[-1][1] == n:
                return True
            time.sleep(0.5)
        return False


@pytest.fixture
def fake_cluster(tmp_path):
    config = tmp_path / "autoscaling.yaml"
    head = LocalHead(num_cpus=2, dashboard=False, autoscaling_config=str(config),
                     env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config.write_text(json.dumps(_fake_config(head.gcs_address)))
    head.start()
    yield head
    head.stop()


def test_gpu_workers_scale_up_for_the_job_and_down_when_idle(fake_cluster, tmp_path):
    head = fake_cluster
    docs = list(docstring_docs(30))
    corpus = tmp_path / "corpus"
    write_shards(iter(docs), str(corpus), rows_per_shard=15)
    job_cfg = tmp_path / "job.yaml"
    job_cfg.write_text(yaml.safe_dump({"resources": {"fake_gpus": True, "min_actors": 1, "max_actors": 1}}))
    db = tmp_path / "db"

    with GpuNodeWatch(head.gcs_address) as watch:
        assert watch.wait_for(0, timeout=30), "a GPU worker before any demand (min_workers is 0)"
        out = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "index_corpus.py"), "--config", str(job_cfg),
             "--input", str(corpus), "--db", str(db), "--table", "docs"],
            env={**head.env, "RAY_ADDRESS": head.gcs_address}, capture_output=True, text=True, timeout=400,
            cwd=str(REPO),
        )
        during = [n for _, n in watch.samples]
        monitor = "\n--- monitor.log ---\n" + head.log_tail("monitor.log")
        assert out.returncode == 0, out.stderr[-4000:] + monitor
        assert max(during) >= 1, f"no GPU worker was started; samples {watch.samples}" + monitor
        assert max(during) <= 2  # max_workers
        scaled_down = watch.wait_for(0, timeout=IDLE_TIMEOUT_MIN * 60 + 60)
        assert scaled_down, f"GPU workers still up after the idle timeout; samples {watch.samples}"

    report = last_json(out.stdout)
    assert report["counts_add_up"] and report["new"] == len(docs) and report["committed"]

    from tests.support.tables import check_table

    table = check_table(str(db), "docs", [d["id"] for d in docs], report["chunks_written"])
    assert table.num_rows >= len(docs)

    # the autoscaler did it, for the GPU type, and says so
    log = head.log_tail("monitor.log", 200_000)
    name, _ = _gpu_worker_type()
    assert f"Adding 1 node(s) of type {name}" in log, log[-3000:]
    # the autoscaler may start a second worker while the first one boots; all of them must go
    assert re.search(rf"Removing \d+ nodes of type {re.escape(name)} \(idle\)", log), log[-3000:]
