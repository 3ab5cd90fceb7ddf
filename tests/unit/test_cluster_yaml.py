"""cluster.yaml, the cluster job config and the Kubernetes manifests, checked offline."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from gpte_ray.config import ResourceConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_JOB = ROOT / "configs" / "cluster_job.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))  # validate_config alone fails on a raw file
    validate_config(cfg)
    return cfg


def _workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _fits(node: dict, r: ResourceConfig, actors: int = 1) -> bool:
    res = node.get("resources", {})
    return res.get("GPU", 0) >= r.gpus_per_actor * actors and res.get("CPU", 0) >= r.cpus_per_actor * actors


def test_cluster_yaml_is_valid_for_the_launcher(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["max_workers"] >= max(t["max_workers"] for t in _workers(prepared).values())


def test_head_runs_no_embedding_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "RAY_AUTH_MODE=token" in start


def test_gpu_workers_scale_from_zero_on_spot_with_on_demand_fallback(prepared):
    workers = _workers(prepared)
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu) >= 2
    for name, node in gpu.items():
        assert node["min_workers"] == 0, name
        assert 0 < node["max_workers"] <= prepared["max_workers"], name
        assert set(node["resources"]) >= {"CPU", "GPU"}, f"{name}: declare CPU and GPU explicitly"
    market = {k: v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") for k, v in gpu.items()}
    spot = {k for k, m in market.items() if m == "spot"}
    on_demand = set(gpu) - spot
    assert spot and on_demand
    shapes = {k: (v["resources"]["CPU"], v["resources"]["GPU"]) for k, v in gpu.items()}
    # the fallback can take what a spot type takes, and ranks below it
    for od in on_demand:
        prio = gpu[od].get("priority", 0)
        assert any(shapes[od] == shapes[s] and gpu[s].get("priority", 0) > prio for s in spot), od
    # a single-GPU type and a multi-GPU type
    assert {g for _, g in shapes.values()} >= {1, 4}


def _pins() -> dict[str, str]:
    lines = (ROOT / "cluster-constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pairs}


def test_setup_installs_the_synced_checkout_with_pinned_dependencies(prepared):
    # gpte-ray is not on PyPI: the checkout `ray up` runs from is mounted and installed
    assert prepared["file_mounts"]["~/gpte-ray"] == "."
    setup = prepared["setup_commands"]
    assert any("~/gpte-ray" in c and "[cluster]" in c and "-c ~/gpte-ray/cluster-constraints.txt" in c for c in setup)
    assert any('"torch==2.13.0"' in c for c in setup)
    pins = _pins()
    assert pins["ray"] == "2.60.0" and prepared["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-")
    assert "torch" not in pins and "gpte-ray" not in pins  # torch per node type; the package from the checkout
    start = " ".join(prepared["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN" in start


def test_no_document_installs_a_release_that_does_not_exist():
    for path in ["cluster.yaml", "README.md", "docs/cluster.md", *map(str, (ROOT / "k8s").glob("*.yaml"))]:
        assert "gpte-ray==" not in (ROOT / path).read_text(), path


def test_one_nightly_config_everywhere():
    """Every nightly schedule runs jobs/nightly_reindex.py with configs/nightly.yaml."""
    for path in ["README.md", "docs/cluster.md", "k8s/nightly-cronjob.yaml", "jobs/nightly_reindex.py"]:
        text = " ".join((ROOT / path).read_text().split())
        runs = re.findall(r"nightly_reindex\.py`? --config ([\w./-]+\.yaml)", text)
        assert runs and set(runs) == {"configs/nightly.yaml"}, (path, runs)


@pytest.mark.parametrize("source", ["default", "cluster_job", "nightly"])
def test_actor_requests_fit_a_worker_type(prepared, source):
    cfg = load_config({"cluster_job": CLUSTER_JOB, "nightly": ROOT / "configs" / "nightly.yaml"}.get(source))
    r = cfg.resources
    workers = _workers(prepared)
    fitting = [k for k, v in workers.items() if _fits(v, r)]
    assert fitting, f"{source}: {r.gpus_per_actor} GPU + {r.cpus_per_actor} CPU per actor fits no worker type"
    # room for reads and tokenizers beside the actor on every fitting node
    for k in fitting:
        assert workers[k]["resources"]["CPU"] >= r.cpus_per_actor + r.read_cpus + r.tokenize_cpus, k
    # the whole pool at max_actors fits what the cluster may launch
    gpus = sum(v["resources"].get("GPU", 0) * v["max_workers"] for v in workers.values())
    assert gpus >= r.max_actors * r.gpus_per_actor


def test_cluster_job_config_loads():
    cfg = load_config(CLUSTER_JOB)
    assert cfg.resources.device == "cuda"
    assert cfg.resources.min_actors == 1 and cfg.resources.max_actors >= 2
    assert not cfg.resources.fake_gpus
    assert all(p.startswith("s3://") for p in cfg.input.paths)
    assert cfg.output.db.startswith("s3://")
    # no credentials in the file
    secrets = {k.lower() for k in {**cfg.input.storage_options, **cfg.output.storage_options}}
    assert not secrets & {"aws_access_key_id", "aws_secret_access_key", "access_key", "secret_key"}


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _token_env_ok(container: dict) -> bool:
    env = _env(container)
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return env.get("RAY_AUTH_MODE", {}).get("value") == "token" and bool(ref.get("name") and ref.get("key"))


def _image() -> str:
    """The gpte-ray image the manifests run (built from the repo's Dockerfile)."""
    tags = set(re.findall(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text()))
    assert len(tags) == 1, tags
    return tags.pop()


def _check_ray_cluster_spec(spec: dict) -> None:
    """Head and GPU workers run the gpte-ray image (nothing installed per pod), as the service
    account that carries the S3 role, with token authentication."""
    assert spec["rayVersion"] == _pins()["ray"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        assert pod["serviceAccountName"] == "gpte-ray"
        for c in pod["containers"]:
            assert c["image"] == _image() and _token_env_ok(c)
    assert spec["enableInTreeAutoscaling"] is True
    assert _token_env_ok(spec["autoscalerOptions"])
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == g["rayStartParams"]["num-gpus"]


def _service_account(docs: list[dict]) -> None:
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["name"] == "gpte-ray"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_k8s_rayjob():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python /home/ray/gpte-ray/jobs/index_corpus.py ")  # the image's checkout
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}  # no pip, no working_dir: the image has everything
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    _service_account(docs)
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        assert _token_env_ok(c) and c["image"] == _image()


def test_k8s_nightly_cronjob():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "nightly-cronjob.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    cron = kinds["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert _token_env_ok(c)
    cmd = " ".join(c.get("command", []) + c.get("args", []))
    assert "ray job submit" in cmd
    assert '--submission-id "nightly-$(date' in cmd
    assert '-- "cd /home/ray/gpte-ray && python jobs/nightly_reindex.py --config configs/nightly.yaml"' in cmd
    import json

    runtime_env = json.loads(re.search(r"--runtime-env-json '(.*?)'", cmd, re.S).group(1))
    assert set(runtime_env) == {"env_vars"}  # nothing installed per job or pod
    assert c["image"] == _image() and "initContainers" not in pod  # no clone of a repository
    _service_account(docs)
    head = kinds["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    mount = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    assert mount["/home/ray/gpte-ray/configs/nightly.yaml"]["subPath"] == "nightly.yaml"  # the driver's config
    if "RayCluster" in kinds:
        _check_ray_cluster_spec(kinds["RayCluster"]["spec"])
        svc = f"{kinds['RayCluster']['metadata']['name']}-head-svc:8265"
        assert svc in cmd or svc in str(_env(c).get("RAY_ADDRESS", {}).get("value"))


def test_the_image_bakes_pinned_dependencies():
    text = (ROOT / "Dockerfile").read_text()
    pins = _pins()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    assert base == f"rayproject/ray:{pins['ray']}-py311-gpu"
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c /home/ray/gpte-ray/cluster-constraints.txt" in line for line in installs)
    assert '"torch==2.13.0"' in text and "/home/ray/gpte-ray[cluster]" in text


def test_every_pip_install_is_pinned(prepared):
    commands = [*prepared["setup_commands"], *prepared["head_setup_commands"], *prepared["worker_setup_commands"]]
    for c in commands:
        if "pip install" in c:
            assert "-c ~/gpte-ray/cluster-constraints.txt" in c, c  # every version from the constraints
    assert any("boto3" in c for c in prepared["head_setup_commands"]) and "boto3" in _pins()


def test_workers_have_an_instance_profile_and_no_node_runs_rays_default_ami(raw):
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith("ami-"), name  # never the launcher's silent default
        if name != raw["head_node_type"]:  # the workers do every S3 read and Lance write
            assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


PLACEHOLDERS = re.compile(r"123456789012|ami-0|example-|my-corpus|my-vectors|us-west-2")


@pytest.mark.parametrize("path", ["cluster.yaml", "Dockerfile", "k8s/rayjob.yaml", "k8s/nightly-cronjob.yaml",
                                  "configs/cluster_job.yaml", "configs/nightly.yaml"])
def test_every_placeholder_is_marked_to_edit(path):
    """A value the deployer must replace carries `# EDIT:` on its line (comments aside)."""
    for n, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        if PLACEHOLDERS.search(code) or (line.lstrip().startswith("#") and "docker build" in line):
            assert "# EDIT:" in line, f"{path}:{n}: {line.strip()}"
