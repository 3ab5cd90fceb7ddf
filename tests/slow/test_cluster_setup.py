"""cluster.yaml's setup, run for real without a cloud: a fresh virtual environment stands for the
node image, a temporary home for the node's home directory, and each `file_mounts` entry is
copied there from its local source (the checkout, as the launcher's rsync would send it). The
head's setup commands run verbatim with that environment's `pip`; then a small index runs
with what they installed, from outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _local_ray import REPO, copy_checkout, last_json, ray_env

from gpte_ray.demo.corpus import docstring_docs, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.long]


def _mount(home: Path, remote: str, local: str, excludes: list[str]) -> None:
    assert remote.startswith("~/"), f"{remote}: mount into the node's home"
    target = home / remote[2:]
    if local == ".":
        copy_checkout(target, excludes)
    else:  # the submitter's auth token
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("0" * 32)


def test_setup_commands_install_a_working_job(tmp_path):
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    home = tmp_path / "home"
    home.mkdir()
    for remote, local in cluster["file_mounts"].items():
        _mount(home, remote, local, cluster.get("rsync_exclude", []))
    assert (home / "gpte-ray" / "pyproject.toml").is_file()

    image = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(image)], check=True)
    env = ray_env()
    env.update(
        HOME=str(home), PATH=f"{image / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(image),
        # the machine's pip settings and cache, which live under the real home
        XDG_CONFIG_HOME=os.environ.get("XDG_CONFIG_HOME", os.path.expanduser("~/.config")),
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", os.path.expanduser("~/.cache/pip")),
    )
    env.pop("PYTHONPATH", None)
    for cmd in cluster["setup_commands"] + cluster["head_setup_commands"]:
        out = subprocess.run(["bash", "-c", cmd], cwd=home, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    # the package came from the synced checkout, at the pinned versions
    py = str(image / "bin" / "python")
    probe = subprocess.run(
        [py, "-c", "import gpte_ray, ray, importlib.metadata as m; "
                   "print(gpte_ray.__file__, ray.__version__, m.version('gpte-ray'))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert probe[0].startswith(str(image)) and probe[1] == "2.60.0", probe
    pins = dict(
        line.split("==") for line in (REPO / "cluster-constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["ray"] == probe[1]

    docs = list(docstring_docs(20))
    corpus = tmp_path / "corpus"
    write_shards(iter(docs), str(corpus), rows_per_shard=10)
    out = subprocess.run(
        [str(image / "bin" / "gpte-ray"), "index", "--input", str(corpus), "--db", str(tmp_path / "db"),
         "--table", "docs", "--num-cpus", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = last_json(out.stdout)
    assert report["committed"] and report["new"] == len(docs), json.dumps(report)[:2000]
