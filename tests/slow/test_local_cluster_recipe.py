"""The README's "On a local Ray cluster" recipe, run verbatim after `gpte-ray demo`, in a fresh
home directory and a copy of the checkout: the job succeeds under token authentication, and
neither the demo nor the recipe writes `~/.ray/auth_token`.

The head uses Ray's default ports (6379, 8265), as the recipe says; RAY_TMPDIR gives it a
private temp dir, so that the test ends exactly the processes it started (never `ray stop`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import lancedb
import pytest
from _local_ray import REPO, copy_checkout, processes_of, ray_env, require_job_submission, terminate

pytestmark = [pytest.mark.slow, pytest.mark.long]


def readme_recipe() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a local Ray cluster\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_demo_then_readme_local_cluster_recipe(tmp_path):
    require_job_submission()
    recipe = readme_recipe()
    assert "ray start --head" in recipe and "RAY_AUTH_TOKEN" in recipe and "--working-dir ." in recipe

    home = tmp_path / "home"
    home.mkdir()
    work = copy_checkout(tmp_path / "gpte-ray", [".venv", ".git", "demo_data"])
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths
    env = ray_env(HOME=str(home), RAY_TMPDIR=ray_tmp)
    env.pop("RAY_AUTH_MODE")  # as a user's shell has it: the demo must not need it

    try:
        demo = subprocess.run(["gpte-ray", "demo", "--out", "demo_data", "--docs", "40"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert demo.returncode == 0, demo.stderr[-4000:]
        assert not (home / ".ray" / "auth_token").exists(), "the demo wrote ~/.ray/auth_token"

        out = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        terminate(processes_of(re.escape(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-3000:]
    assert not (home / ".ray" / "auth_token").exists()

    report = json.loads((work / "demo_data" / "job-report.json").read_text())
    assert report["committed"] and report["new"] == report["rows_read"] == 40, report
    table = lancedb.connect(str(work / "demo_data" / "db")).open_table("docs")
    assert table.count_rows() == report["chunks_written"]
    # the recipe's last command prints the report: the same JSON
    assert json.loads(out.stdout[out.stdout.rindex("\n{"):]) == report
